"""The ``reference`` backend: the dense block-diagonal rotation matrix of
:mod:`ropekit.reference` (float64, differentiated by torch itself), behind the backend
entry points. It is the oracle the other backends are tested against."""

from __future__ import annotations

from .. import reference as _ref

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
