"""The one number formatter: rates as percentages, intervals in brackets, a placeholder when undefined.

Every page and table shows a rate the same way: ``12.34`` (points, two decimals), an interval as
``[11.00, 13.70]``, a difference with its sign. ``None``, NaN, pandas' missing values and infinities are
"undefined" and shown as ``missing``. No imports from the package: any layer may use it.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["finite", "percent", "percent_ci", "percent_interval", "signed"]


def finite(x: Any) -> float | None:
    """``x`` as a float, or None when it is missing, not a number or infinite."""
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def percent(x: Any, digits: int = 2, *, sign: bool = False, unit: str = "", missing: str = "-") -> str:
    """A rate in percent (``0.1234`` -> ``"12.34"``, with ``unit="%"`` -> ``"12.34%"``)."""
    f = finite(x)
    if f is None:
        return missing
    shown = round(f * 100, digits) + 0.0  # no "-0.00" for a zero or a tiny negative
    return f"{shown:{'+' if sign else ''}.{digits}f}{unit}"


def percent_interval(lo: Any, hi: Any, digits: int = 2, *, sign: bool = False, missing: str = "-") -> str:
    """An interval in percent, ``"[11.00, 13.70]"``; ``missing`` when either end is undefined."""
    if finite(lo) is None or finite(hi) is None:
        return missing
    return f"[{percent(lo, digits, sign=sign)}, {percent(hi, digits, sign=sign)}]"


def percent_ci(value: Any, lo: Any, hi: Any, digits: int = 2, *, sign: bool = False, missing: str = "-") -> str:
    """``"12.34 [11.00, 13.70]"``, or the bare value where the interval is undefined."""
    text = percent(value, digits, sign=sign, missing=missing)
    if finite(value) is not None and finite(lo) is not None and finite(hi) is not None:
        text += f" {percent_interval(lo, hi, digits, sign=sign)}"
    return text


def signed(x: Any, digits: int = 2, *, missing: str = "n/a") -> str:
    """A plain number with its sign (margins, logit differences): ``"+1.25"``."""
    f = finite(x)
    return missing if f is None else f"{round(f, digits) + 0.0:+.{digits}f}"
