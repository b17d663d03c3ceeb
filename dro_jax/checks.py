"""Type and range checks for configuration fields: one line naming the field."""
from __future__ import annotations

import math
import numbers


def number(name: str, value, *, above: float | None = None, at_least: float | None = None,
           below: float | None = None) -> float:
    """A finite real number (not a bool or string) within the given bounds."""
    if getattr(value, "shape", None) == () and getattr(getattr(value, "dtype", None), "kind", "") in ("f", "i", "u"):
        value = value.item()  # a numpy or JAX scalar array
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (below is None or value < below)
    if not ok:
        bounds = [f"> {above:g}" if above is not None else "", f">= {at_least:g}" if at_least is not None else "",
                  f"< {below:g}" if below is not None else ""]
        want = " and ".join(b for b in bounds if b)
        raise ValueError(f"{name} must be a finite number{' ' + want if want else ''}, got {value!r}")
    return float(value)


def integer(name: str, value, *, at_least: int | None = None) -> int:
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or (at_least is not None and value < at_least)):
        want = f" >= {at_least}" if at_least is not None else ""
        raise ValueError(f"{name} must be an integer{want}, got {value!r}")
    return int(value)


def boolean(name: str, value) -> bool:
    """True or False only: gin would pass the string 'False', which Python reads as true."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value
