"""The ``reference`` backend: the dense block-diagonal rotation matrix of
:mod:`ropekit.reference` (float64, differentiated by torch itself), behind the backend
entry points. It is the oracle the other backends are tested against."""

from __future__ import annotations

import sys

from .. import reference as _ref
from . import _generic

NAME = "reference"
CHECKS = False
DIFFERENTIABLE = True  # torch differentiates the matrix product (tables included)
TRACEABLE = True
FUSED_QK = False
GATHER = False

available = _ref.available
supports = _ref.supports
rotate = _ref.rotate
apply_matrix = _ref.apply  # (x, cos, sin, layout, conjugate) -> float64 R x


def apply(x, cos, sin, layout, conjugate, inplace, out):
    """Entry point (see :mod:`ropekit.backends`)."""
    return _generic.apply(sys.modules[__name__], x, cos, sin, layout, conjugate, inplace, out)


def apply_qk(q, k, cos, sin, layout, conjugate, inplace):
    return _generic.apply_qk(sys.modules[__name__], q, k, cos, sin, layout, conjugate, inplace)


def apply_gather(q, k, cos_table, sin_table, positions, fmt, layout, conjugate, inplace):
    return _generic.apply_gather(sys.modules[__name__], q, k, cos_table, sin_table, positions, fmt, layout, conjugate, inplace)
