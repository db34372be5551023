"""The number checks every constructor shares: one rule for ints, one for reals.

A config value is accepted or refused the same way in every field and every scheme:

- ints: a Python/NumPy/0-d-tensor integer, or a float with an integral value (JSON files
  sometimes store ``4096.0``); never a bool, never a string;
- reals: any real number (int, float, NumPy scalar), finite; never a bool, never a string;
- a string, even ``"10000"``, is refused with a message that says it is a string: config
  files must store numbers as JSON numbers (transformers does not convert them either).

Every refusal is a :class:`~ropekit.RopeError` in the house format, including values too
large for a float (``10**400``), which Python itself would report as ``OverflowError``.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch

from ._errors import fail

__all__ = ["integer", "real", "flag", "device", "describe"]


def describe(value: Any) -> str:
    """``repr`` of a refused value, saying when it is a string (``'8.0'`` looks like a number)."""
    if isinstance(value, (str, bytes)):
        return f"the string {value!r}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _string_fix(value: Any, fix: str) -> str:
    if isinstance(value, (str, bytes)):
        return "pass a number, not a string (in a config.json: the number without quotes)"
    return fix


def integer(name: str, value: Any, *, minimum: int = 1, maximum: Optional[int] = None, fix: str = "") -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``, else a RopeError naming ``name``."""
    fix = fix or f"pass the checkpoint's {name}"
    rng = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
    out: Optional[int] = None
    if not isinstance(value, (bool, str, bytes)) and not (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        if isinstance(value, float):
            if math.isfinite(value) and value.is_integer():
                out = int(value)
        else:
            try:
                out = operator.index(value)
            except (TypeError, ValueError, RuntimeError, NotImplementedError):  # not an integer; meta tensors
                out = None
    if out is None or out < minimum or (maximum is not None and out > maximum):
        raise fail(f"{name} {rng}", describe(value), _string_fix(value, fix))
    return out


def real(
    name: str,
    value: Any,
    *,
    minimum: Optional[float] = None,
    above: Optional[float] = None,
    maximum: Optional[float] = None,
    fix: str = "",
) -> float:
    """``value`` as a finite ``float`` with ``value >= minimum`` / ``value > above`` / ``value <= maximum``."""
    fix = fix or f"pass the checkpoint's {name}"
    lo = f"[{minimum:g}" if minimum is not None else (f"({above:g}" if above is not None else None)
    if lo is not None and maximum is not None:
        what = f"{name} a finite number in {lo}, {maximum:g}]"
    elif lo is not None:
        what = f"{name} a finite number {'>=' if minimum is not None else '>'} {lo[1:]}"
    elif maximum is not None:
        what = f"{name} a finite number <= {maximum:g}"
    else:
        what = f"{name} a finite number"
    out: Optional[float] = None
    if not isinstance(value, (bool, str, bytes)) and not isinstance(value, complex):
        try:
            out = float(value)
        except (TypeError, ValueError, OverflowError, RuntimeError, NotImplementedError):
            out = None  # not a number, an int too large for a float (10**400), a tensor without one value
    if (
        out is None
        or not math.isfinite(out)
        or (minimum is not None and out < minimum)
        or (above is not None and out <= above)
        or (maximum is not None and out > maximum)
    ):
        raise fail(what, describe(value), _string_fix(value, fix))
    return out


def flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool (NumPy bools too), else a RopeError: ``"false"`` is not False."""
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_":  # numpy.bool_ without importing numpy
        return bool(value)
    raise fail(f"{name} True or False", describe(value), f"pass {name}=True or {name}=False")


def device(name: str, value: Any):
    """``torch.device(value)`` (``None`` stays ``None``), a RopeError for a name torch does not know."""
    import torch

    if value is None:
        return value
    if not isinstance(value, torch.device):
        try:
            value = torch.device(value)
        except (RuntimeError, TypeError, ValueError):
            raise fail(f"{name} a torch.device, e.g. 'cpu' or 'cuda:0'", describe(value),
                       f"pass {name}='cpu' or a torch.device") from None
    if value.type == "cuda" and not torch.cuda.is_available():
        raise fail(f"{name} a device this machine has", f"{name}={str(value)!r}, but torch has no CUDA device here "
                   f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})",
                   f"pass {name}='cpu', or install a CUDA build of torch on a machine with a GPU")
    return value
