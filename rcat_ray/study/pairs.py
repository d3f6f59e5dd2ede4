"""Which old -> new pairs a study compares: the listed ones, or the paper's rule over every model.

The paper's rule: an update is worth studying when the new model is better than the old one both on clean
and on robust accuracy, measured on validation (never on the test data the table reports).
"""

from __future__ import annotations

from typing import Any

from rcat_ray.study.config import StudyPair


def admitted_pairs(accuracy: dict[str, dict[str, Any]]) -> list[StudyPair]:
    """Every (old, new) with ``acc`` and ``rob_acc`` of new strictly above old's, in the models' order.

    ``accuracy``: model name -> {"acc", "rob_acc"} on the choice validation, in the config's order.
    """
    names = list(accuracy)
    out = []
    for old in names:
        for new in names:
            a, b = accuracy[old], accuracy[new]
            if old != new and b["acc"] > a["acc"] and b["rob_acc"] > a["rob_acc"]:
                out.append(StudyPair(old=old, new=new))
    return out
