"""The nightly gate: gates on CI bounds, exit codes, history, notifiers, and a regressing candidate."""

from __future__ import annotations

import http.server
import json
import multiprocessing as mp
import threading
import typing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from rcat_ray.cli import main
from rcat_ray.config import parse_config
from rcat_ray.core.models import build_architecture, save_checkpoint
from rcat_ray.nightly.config import GatesConfig, NotifyConfig
from rcat_ray.nightly.gates import judge
from rcat_ray.nightly.history import append_night, read_history
from rcat_ray.nightly.notify import WebhookNotifier, deliver, make_notifier
from tests.conftest import snapshot


def _metric(value, lo, hi, n=100):
    return {"value": value, "ci_low": lo, "ci_high": hi, "n": n}


SUMMARY = {
    "metrics": {
        "nfr": _metric(0.030, 0.022, 0.038),
        "r_nfr": _metric(0.025, 0.015, 0.035),
        "s_nfr": _metric(0.050, 0.040, 0.060),
        "acc": _metric(0.80, 0.78, 0.82),
        "rob_acc": _metric(0.50, 0.47, 0.53),
        "near_flip": _metric(0.060, 0.045, 0.075),
    },
    "per_class": [
        {
            "class": 3,
            "name": "cat",
            "metrics": {
                "nfr": _metric(0.2, 0.12, 0.28, 10),
                "r_nfr": _metric(None, None, None, 0),
                "s_nfr": _metric(0.2, 0.1, 0.3),
                "acc": _metric(0.5, 0.4, 0.6),
                "rob_acc": _metric(0.2, 0.1, 0.3),
            },
        }
    ],
}


def test_gates_fail_only_on_evidence():
    # the point estimate 3.0% is above 2.5%, but the CI reaches down to 2.2%: not enough evidence
    v = judge(SUMMARY, GatesConfig(max_nfr=0.025))
    assert v["passed"] and v["gates"][0]["evidence"] == 0.022
    # judged on the value, the same gate fails
    assert not judge(SUMMARY, GatesConfig(max_nfr=0.025, judge_on="value"))["passed"]
    # a threshold below the whole CI fails; a min gate fails only when the upper end is below it
    v = judge(SUMMARY, GatesConfig(max_nfr=0.02, min_acc=0.83, min_rob_acc=0.45))
    assert v["failing"] == ["max_nfr [overall]", "min_acc [overall]"]
    # per-class gates; a metric without samples is "not judged", never a failure
    v = judge(SUMMARY, GatesConfig(per_class=({"class": 3, "max_nfr": 0.1, "max_r_nfr": 0.01},)))
    assert v["failing"] == ["max_nfr [class 3 (cat)]"]
    assert [g["passed"] for g in v["gates"]] == [False, None]
    with pytest.raises(ValueError, match="class 7"):
        judge(SUMMARY, GatesConfig(per_class=({"class": 7, "max_nfr": 0.1},)))


def test_near_flip_gate():
    """Near-flips gate like the flip rates: on the CI's lower end (4.5 %) by default."""
    assert judge(SUMMARY, GatesConfig(max_near_flip=0.05))["passed"]
    v = judge(SUMMARY, GatesConfig(max_near_flip=0.04))
    assert v["failing"] == ["max_near_flip [overall]"] and v["gates"][0]["metric"] == "near_flip"
    unknown = {"metrics": {**SUMMARY["metrics"], "near_flip": _metric(None, None, None, 0)}}
    assert [g["passed"] for g in judge(unknown, GatesConfig(max_near_flip=0.01))["gates"]] == [None]


def test_history_appends_never_rewrite(tmp_path):
    root = str(tmp_path / "history")
    assert read_history(root).empty
    append_night(
        root,
        "2026-11-20",
        {"run_id": "a", "timestamp": "2026-11-20T02:30:00", "pair": "p", "verdict": "pass", "nfr_value": 0.01},
    )
    first = snapshot(tmp_path / "history")
    second = {"run_id": "b", "timestamp": "2026-11-21T02:30:00", "pair": "p", "verdict": "fail"}
    append_night(root, "2026-11-21", second)
    after = snapshot(tmp_path / "history")
    assert all(after[k] == v for k, v in first.items())  # the first night's file is untouched
    df = read_history(root)
    assert df["run_id"].tolist() == ["a", "b"] and df["date"].tolist() == ["2026-11-20", "2026-11-21"]
    assert df["nfr_value"].iloc[0] == 0.01 and df["nfr_value"].isna().iloc[1]
    with pytest.raises(FileExistsError):
        append_night(root, "2026-11-21", {"run_id": "b", "timestamp": "x", "pair": "p"})


