"""AutoAttack's sanity checks of an evaluation (``pyautoattack.checks``), per chunk and per table.

A robust flag is only as good as the attack behind it. AutoAttack warns when its result cannot be trusted:
a randomised model, outputs that look like probabilities, inputs with a zero gradient, Square breaking what
the gradient attacks left robust. Here each check is run with pyautoattack's own function (its warning,
caught by a recording logger, raises the flag) and its counts are kept, so a table's manifest says which
flags its evaluation raised and on how many samples. The checks only read the model: they run under their
own random state and never change the table's rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

#: flag name -> what it means for the table (shown by evaluate, the report and the nightly verdict)
SANITY_FLAGS: dict[str, str] = {
    "randomized": "two clean passes gave different outputs: a randomised model needs AutoAttack's 'rand' version",
    "probability_outputs": "the outputs look like probabilities, not logits: the attacks' losses are then distorted",
    "zero_gradients": "samples with an all-zero input gradient of the DLR loss: gradient attacks cannot move them",
    "square_breaks": "Square broke samples the gradient attacks left robust: the gradient attacks are unreliable",
}
CHECKS_VERSION = 1


class _Recorder:
    """A stand-in for the logger pyautoattack's checks accept: keeps the warnings instead of printing them."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def warning(self, msg: str) -> None:
        self.messages.append(str(msg))

    def pop(self) -> str | None:
        msg = self.messages[-1] if self.messages else None
        self.messages.clear()
        return msg


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Croce and Hein's difference-of-logits-ratio loss, per sample (the loss of APGD-DLR)."""
    ranked, order = logits.sort(dim=1)
    top_is_y = (order[:, -1] == y).float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = ranked[:, -2] * top_is_y + ranked[:, -1] * (1.0 - top_is_y)
    return -(true - other) / (ranked[:, -1] - ranked[:, -3] + 1e-12)


def chunk_checks(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacked: torch.Tensor, num_classes: int
) -> dict[str, Any]:
    """The model checks on one chunk: ``x``/``y`` on the model's device, ``attacked`` the clean-correct samples
    the cascade will attack (the zero-gradient check runs on them, as APGD's does)."""
    from pyautoattack import checks

    if x.shape[0] == 0:  # a chunk outside ``robust_samples``: nothing is attacked, nothing to check
        return {
            "version": CHECKS_VERSION,
            "n": 0,
            "randomized": False,
            "probability_outputs": False,
            "zero_gradients": 0,
            "gradient_checked": 0,
        }
    rec = _Recorder()
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        checks.check_randomized(model, x, y, n=2, logger=rec)
        randomized = rec.pop()
        checks.check_range_output(model, x, logger=rec)
        probabilities = rec.pop()
        zero = 0
        n_grad = int(attacked.sum())
        if n_grad and num_classes >= 3:
            xa = x[attacked.to(x.device)].clone().requires_grad_(True)
            with torch.enable_grad():
                grad = torch.autograd.grad(dlr_loss(model(xa), y[attacked.to(x.device)]).sum(), xa)[0]
            checks.check_zero_gradients(grad, logger=rec)
            rec.pop()
            zero = int((grad.flatten(1).abs().sum(1) == 0).sum())  # the rule check_zero_gradients applies
    return {
        "version": CHECKS_VERSION,
        "n": int(x.shape[0]),
        "randomized": randomized is not None,
        "probability_outputs": probabilities is not None,
        "zero_gradients": zero,
        "gradient_checked": n_grad if num_classes >= 3 else 0,
    }


def _square_accuracies(table: pa.Table, cascade: Sequence[str]) -> dict[str, float]:
    """AutoAttack's robust-accuracy-after-each-attack dictionary, from a table's ``broken_by`` column."""
    attacked = table.filter(pc.is_valid(table.column("robust")))
    n = attacked.num_rows
    correct = int(pc.sum(attacked.column("clean_correct")).as_py() or 0)
    broken = attacked.column("broken_by").to_pylist()
    out = {"clean": correct / n}
    remaining = correct
    for name in cascade:
        remaining -= sum(1 for b in broken if b == name)
        out[name] = remaining / n
    return out


def table_checks(chunks: Iterable[dict[str, Any] | None], table: pa.Table, cascade: Sequence[str]) -> dict[str, Any]:
    """A table's sanity record from its chunks' checks and its rows; ``flags`` names the raised ones.

    Chunks stored before the checks existed carry none: ``chunks_checked`` then counts fewer than ``chunks``.
    """
    from pyautoattack import checks

    chunks = list(chunks)
    done = [c for c in chunks if c]
    record: dict[str, Any] = {
        "version": CHECKS_VERSION,
        "chunks": len(chunks),
        "chunks_checked": len(done),
        "randomized": any(c["randomized"] for c in done),
        "probability_outputs": any(c["probability_outputs"] for c in done),
        "zero_gradients": sum(c["zero_gradients"] for c in done),
        "gradient_checked": sum(c["gradient_checked"] for c in done),
        "square_breaks": None,
    }
    attacked = table.filter(pc.is_valid(table.column("robust")))
    square_flag = False
    if "square" in cascade and attacked.num_rows:
        record["square_breaks"] = sum(1 for b in attacked.column("broken_by").to_pylist() if b == "square")
        rec = _Recorder()
        checks.check_square_sr(_square_accuracies(table, cascade), logger=rec)
        square_flag = rec.pop() is not None
    record["flags"] = [
        name
        for name, raised in (
            ("randomized", record["randomized"]),
            ("probability_outputs", record["probability_outputs"]),
            ("zero_gradients", record["zero_gradients"] > 0),
            ("square_breaks", square_flag),
        )
        if raised
    ]
    return record


def merge_records(records: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One record for tables of the same model and samples attacked with several seeds: the model checks do not
    depend on the seed (the first record's), Square's breaks are the largest of any seed, flags the union."""
    if not records or any(r is None for r in records):
        return None
    merged = dict(records[0])
    breaks = [r["square_breaks"] for r in records if r.get("square_breaks") is not None]
    merged["square_breaks"] = max(breaks) if breaks else None
    merged["flags"] = [name for name in SANITY_FLAGS if any(name in r["flags"] for r in records)]
    return merged


def describe_flags(record: dict[str, Any] | None, *, prefix: bool = True) -> str:
    """One line for a table's sanity record: the raised flags with their counts, or why there is none."""
    if not prefix:
        return describe_flags(record).split(": ", 1)[1]
    if not record:
        return "sanity checks: not run (table stored before they existed)"
    if record["chunks_checked"] < record["chunks"]:
        scope = f" on {record['chunks_checked']} of {record['chunks']} chunks"
    else:
        scope = ""
    if not record["flags"]:
        return f"sanity checks: no flag{scope}"
    parts = []
    for name in record["flags"]:
        if name == "zero_gradients":
            parts.append(f"zero_gradients ({record['zero_gradients']} of {record['gradient_checked']} samples)")
        elif name == "square_breaks":
            parts.append(f"square_breaks ({record['square_breaks']} samples)")
        else:
            parts.append(name)
    return f"sanity flags: {', '.join(parts)}{scope}"
