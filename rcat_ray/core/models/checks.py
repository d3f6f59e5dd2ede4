"""Whether models can run on a selection of data: checked before any attack (evaluate) or training (finetune)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rcat_ray.core.models.loading import LoadedModel
from rcat_ray.errors import EvaluationInputError

if TYPE_CHECKING:
    from rcat_ray.core.data import Split


def validate_pair_inputs(models: list[LoadedModel], split: Split) -> None:
    """Fail before any attack when a model cannot run on this data or models disagree on classes.

    One clean forward of two samples checks the input shape, the number of logits and that the logits are
    finite: a checkpoint with NaN weights would otherwise be attacked and stored as a table of garbage.
    """
    if len(split) == 0:
        raise EvaluationInputError("the data selection is empty")
    classes = {m.num_classes for m in models}
    if len(classes) > 1:
        names = ", ".join(f"{m.name}={m.num_classes}" for m in models)
        raise EvaluationInputError(f"models disagree on the number of classes: {names}")
    probe = split.images[:2]
    for m in models:
        try:
            with torch.no_grad():
                out = m.module.to("cpu").eval()(probe)
        except Exception as err:  # noqa: BLE001 - any failure here means "does not fit the data"
            raise EvaluationInputError(
                f"model '{m.name}' cannot run on {split.dataset} inputs of shape {tuple(probe.shape[1:])}: "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            ) from None
        if out.ndim != 2 or out.shape[1] != m.num_classes:
            raise EvaluationInputError(
                f"model '{m.name}' returns {tuple(out.shape[1:])} logits, expected {m.num_classes}"
            )
        bad_weights = [
            name for name, t in m.module.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()
        ]
        if bad_weights or not torch.isfinite(out).all():
            where = f" (non-finite values in {', '.join(bad_weights[:3])}{', ...' if len(bad_weights) > 3 else ''})"
            raise EvaluationInputError(
                f"model '{m.name}' gives non-finite logits (NaN or inf) on clean {split.dataset} inputs"
                f"{where if bad_weights else ''}: its weights are probably damaged"
            )
        if m.num_classes != split.num_classes:
            raise EvaluationInputError(
                f"model '{m.name}' has {m.num_classes} classes but {split.dataset} has {split.num_classes}"
            )