def _append(args):
    root, run_id, barrier = args
    barrier.wait()
    append_night(root, "2026-11-22", {"run_id": run_id, "timestamp": "2026-11-22T02:30:00", "pair": "p"})


def test_two_runs_writing_the_history_at_once(tmp_path):
    root = str(tmp_path / "history")
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            pool.map(_append, [(root, "night-1", barrier), (root, "night-2", barrier)])
    df = read_history(root)
    assert sorted(df["run_id"]) == ["night-1", "night-2"]


class _Hook(http.server.BaseHTTPRequestHandler):
    received: typing.ClassVar[list] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_notifier_on_loopback(capsys):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        verdict = {"pair": "p", "date": "2026-11-22", "passed": False, "failing": ["max_nfr [overall]"]}
        notifier = make_notifier(NotifyConfig(kind="webhook", url=f"http://127.0.0.1:{server.server_port}/hook"))
        assert isinstance(notifier, WebhookNotifier)
        assert deliver(notifier, verdict)
        thread.join(timeout=10)
    finally:
        server.server_close()
    assert _Hook.received == [("application/json", verdict)]
    # a dead endpoint is reported, not raised: the verdict stands
    assert not deliver(WebhookNotifier(f"http://127.0.0.1:{server.server_port}/gone", 1.0), verdict)
    assert "notification failed" in capsys.readouterr().err


def test_notify_config_needs_a_target():
    from rcat_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"notify\.url|url is required"):
        parse_config(NotifyConfig, {"kind": "webhook"})


# --------------------------------------------------------------------------------------------------
# whole nights, in-process on the shared Ray session


def _train(model, split, steps, seed, drop_class=None):
    torch.manual_seed(seed)
    x, y = split.images, split.labels
    if drop_class is not None:  # a regressing candidate: it never sees one class
        keep = y != drop_class
        x, y = x[keep], y[keep]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def nightly_models(tmp_path_factory, digits_train):
    folder = tmp_path_factory.mktemp("nightly-models")
    shape = (1, 8, 8)
    paths = {}
    for name, seed, drop in (("production", 0, None), ("good", 1, None), ("regressed", 2, 3)):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = _train(build_architecture("mlp", num_classes=10, input_shape=shape), digits_train, 120, seed, drop)
        paths[name] = folder / f"{name}.pt"
        save_checkpoint(paths[name], model, arch="mlp", num_classes=10, input_shape=shape)
    return paths


def _nightly_yaml(tmp_path: Path, models: dict, candidate: str | None, **over) -> Path:
    raw = {
        "pair": "digits-prod",
        "baseline": {"source": "checkpoint", "name": "production", "path": str(models["production"])},
        "data": {"name": "digits", "split": "test", "limit": 200},
        "attack": {"eps": 0.1, "n_iter": 5},
        "chunk_size": 100,
        "store": str(tmp_path / "store"),
        "compute": {"num_workers": 1, "cpus_per_worker": 0.5, "threads_per_worker": 1},
        "gates": {"max_nfr": 0.05, "per_class": [{"class": 3, "max_nfr": 0.2}]},
        "bootstrap": {"n_resamples": 200},
        "history": str(tmp_path / "history"),
        "out": str(tmp_path / "out"),
        "notify": {"kind": "file", "path": str(tmp_path / "notify.jsonl")},
        **over,
    }
    if candidate:
        raw["candidate"] = {"source": "checkpoint", "name": candidate, "path": str(models[candidate])}
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.ray
def test_regressing_candidate_fails_the_gate(ray_session, nightly_models, tmp_path):
    cfg = _nightly_yaml(tmp_path, nightly_models, "regressed", date="2026-11-21")
    assert main(["nightly", "--config", str(cfg)]) == 1
    verdict = json.loads((tmp_path / "out" / "latest-verdict.json").read_text())
    assert not verdict["passed"]
    assert "max_nfr [class 3 (3)]" in verdict["failing"] and "max_nfr [overall]" in verdict["failing"]
    history = read_history(str(tmp_path / "history"))
    assert history["verdict"].tolist() == ["fail"] and history["date"].tolist() == ["2026-11-21"]
    notified = [json.loads(line) for line in (tmp_path / "notify.jsonl").read_text().splitlines()]
    assert notified[0]["failing"] == verdict["failing"]
    report = Path(verdict["report"])
    assert (report.parent / "trends.png").is_file() and "FAIL" in report.read_text()

    # the same settings with a good candidate pass, and the baseline comes from the store
    good = _nightly_yaml(tmp_path, nightly_models, "good", date="2026-11-22")
    assert main(["nightly", "--config", str(good)]) == 0
    verdict = json.loads((tmp_path / "out" / "latest-verdict.json").read_text())
    assert verdict["passed"] and verdict["baseline"]["chunks_computed"] == 0
    assert read_history(str(tmp_path / "history"))["verdict"].tolist() == ["fail", "pass"]


