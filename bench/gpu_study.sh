#!/usr/bin/env bash
# `rcat-ray study` on a GPU machine, in one call (issue 20): two digits models, then the study of
# bench/gpu_study.yaml (trials two to a GPU, final fine-tunes on a Ray Train GPU worker, evaluations on a GPU
# actor), run twice: the second run must compute nothing. Prints the wall times, where each part ran (the
# chunks' peak CUDA memory, the fine-tunes' compute) and the study's table.
# Usage, from the project root: bash bench/gpu_study.sh OUTDIR   (PY: the Python to use, default python3; GPUS=0
# rehearses it on a CPU machine)
set -uo pipefail
out=${1:?usage: bench/gpu_study.sh OUTDIR}
mkdir -p "$out"
py=${PY:-python3}
w=$(mktemp -d)
export PYTHONUNBUFFERED=1
rr() { timeout "${STEP_TIMEOUT:-200}" "$py" -m rcat_ray.cli "$@"; }
step() { echo "== $(date +%T) $*" | tee -a "$out/checks.log"; }

(nvidia-smi --query-gpu=name,memory.total --format=csv || true) >"$out/checks.log" 2>&1
rr train --data digits --arch mlp --epochs 10 --eps 0.1 --seed 0 --out "$w/old.pt" >"$out/cli.log" 2>&1
rr train --data digits --arch small_cnn --epochs 20 --eps 0.1 --seed 1 --out "$w/new.pt" >>"$out/cli.log" 2>&1
gpus=${GPUS:-1}  # GPUS=0 rehearses the script on a CPU machine
half=$([ "$gpus" = 0 ] && echo 0 || echo 0.5)
sed -e "s#@W@#$w#g" -e "s#gpus_per_worker: 1#gpus_per_worker: $gpus#g" -e "s#gpus_per_trial: 0.5#gpus_per_trial: $half#" \
  bench/gpu_study.yaml >"$w/study.yaml"
for i in 1 2; do
  t=$(date +%s)
  rr study --config "$w/study.yaml" --log-file "$out/study.log" >"$out/study$i.out" 2>>"$out/cli.log"
  step "study run $i: exit $? in $(($(date +%s) - t)) s"
done
"$py" - "$w" <<'PYEOF' 2>&1 | tee -a "$out/checks.log"
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
cuda = [json.loads(p.read_text()).get("memory", {}).get("cuda_max_allocated_bytes") for p in (w / "store").rglob("chunk-*.json")]
print(f"evaluation chunks: {len(cuda)}, on CUDA: {sum(c is not None for c in cuda)}, peak CUDA MiB: {max([c for c in cuda if c] or [0]) / 2**20:.0f}")
for m in sorted((w / "out" / "finetuned").glob("*.json")):
    cfg = json.loads(m.read_text())["config"]
    print(m.stem, "compute", cfg["compute"], "mixed_precision", cfg.get("mixed_precision"))
results = sorted((w / "ray_results" / "tune").glob("*/*/result.json"))
print(f"Tune trials: {len(results)}")
PYEOF
cp "$w/out/study.md" "$w/out/study.csv" "$out/" 2>/dev/null
tail -40 "$out/study1.out" >>"$out/checks.log"
rm -rf "$w"
