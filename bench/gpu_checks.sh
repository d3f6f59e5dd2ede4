#!/usr/bin/env bash
# Every GPU check in one call (a GPU machine is lent for minutes, and starting one is the slow part):
#   1. the CUDA tests (tests/test_gpu.py: float16 autocast with grad scaling, attacks on the device);
#   2. the CLI's GPU paths: `rcat-ray finetune --gpus-per-worker 1` (Ray Train, a GPU worker, mixed precision)
#      run twice in fresh stores (are the weights reproducible on a GPU?), then `rcat-ray compare` with a GPU actor;
#   3. bench/gpu_eval.py: samples/s of the paper's attack, floor vs direct loop vs Ray Data with one GPU actor.
# Usage, from the project root: bash bench/gpu_checks.sh OUTDIR [gpu_eval.py flags...]
# PY (default python3) runs Python; GPUS=0 rehearses the script on a CPU machine. On the lent GPU machine, the
# bundle of ../shared/gpu/bundle.sh also needs beautifulsoup4 and soupsieve wheels in .gpu/whl (gdown imports bs4).
set -uo pipefail
out=${1:?usage: bench/gpu_checks.sh OUTDIR [gpu_eval.py flags]}
shift
mkdir -p "$out"
py=${PY:-python3}
gpus=${GPUS:-1}
w=$(mktemp -d)
export PYTHONUNBUFFERED=1
rr() { timeout 240 "$py" -m rcat_ray.cli "$@"; }  # a hung step must not eat the lease
step() { echo "== $(date +%T) $*" | tee -a "$out/checks.log"; }

(nvidia-smi || true) >"$out/checks.log" 2>&1
step "1. CUDA tests"
"$py" -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider --basetemp="$w/pytest" 2>&1 | tail -15 | tee -a "$out/checks.log"

step "2. CLI on a GPU: two digits models, two fine-tunes in fresh stores, one compare"
rr train --data digits --arch mlp --epochs 10 --eps 0.1 --seed 0 --out "$w/old.pt" >>"$out/cli.log" 2>&1
rr train --data digits --arch small_cnn --epochs 20 --eps 0.1 --seed 1 --out "$w/new.pt" >>"$out/cli.log" 2>&1
for i in 1 2; do
  t=$(date +%s)
  rr finetune --old "$w/old.pt" --new "$w/new.pt" --data digits --train-eps 0.1 --loss rcat --alpha 0.5 \
    --beta 0.4 --epochs 2 --workers 1 --gpus-per-worker "$gpus" --output "$w/ft$i.pt" --store "$w/store$i" \
    --storage "$w/ray$i" >>"$out/cli.log" 2>&1
  step "finetune $i: exit $? in $(($(date +%s) - t)) s"
done
"$py" - "$w" <<'EOF' 2>&1 | tee -a "$out/checks.log"
import json, sys, torch
w = sys.argv[1]
try:
    a, b = (torch.load(f"{w}/ft{i}.pt", map_location="cpu", weights_only=True) for i in (1, 2))
    sa, sb = (x.get("state_dict", x) if isinstance(x, dict) else x for x in (a, b))
    same = all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))
    diff = max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa if torch.is_tensor(sa[k]))
    m = json.load(open(f"{w}/ft1.json"))
    print(f"two GPU fine-tunes, same config: weights identical {same}, max |difference| {diff:.3g}")
    print("compute:", m["config"]["compute"], "mixed_precision:", m["config"].get("mixed_precision"))
    print("last epoch:", m["history"][-1])
except Exception as e:  # a failed fine-tune above leaves no checkpoint: say so and go on to the benchmark
    print("fine-tune comparison unavailable:", repr(e))
EOF
t=$(date +%s)
rr compare --data digits --eps 0.1 --n-iter 20 --old "$w/new.pt" --new "$w/ft1.pt" --workers 1 \
  --gpus-per-worker "$gpus" --store "$w/store1" --report "$w/report" --json >"$out/compare.json" 2>>"$out/cli.log"
step "compare on a GPU actor: exit $? in $(($(date +%s) - t)) s"
grep -h -i -E "cuda|device|error|Traceback" "$out/cli.log" | sort | uniq -c | sort -rn | head -20 >>"$out/checks.log"

step "3. evaluation throughput"
"$py" bench/gpu_eval.py --out "$out" "$@" 2>&1 | grep -v -i warn | tee -a "$out/checks.log"
step "done"
rm -rf "$w"