@pytest.mark.ray
def test_missing_candidate_exits_2_and_leaves_history(ray_session, nightly_models, tmp_path, capsys):
    append_night(str(tmp_path / "history"), "2026-11-20", {"run_id": "earlier", "timestamp": "t", "pair": "p"})
    before = snapshot(tmp_path / "history")
    cfg = _nightly_yaml(tmp_path, nightly_models, None, candidate_dir=str(tmp_path / "no-candidates"))
    assert main(["nightly", "--config", str(cfg)]) == 2
    assert "could not run" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    cfg = _nightly_yaml(tmp_path, nightly_models, None, candidate_dir=str(tmp_path / "empty"))
    assert main(["nightly", "--config", str(cfg)]) == 2
    assert snapshot(tmp_path / "history") == before
    assert not (tmp_path / "store" / "tables").exists()


@pytest.mark.ray
def test_a_candidate_with_sanity_flags_cannot_be_judged(ray_session, nightly_models, tmp_path, capsys):
    """Every hidden unit of the candidate is dead (a large negative bias), so every input gradient is zero:
    AutoAttack's check flags it, and the night stops with exit 2 unless the config accepts the flag."""
    shape = (1, 8, 8)
    model = build_architecture("mlp", num_classes=10, input_shape=shape)
    model.load_state_dict(torch.load(nightly_models["good"], weights_only=True)["state_dict"])
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        first.bias.fill_(-1e3)
    dead = tmp_path / "dead.pt"
    save_checkpoint(dead, model, arch="mlp", num_classes=10, input_shape=shape)
    models = {**nightly_models, "dead": dead}
    cfg = _nightly_yaml(tmp_path, models, "dead", date="2026-11-23")
    assert main(["nightly", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "could not judge" in err and "zero_gradients" in err and "gates.accept_flags" in err
    assert not (tmp_path / "history").exists()

    accepted = _nightly_yaml(
        tmp_path, models, "dead", date="2026-11-23", gates={"max_nfr": 0.05, "accept_flags": ["zero_gradients"]}
    )
    assert main(["nightly", "--config", str(accepted)]) == 1  # judged now: a dead model fails the NFR gate
    verdict = json.loads((tmp_path / "out" / "latest-verdict.json").read_text())
    assert verdict["sanity"]["candidate"]["flags"] == ["zero_gradients"]
    assert verdict["sanity"]["baseline"]["flags"] == []


def test_newest_checkpoint_is_the_candidate(tmp_path, nightly_models):
    import os

    from rcat_ray.nightly.run import newest_checkpoint

    folder = tmp_path / "candidates"
    folder.mkdir()
    for i, name in enumerate(("a.pt", "c.pt", "b.pt")):
        (folder / name).write_bytes(nightly_models["good"].read_bytes())
        os.utime(folder / name, (1_000_000 + i, 1_000_000 + i))
    assert Path(newest_checkpoint(str(folder)).path).name == "b.pt"
