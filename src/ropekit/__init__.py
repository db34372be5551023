"""ropekit: Rotary Position Embedding for PyTorch — exact tables, every scaling scheme,
both pair layouts, fused backends that agree with one oracle.

Shapes: ``b`` batch, ``s`` sequence, ``h`` heads, ``d`` head dim, ``r`` rotary dim,
``t`` packed tokens. Tables are half width: ``[..., r/2]``.

Quickstart:
    >>> import torch, ropekit
    >>> cfg = ropekit.RopeConfig(head_dim=64, base=10000.0)
    >>> rope = ropekit.RotaryEmbedding(cfg)
    >>> q, k = torch.randn(1, 16, 4, 64), torch.randn(1, 16, 4, 64)
    >>> q, k = rope(q, k)
"""

from __future__ import annotations

from . import attention, backends, hf, multi_axis, presets, scaling, serving, variants
from ._errors import RopeError
from .config import LAYOUTS, RopeConfig
from .convert import convert_layout
from .functional import apply_qk_norm_rotary, apply_rotary, apply_rotary_gather, apply_rotary_qk, rerotate
from .modules import RotaryEmbedding
from .multi_axis import MultiAxisRotaryEmbedding, apply_rotary_mrope, mrope_tables, multi_axis_cos_sin
from .positions import FORMATS, positions_from_cu_seqlens
from .serving import apply_rotary_cache, rerotate_cache
from .tables import angles, cos_sin, from_full_width, to_full_width

__version__ = "0.1.0"

__all__ = [
    "RopeError",
    "RopeConfig",
    "LAYOUTS",
    "FORMATS",
    "cos_sin",
    "angles",
    "to_full_width",
    "from_full_width",
    "apply_rotary",
    "apply_rotary_qk",
    "apply_rotary_gather",
    "apply_qk_norm_rotary",
    "rerotate",
    "apply_rotary_cache",
    "rerotate_cache",
    "RotaryEmbedding",
    "convert_layout",
    "positions_from_cu_seqlens",
    "multi_axis_cos_sin",
    "mrope_tables",
    "apply_rotary_mrope",
    "MultiAxisRotaryEmbedding",
    "backends",
    "scaling",
    "serving",
    "multi_axis",
    "variants",
    "attention",
    "hf",
    "presets",
]
