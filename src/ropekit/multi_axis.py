"""Multi-axis rotary embeddings: M-RoPE (Qwen2-VL family), axial N-D RoPE for images and
video, position grids, and the M-RoPE position ids of mixed text/image/video sequences.

Every scheme here reduces to "rotary pair ``j`` rotates by angle ``φ_j``", so each returns
half-width ``(cos, sin)`` tables ``[..., r/2]`` that :func:`ropekit.apply_rotary` (any
backend) applies. What differs is where ``φ_j`` comes from. Positions carry one value per
axis, ``[..., n_axes]`` (e.g. ``(t, h, w)``), and pair ``j`` belongs to one axis
``a(j)``:

    φ_j = p[a(j)] · ω_j

- **M-RoPE** (Qwen2-VL, arXiv 2409.12191): ``ω_j = cfg.inv_freq()[j]``, the ordinary
  1-D spectrum; ``sections`` says how many consecutive pairs each axis owns (chunked,
  Qwen2-VL / Qwen2.5-VL) or pairs cycle over the axes (interleaved, Qwen3-VL). A text
  token has the same position on every axis, so for text M-RoPE *is* 1-D RoPE.
- **Axial** (ViT / EVA-02 / Qwen2-VL's vision tower, rotary-embedding-torch): each axis
  has its own spectrum over its own block of pairs, language-style ``base^(-i/n_a)`` or
  pixel-style ``π · linspace(1, max_freq/2, n_a)``.

Because ``q_mᵀ R(φ(m))ᵀ R(φ(n)) k_n`` depends on ``φ(m) - φ(n) = (p_m - p_n)[a(j)] ω_j``,
scores depend only on the per-axis position differences (relative invariance per axis).

Shapes: ``b`` batch, ``s`` sequence, ``h`` heads, ``d`` head dim, ``r`` rotary dim;
``n_axes`` the number of position axes.

Precision: angles are float64 products of the (exact) float64 positions and float64
frequencies, rounded once to the table dtype, as in :func:`ropekit.cos_sin`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ._checks import describe, flag, integer, real
from ._checks import device as check_device
from ._errors import fail
from ._tensor_checks import host_readable
from .config import CPU, MAX_EXACT_POSITION, RopeConfig, check_head_width, check_seq_len
from .tables import _default_seq_len, check_cfg, check_dtype, check_positions, check_table, cos_sin_f64

__all__ = [
    "pair_axes",
    "multi_axis_angles",
    "multi_axis_cos_sin",
    "mrope_tables",
    "apply_rotary_mrope",
    "MultiAxisRotaryEmbedding",
    "AxialRope",
    "grid_positions",
    "image_positions",
    "video_positions",
    "with_special_tokens",
    "mrope_positions",
    "mrope_decode_positions",
]

Tables = Tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- sections
def _check_sections(sections: Sequence[int], n_pairs: Optional[int]) -> Tuple[int, ...]:
    try:
        secs = tuple(sections) if not isinstance(sections, (str, bytes)) else None
    except TypeError:
        secs = None
    fix = "pass e.g. [16, 24, 24] (Qwen2-VL's mrope_section) for r/2 = 64"
    if not secs:
        raise fail("sections a sequence of non-negative ints (rotary pairs per axis)", repr(sections), fix)
    secs = tuple(integer("sections entries (rotary pairs per axis)", v, minimum=0, maximum=1 << 16, fix=fix) for v in secs)
    if n_pairs is not None and sum(secs) != n_pairs:
        raise fail(
            f"sections summing to r/2 = {n_pairs} (one entry per axis, in rotary pairs)",
            f"{list(secs)} (sum {sum(secs)})",
            "sections count pairs, not dims: halve a per-axis dim count, and make them add up to rotary_dim // 2",
        )
    return secs


def pair_axes(sections: Sequence[int], *, interleaved: bool = False) -> torch.Tensor:
    """The axis each rotary pair takes its position from: int64 ``[r/2]`` on CPU, ``r/2 = sum(sections)``.

    ``interleaved=False`` (chunked, Qwen2-VL / Qwen2.5-VL): the first ``sections[0]`` pairs
    belong to axis 0, the next ``sections[1]`` to axis 1, and so on.

    ``interleaved=True`` (Qwen3-VL, transformers' ``Qwen3VLTextRotaryEmbedding``): with
    ``n = len(sections)``, axis ``a >= 1`` takes the pairs ``j ≡ a (mod n)`` with
    ``j < n·sections[a]``, and axis 0 takes every other pair. With Qwen3-VL's
    ``[24, 20, 20]`` that is ``T H W`` repeated 20 times, then ``T T T T`` for the last
    four (lowest-frequency) pairs. The rule hands axis ``a`` exactly ``sections[a]`` pairs
    only when ``a + n·(sections[a] - 1) < r/2`` for every ``a >= 1``; other sections (e.g.
    ``[16, 24, 24]``, which transformers silently miscounts) raise a RopeError.

    Example:
        >>> pair_axes([2, 1, 1]).tolist()
        [0, 0, 1, 2]
        >>> pair_axes([2, 1, 1], interleaved=True).tolist()
        [0, 1, 2, 0]
    """
    secs = _check_sections(sections, None)
    total, n = sum(secs), len(secs)
    if not flag("interleaved", interleaved):
        return torch.repeat_interleave(
            torch.arange(n, device=CPU), torch.tensor(secs, dtype=torch.int64, device=CPU), output_size=total
        )
    out = torch.zeros(total, dtype=torch.int64, device=CPU)
    for a in range(1, n):
        if secs[a] and a + n * (secs[a] - 1) >= total:
            raise fail(
                f"interleaved sections where axis {a}'s {secs[a]} pairs fit the cycle "
                f"(a + n*(sections[a]-1) = {a + n * (secs[a] - 1)} < r/2 = {total})",
                f"sections {list(secs)}",
                "give axis 0 at least as many pairs as the others (e.g. Qwen3-VL's [24, 20, 20]) or use interleaved=False",
            )
        out[a : n * secs[a] : n] = a
    return out


def _check_axis_positions(positions: torch.Tensor, n_axes: int, *, allow_float: bool) -> torch.Tensor:
    if not isinstance(positions, torch.Tensor):
        raise fail(
            f"positions a tensor [..., n_axes={n_axes}]",
            type(positions).__name__,
            "build them with ropekit.multi_axis.grid_positions / mrope_positions, or torch.as_tensor",
        )
    if positions.dim() < 1 or positions.shape[-1] != n_axes:
        raise fail(
            f"positions of shape [..., n_axes] with n_axes = len(sections) = {n_axes}",
            f"shape {tuple(positions.shape)}",
            "put the axes last; transformers' M-RoPE ids (3, b, s) become [b, s, 3] with position_ids.movedim(0, -1)",
        )
    if allow_float and positions.dtype.is_floating_point:
        # (no value check where there are no values to read: meta tensors, torch.compile, vmap)
        if positions.numel() and host_readable(positions) and not bool(torch.isfinite(positions).all()):
            raise fail("finite positions", "inf or nan", "check the grid scaling factors")
        return positions
    return check_positions(positions)


def multi_axis_angles(positions: torch.Tensor, axes: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``φ[..., j] = positions[..., axes[j]] · freqs[..., j]`` in float64.

    Args:
        positions: ``[..., n_axes]`` integer (exact) or floating (e.g. rescaled grids).
        axes: int64 ``[r/2]``, the axis of each pair (:func:`pair_axes`).
        freqs: ``[r/2]`` (or broadcastable, e.g. ``[h, r/2]`` against ``positions
            [..., 1, n_axes]``), converted to float64.

    Returns:
        float64 angles ``[..., r/2]`` (broadcast of the two leading shapes).

    Raises RopeError for a non-tensor or complex/bool input, ``axes`` that is not a 1-D
    integer tensor of values in ``[0, n_axes)``, or ``freqs`` whose last dim is not
    ``len(axes)``.
    """
    fix = "build axes with pair_axes(sections) and freqs of the same length r/2 (e.g. cfg.inv_freq())"
    for name, t in (("positions", positions), ("axes", axes), ("freqs", freqs)):
        if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.is_complex() or t.dtype == torch.bool:
            got = f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else describe(t)
            raise fail(f"{name} a real tensor with at least one dim", got, fix)
    n_axes = positions.shape[-1]
    if axes.dim() != 1 or axes.dtype.is_floating_point:
        raise fail("axes an integer tensor [r/2] (the axis of each pair)", f"shape {tuple(axes.shape)} {axes.dtype}", fix)
    if freqs.shape[-1] != axes.shape[0]:
        raise fail(f"freqs [..., r/2] with r/2 = len(axes) = {axes.shape[0]}", f"shape {tuple(freqs.shape)}", fix)
    if axes.numel() and host_readable(axes):
        lo, hi = (int(v) for v in torch.aminmax(axes.to(torch.int64)))
        if lo < 0 or hi >= n_axes:
            raise fail(f"axes values in [0, n_axes) = [0, {n_axes}) (positions [..., n_axes])",
                       f"values from {lo} to {hi}", fix)
    p = positions.to(torch.float64)  # integers up to 2^53 stay exact
    picked = p.index_select(-1, axes.to(p.device))  # [..., r/2]
    return picked * freqs.to(device=p.device, dtype=torch.float64)


# --------------------------------------------------------------------------- M-RoPE tables
def multi_axis_cos_sin(
    cfg: RopeConfig,
    positions: torch.Tensor,
    sections: Sequence[int],
    *,
    interleaved: bool = False,
    dtype: torch.dtype = torch.float32,
    seq_len: Optional[int] = None,
    attention_scaling: bool = True,
) -> Tables:
    """Half-width M-RoPE tables: pair ``j`` keeps frequency ``cfg.inv_freq()[j]`` and takes
    its position from axis ``pair_axes(sections, interleaved)[j]``.

    ``φ_j = p[a(j)] · θ_j`` — exactly Qwen2-VL's multimodal RoPE (arXiv 2409.12191) with
    ``sections = mrope_section`` (chunked) and Qwen3-VL's interleaved M-RoPE
    (``interleaved=True``).

    Args:
        cfg: the 1-D rotary configuration (base, rotary dim, scaling).
        positions: integer ``[..., n_axes]``, ``n_axes = len(sections)``; transformers'
            ``position_ids`` of shape ``(3, b, s)`` are ``position_ids.movedim(0, -1)``.
        sections: rotary pairs per axis, summing to ``r/2`` (e.g. ``[16, 24, 24]``).
        interleaved: pair-to-axis rule, see :func:`pair_axes`.
        dtype: table dtype; angles are float64 and rounded once.
        seq_len: for length-dependent scaling (default ``max(positions) + 1``).
        attention_scaling: fold ``cfg.attention_factor`` in, as transformers does.

    Returns:
        ``(cos, sin)``, each ``[..., r/2]`` (``positions.shape[:-1] + (r/2,)``).

    Example:
        >>> import ropekit
        >>> cfg = ropekit.RopeConfig(head_dim=16)
        >>> pos = torch.tensor([[0, 0, 0], [1, 0, 1], [1, 1, 0]])     # [s, 3] (t, h, w)
        >>> cos, sin = multi_axis_cos_sin(cfg, pos, [2, 3, 3])        # [s, r/2]
        >>> q = torch.randn(1, 3, 2, 16)                              # [b, s, h, d]
        >>> ropekit.apply_rotary(q, cos[:, None], sin[:, None]).shape
        torch.Size([1, 3, 2, 16])
    """
    check_cfg(cfg)
    check_dtype(dtype)
    secs = _check_sections(sections, cfg.n_pairs)
    positions = _check_axis_positions(positions, len(secs), allow_float=False)
    seq_len = check_seq_len(seq_len)
    attention_scaling = flag("attention_scaling", attention_scaling)
    if seq_len is None:
        seq_len = _default_seq_len(cfg, positions)
    axes = pair_axes(secs, interleaved=interleaved)
    ang = multi_axis_angles(positions, axes, cfg.inv_freq(seq_len))  # float64 [..., r/2]
    cos, sin = cos_sin_f64(ang)
    if attention_scaling and cfg.attention_factor != 1.0:
        cos, sin = cos * cfg.attention_factor, sin * cfg.attention_factor
    return cos.to(dtype), sin.to(dtype)


def mrope_tables(cos: torch.Tensor, sin: torch.Tensor, sections: Sequence[int], *, interleaved: bool = False) -> Tables:
    """Combine precomputed per-axis tables into M-RoPE tables, as Qwen2-VL does.

    ``out[..., j] = tables[a(j), ..., j]`` with ``a = pair_axes(sections, interleaved)``:
    pair ``j`` takes its cos/sin from the table of its axis. This is Qwen2-VL's
    ``apply_multimodal_rotary_pos_emb`` (``mrope_section`` chunks taken from axis
    ``i % 3``), written on half-width tables; Qwen3-VL with ``interleaved=True``.

    Args:
        cos, sin: ``[n_axes, ..., r/2]`` per-axis half-width tables (e.g. ``[3, b, s, r/2]``:
            cos/sin of the temporal, height and width positions); full-width ``[3, ..., r]``
            tables convert with ``ropekit.from_full_width``.
        sections: rotary pairs per axis (``mrope_section``), summing to ``r/2``.
        interleaved: Qwen3-VL's pair-to-axis rule (see :func:`pair_axes`).

    Returns:
        ``(cos, sin)``, each ``[..., r/2]`` (the leading axis dim removed), differentiable
        in the tables.

    Example:
        >>> import ropekit
        >>> cfg = ropekit.RopeConfig(head_dim=16)
        >>> pos = torch.tensor([[0, 1, 2], [0, 0, 1], [0, 1, 0]])      # [3, s] (t, h, w)
        >>> c3, s3 = ropekit.cos_sin(cfg, pos)                          # [3, s, r/2]
        >>> cos, sin = mrope_tables(c3, s3, [2, 3, 3])                  # [s, r/2]
        >>> ref, _ = multi_axis_cos_sin(cfg, pos.T, [2, 3, 3])
        >>> bool(torch.equal(cos, ref))
        True
    """
    secs = _check_sections(sections, None)
    n = len(secs)
    for nm, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[0] != n or not t.dtype.is_floating_point:
            got = f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise fail(
                f"{nm} a float tensor [n_axes = len(sections) = {n}, ..., r/2] (one table per axis)",
                got,
                "stack the per-axis tables first (transformers' M-RoPE cos has shape [3, b, s, r])",
            )
    if cos.shape != sin.shape or cos.device != sin.device or cos.dtype != sin.dtype:
        raise fail("cos and sin of one shape, dtype and device",
                   f"{tuple(cos.shape)} {cos.dtype} on {cos.device} and {tuple(sin.shape)} {sin.dtype} on {sin.device}",
                   "build both from the same positions, in one dtype")
    if cos.shape[-1] != sum(secs):
        hint = ("these look like full-width tables: convert with ropekit.from_full_width(cos, layout)"
                if cos.shape[-1] == 2 * sum(secs) else "sections count rotary pairs and must sum to the table width r/2")
        raise fail(f"tables of width sum(sections) = {sum(secs)} (half width r/2)", f"width {cos.shape[-1]}", hint)
    axes = pair_axes(secs, interleaved=interleaved).to(cos.device)  # [r/2]
    idx = axes.view((1,) * (cos.dim() - 1) + (-1,)).expand((1,) + tuple(cos.shape[1:]))  # [1, ..., r/2]
    return torch.gather(cos, 0, idx)[0], torch.gather(sin, 0, idx)[0]


def apply_rotary_mrope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mrope_section: Sequence[int],
    *,
    interleaved: bool = False,
    format: str = "bshd",
    layout: str = "half",
    inplace: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE of q and k from precomputed per-axis tables (the call Liger's M-RoPE takes).

    The tables are combined by :func:`mrope_tables` and applied by
    :func:`ropekit.apply_rotary_qk` (every backend, autograd, in place).

    Args:
        q: ``[b, s, hq, d]`` (or ``bhsd``/``sbhd`` by ``format``; ``[t, hq, d]`` for ``thd``).
        k: the same format with ``hk`` heads.
        cos, sin: ``[3, b, s, r/2]``, ``[3, 1, s, r/2]`` or ``[3, s, r/2]`` (``[3, t, r/2]``
            for ``thd``) half-width per-axis tables; the leading dim is ``len(mrope_section)``.
        mrope_section: rotary pairs per axis, summing to ``r/2`` (e.g. ``[16, 24, 24]``).
        interleaved, format, layout, inplace, backend: as in :func:`mrope_tables` and
            :func:`ropekit.apply_rotary_qk`.

    Returns:
        ``(q_rot, k_rot)``.

    Example:
        >>> import ropekit
        >>> cfg = ropekit.RopeConfig(head_dim=16)
        >>> pos = torch.randint(0, 9, (3, 2, 5))                        # [3, b, s]
        >>> c3, s3 = ropekit.cos_sin(cfg, pos)                          # [3, b, s, r/2]
        >>> q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 1, 16)   # [b, s, h, d]
        >>> q2, k2 = apply_rotary_mrope(q, k, c3, s3, [2, 3, 3])
        >>> q2.shape, k2.shape
        (torch.Size([2, 5, 4, 16]), torch.Size([2, 5, 1, 16]))
    """
    flag("inplace", inplace)
    from .functional import apply_rotary_qk
    from .positions import split_qk_format
    from .positions import table_view as _table_view

    b, s = split_qk_format(q, k, format)
    c, sn = mrope_tables(cos, sin, mrope_section, interleaved=interleaved)  # [..., r/2]
    ok = [(s,)] if format == "thd" else list(dict.fromkeys([(s,), (b, s), (1, s)]))
    if tuple(c.shape[:-1]) not in ok:
        raise fail(
            f"per-axis tables of shape {' or '.join(str([len(tuple(mrope_section)), *o, 'r/2']) for o in ok)} for q in format {format!r}",
            f"shape {list(cos.shape)}",
            "one table row per token and axis (transformers' [3, b, s, r] cos: from_full_width, then pass as is)",
        )
    if c.dim() == 3 and c.shape[0] == 1:  # [1, s, r/2]: shared by the batch, as [s, r/2]
        c, sn = c[0], sn[0]
    pdims = c.dim() - 1
    c, sn = _table_view(c, format, pdims), _table_view(sn, format, pdims)
    return apply_rotary_qk(q, k, c, sn, layout=layout, inplace=inplace, backend=backend)


# --------------------------------------------------------------------------- axial N-D RoPE
_FREQ_KINDS = ("lang", "pixel")


@dataclasses.dataclass(frozen=True)
class AxialRope:
    """Axial N-D RoPE: the rotary pairs are split among the axes and each axis rotates its
    block with its own spectrum (ViT / EVA-02 2-D RoPE, Qwen2-VL's vision tower, 3-D video RoPE).

    For axis ``a`` owning ``n_a = sections[a]`` consecutive pairs (chunked layout, axis 0
    first), pair ``i`` of that block rotates by ``p_a · ω_{a,i}`` with

    - ``freqs="lang"``: ``ω_{a,i} = base^(-2i / (2 n_a))``, the 1-D RoPE spectrum of a
      head of size ``2 n_a`` (EVA-02, Qwen2-VL's ``VisionRotaryEmbedding``);
    - ``freqs="pixel"``: ``ω_{a,i} = π · linspace(1, max_freq/2, n_a)[i]``
      (rotary-embedding-torch ``freqs_for="pixel"``), meant for coordinates in ``[-1, 1]``
      (``grid_positions(..., normalize=True)``).

    Args:
        head_dim: ``d``.
        n_axes: number of position axes (2 for images, 3 for video).
        rotary_dim: ``r`` (even, ``<= d``); default ``d``. Dims past ``r`` pass through.
        sections: pairs per axis, summing to ``r/2``; default an even split (the first
            axes get one more pair when ``r/2`` is not divisible; it needs ``n_axes <= r/2``).
        freqs: ``"lang"`` or ``"pixel"``.
        base: base of the ``"lang"`` spectrum.
        max_freq: top of the ``"pixel"`` spectrum.
        layout: pair layout the tables are meant for (``"half"`` / ``"interleaved"``);
            tables are half width, so this is only recorded for :meth:`apply`.

    Example:
        >>> import ropekit
        >>> rope = AxialRope(head_dim=32, n_axes=2)              # 2-D, 8 pairs per axis
        >>> pos = image_positions(4, 5)                           # [20, 2] (h, w)
        >>> cos, sin = rope.cos_sin(pos, n_special=1)             # CLS first: [21, 16]
        >>> q = torch.randn(2, 21, 3, 32)                         # [b, s, h, d]
        >>> ropekit.apply_rotary(q, cos[:, None], sin[:, None]).shape
        torch.Size([2, 21, 3, 32])
    """

    head_dim: int
    n_axes: int = 2
    rotary_dim: Optional[int] = None
    sections: Optional[Tuple[int, ...]] = None
    freqs: str = "lang"
    base: float = 10000.0
    max_freq: float = 10.0
    layout: str = "half"

    def __post_init__(self) -> None:
        # reuse RopeConfig's validation of head_dim / rotary_dim / layout / base
        cfg = RopeConfig(self.head_dim, base=self.base, rotary_dim=self.rotary_dim, layout=self.layout)
        object.__setattr__(self, "rotary_dim", cfg.rotary_dim)
        object.__setattr__(self, "base", cfg.base)
        n = integer("n_axes", self.n_axes, maximum=64, fix="use 2 for images (h, w) or 3 for video (t, h, w)")
        object.__setattr__(self, "n_axes", n)
        if self.sections is None:
            if n > cfg.n_pairs:
                raise fail(
                    f"n_axes <= rotary_dim / 2 = {cfg.n_pairs} (the default split gives every axis at least one pair)",
                    f"n_axes={n}",
                    "use a larger rotary_dim, fewer axes, or explicit sections= (an axis with 0 pairs ignores its positions)",
                )
            q, rem = divmod(cfg.n_pairs, n)
            secs: Tuple[int, ...] = tuple(q + (a < rem) for a in range(n))
        else:
            secs = _check_sections(self.sections, cfg.n_pairs)
            if len(secs) != n:
                raise fail(f"{n} sections (one per axis)", f"{len(secs)}: {list(secs)}", "give one pair count per axis")
        object.__setattr__(self, "sections", secs)
        if self.freqs not in _FREQ_KINDS:
            raise fail(f"freqs in {_FREQ_KINDS}", repr(self.freqs), 'use "lang" (base^-i/n) or "pixel" (linear, for [-1, 1] coords)')
        mf = real("max_freq", self.max_freq, above=0, fix="rotary-embedding-torch uses max_freq=10 for pixel freqs")
        object.__setattr__(self, "max_freq", mf)

    @property
    def n_pairs(self) -> int:
        return self.rotary_dim // 2  # type: ignore[operator]

    def axes(self) -> torch.Tensor:
        """int64 ``[r/2]``: the axis of each pair (chunked blocks)."""
        return pair_axes(self.sections, interleaved=False)  # type: ignore[arg-type]

    def inv_freq(self) -> torch.Tensor:
        """float64 ``[r/2]`` on CPU: each axis's spectrum, concatenated in axis order."""
        parts = []
        for n_a in self.sections:  # type: ignore[union-attr]
            i = torch.arange(n_a, dtype=torch.float64, device=CPU)
            if self.freqs == "lang":
                # base^(-2i/(2 n_a)): the spectrum of a 1-D RoPE over this axis's 2 n_a dims
                parts.append(torch.pow(torch.tensor(self.base, dtype=torch.float64, device=CPU), -i / max(n_a, 1)))
            else:
                top = self.max_freq / 2
                lin = 1.0 + (top - 1.0) * i / (n_a - 1) if n_a > 1 else torch.ones(n_a, dtype=torch.float64, device=CPU)
                parts.append(math.pi * lin)
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=CPU)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """float64 ``[..., r/2]`` angles for positions ``[..., n_axes]`` (integer or float)."""
        positions = _check_axis_positions(positions, self.n_axes, allow_float=True)
        return multi_axis_angles(positions, self.axes(), self.inv_freq())

    def cos_sin(self, positions: torch.Tensor, *, n_special: int = 0, dtype: torch.dtype = torch.float32) -> Tables:
        """Half-width tables for ``positions [..., t, n_axes]`` -> ``[..., n_special + t, r/2]``.

        ``n_special`` leading rows (CLS / register tokens) are ``cos = 1, sin = 0``: those
        tokens are not rotated. Positions may be float (rescaled / normalised grids).
        """
        check_dtype(dtype)
        ang = self.angles(positions)
        cos, sin = cos_sin_f64(ang)
        return with_special_tokens(cos.to(dtype), sin.to(dtype), n_special)

    def apply(
        self, x: torch.Tensor, positions: torch.Tensor, *, n_special: int = 0, backend: str = "auto"
    ) -> torch.Tensor:
        """Rotate ``x [b, s, h, d]`` with ``s = n_special + t`` and ``positions [t, n_axes]``
        (or ``[b, t, n_axes]``), moved to ``x``'s device. Tables are float32 (float64 for
        float64 ``x``)."""
        from .functional import apply_rotary

        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            got = str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
            raise fail("x a real floating tensor [b, s, h, d]", got, "convert x to float")
        check_head_width(self, x=x)
        if isinstance(positions, torch.Tensor):  # (as MultiAxisRotaryEmbedding: positions follow x)
            if positions.device.type == "meta" and x.device.type != "meta":
                raise fail(f"positions with values (x is on {x.device})", "positions on the meta device",
                           "build the positions on x's device (e.g. grid_positions(..., device=x.device))")
            positions = positions.to(x.device)
        tdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self.cos_sin(positions, n_special=n_special, dtype=tdt)
        return apply_rotary(x, cos[..., None, :], sin[..., None, :], layout=self.layout, backend=backend)


def with_special_tokens(cos: torch.Tensor, sin: torch.Tensor, n_special: int) -> Tables:
    """Prepend ``n_special`` identity rows (``cos = 1, sin = 0``) on the token dim (``-2``).

    ``[..., t, r/2]`` -> ``[..., n_special + t, r/2]``: the special tokens (CLS, registers)
    pass through unrotated while the patch tokens keep their tables.
    """
    if isinstance(n_special, bool) or not isinstance(n_special, int) or n_special < 0:
        raise fail("n_special a non-negative int", repr(n_special), "pass the number of leading CLS/register tokens")
    check_table(cos)
    check_table(sin)
    if cos.shape != sin.shape or cos.dtype != sin.dtype or cos.device != sin.device:
        raise fail("cos and sin of one shape, dtype and device",
                   f"{tuple(cos.shape)} {cos.dtype} on {cos.device} and {tuple(sin.shape)} {sin.dtype} on {sin.device}",
                   "pass the two tables of one cos_sin call")
    if n_special == 0:
        return cos, sin
    if cos.dim() < 2:
        raise fail("tables [..., t, r/2]", f"shape {tuple(cos.shape)}", "build tables from positions [t, n_axes]")
    shape = list(cos.shape)
    shape[-2] = n_special
    one = cos.new_ones(shape)  # [..., n_special, r/2]
    zero = sin.new_zeros(shape)
    return torch.cat((one, cos), dim=-2), torch.cat((zero, sin), dim=-2)


# --------------------------------------------------------------------------- grids
#: Largest patch grid :func:`grid_positions` builds (tokens): far above any image or video.
MAX_GRID_TOKENS = 1 << 32


def grid_positions(
    shape: Sequence[int],
    *,
    scale: Union[None, float, Sequence[float]] = None,
    reference_shape: Optional[Sequence[int]] = None,
    normalize: bool = False,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """Positions of a patch grid, flattened row-major: ``shape = (n_0, ..., n_{k-1})`` ->
    ``[prod(shape), k]`` (e.g. ``(h, w)`` -> ``[h·w, 2]``, ``(t, h, w)`` -> ``[t·h·w, 3]``).

    Coordinate of index ``i`` on axis ``a`` (one option at a time):

    - default: ``i`` (int64, exact);
    - ``scale``: ``i · scale[a]`` (float64), a per-axis stretch;
    - ``reference_shape``: ``i · ref_a / n_a`` (float64) — resolution interpolation: a grid
      larger than the training grid ``ref`` is squeezed into the trained position range
      (EVA-02's ``pt_seq_len / ft_seq_len``);
    - ``normalize``: ``-1 + 2i/(n_a - 1)`` (float64, ``0`` when ``n_a = 1``), coordinates in
      ``[-1, 1]`` for ``AxialRope(freqs="pixel")``.

    ``device``: where the positions go; default CPU (explicitly, whatever
    ``torch.device(...)`` context is active: positions need values).

    Example:
        >>> grid_positions((2, 3)).tolist()
        [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
        >>> grid_positions((2, 4), reference_shape=(2, 2))[:, 1].tolist()
        [0.0, 0.5, 1.0, 1.5, 0.0, 0.5, 1.0, 1.5]
    """
    try:
        dims = tuple(shape)
    except TypeError:
        dims = None
    if not dims or isinstance(shape, (str, bytes)):
        raise fail("shape a non-empty sequence of positive ints", repr(shape), "pass e.g. (h, w) = (14, 14)")
    dims = tuple(integer("shape entries", n, maximum=MAX_GRID_TOKENS, fix="pass e.g. (h, w) = (14, 14)") for n in dims)
    if math.prod(dims) > MAX_GRID_TOKENS:
        raise fail("a grid of at most 2**32 tokens", f"shape {dims} = {math.prod(dims)} tokens", "check the patch counts (not pixels?)")
    device = CPU if device is None else check_device("device", device)
    normalize = flag("normalize", normalize)
    k = len(dims)
    given = [n for n, v in (("scale", scale), ("reference_shape", reference_shape), ("normalize", normalize or None)) if v is not None]
    if len(given) > 1:
        raise fail("at most one of scale=, reference_shape=, normalize=True", " and ".join(given), "combine them yourself")

    def per_axis(v, name):
        try:
            vals = list(v) if not isinstance(v, (str, bytes)) else [v] * k
        except TypeError:
            vals = [v] * k  # one value for every axis
        if len(vals) != k:
            raise fail(f"{name} a positive number or {k} of them", repr(v), f"give one {name} per axis")
        return [real(name, x, above=0, fix=f"give one positive {name} per axis") for x in vals]

    coords = []
    for a, n in enumerate(dims):
        i = torch.arange(n, device=device, dtype=torch.int64)
        if scale is not None:
            c = i.to(torch.float64) * per_axis(scale, "scale")[a]
        elif reference_shape is not None:
            c = i.to(torch.float64) * per_axis(reference_shape, "reference_shape")[a] / n
        elif normalize:
            c = (-1.0 + 2.0 * i.to(torch.float64) / (n - 1)) if n > 1 else torch.zeros(1, dtype=torch.float64, device=device)
        else:
            c = i
        coords.append(c)
    mesh = torch.meshgrid(*coords, indexing="ij")  # k tensors of shape dims
    return torch.stack(mesh, dim=-1).reshape(-1, k)  # [prod(dims), k]


def image_positions(h: int, w: int, **kw) -> torch.Tensor:
    """``[h·w, 2]`` (row, column) positions of an image patch grid; see :func:`grid_positions`."""
    return grid_positions((h, w), **kw)


def video_positions(t: int, h: int, w: int, **kw) -> torch.Tensor:
    """``[t·h·w, 3]`` (frame, row, column) positions of a video patch grid; see :func:`grid_positions`."""
    return grid_positions((t, h, w), **kw)


# --------------------------------------------------------------------------- M-RoPE position ids
_TEXT_AFTER = ("max", "spatial")


def _as_grids(g, name) -> List[Tuple[int, int, int]]:
    if g is None:
        return []
    try:
        t = g if isinstance(g, torch.Tensor) else torch.as_tensor(g, device=CPU)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise fail(f"{name} an integer tensor [n, 3] of (t, h, w) patch counts", describe(g), "pass e.g. torch.tensor([[1, 4, 6]])") from None
    if t.device.type == "meta":
        raise fail(f"{name} with values", "a tensor on the meta device", f"build {name} on CPU (the grid sizes are read on the host)")
    if t.dim() != 2 or t.shape[-1] != 3 or t.dtype.is_floating_point:
        raise fail(f"{name} an integer tensor [n, 3] of (t, h, w) patch counts", f"shape {tuple(t.shape)} {t.dtype}", "pass e.g. torch.tensor([[1, 4, 6]])")
    return [tuple(int(v) for v in row) for row in t.tolist()]


def mrope_positions(
    token_types: torch.Tensor,
    *,
    image_grid_thw: Optional[torch.Tensor] = None,
    video_grid_thw: Optional[torch.Tensor] = None,
    spatial_merge_size: int = 1,
    video_time_intervals: Optional[Sequence[float]] = None,
    attention_mask: Optional[torch.Tensor] = None,
    text_after: str = "max",
    split_video_frames: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids ``(3, b, s)`` of a mix of text, image and video tokens, and the
    per-sequence decoding delta ``[b, 1]`` (Qwen2-VL / Qwen2.5-VL ``get_rope_index``).

    Walking each sequence left to right, with ``p`` the next free position (starting at 0):

    - a run of ``L`` text tokens gets ``p, ..., p + L - 1`` on all three axes; ``p += L``;
    - an image or video with patch grid ``(T, H, W)`` and ``m = spatial_merge_size``
      contributes ``T·(H/m)·(W/m)`` tokens in (t, h, w) row-major order at
      ``(p + ⌊i_t·Δ⌋, p + i_h, p + i_w)``, ``Δ`` the video's time interval (1 for images;
      Qwen2.5-VL: ``tokens_per_second · second_per_grid_t``, truncated like transformers:
      float32 product, then ``long``);
    - the next text starts after it: ``text_after="max"`` (default, the Qwen reference
      code and transformers < 5): ``p = (largest position used) + 1``;
      ``text_after="spatial"`` (transformers 5.x): ``p += max(H, W) / m``. They differ only
      for videos whose temporal extent reaches past ``max(H, W)/m``.

    Consecutive image (or video) tokens without text between them consume as many grids as
    their count covers; every grid row must be consumed (a row left over, or a run of
    tokens that its grids do not match exactly, is a RopeError). Padding
    (``attention_mask == 0``) gets position 0. Positions past ``2**53`` (e.g. an interval
    that is a timestamp, not ``tokens_per_second · second_per_grid_t``) are refused.
    The delta is ``max(positions) + 1 - (number of unpadded tokens)``: decoding step ``k``
    (0-based over the whole sequence) uses position ``k + delta`` on all three axes
    (:func:`mrope_decode_positions`).

    Args:
        token_types: int ``[b, s]``: 0 text, 1 image, 2 video (transformers'
            ``mm_token_type_ids``).
        image_grid_thw, video_grid_thw: int ``[n, 3]`` patch grids, in order of appearance
            over the whole batch.
        spatial_merge_size: ``m`` (2 in released Qwen2-VL models).
        video_time_intervals: a sequence of one ``Δ`` per video (default 1).
        attention_mask: ``[b, s]``, 1 for real tokens.
        text_after: ``"max"`` or ``"spatial"``, see above.
        split_video_frames: Qwen3-VL: every video row ``(T, H, W)`` becomes ``T`` rows
            ``(1, H, W)``, one per frame (the frames are separated by timestamp text
            tokens, so each frame is its own vision block).

    Returns:
        ``(positions, delta)``: int64 ``(3, b, s)`` and int64 ``[b, 1]``.

    Example:
        >>> types = torch.tensor([[0, 0, 1, 1, 1, 1, 0]])       # 2 text, 2x2 image, 1 text
        >>> pos, delta = mrope_positions(types, image_grid_thw=torch.tensor([[1, 2, 2]]))
        >>> pos[:, 0].tolist()
        [[0, 1, 2, 2, 2, 2, 4], [0, 1, 2, 2, 3, 3, 4], [0, 1, 2, 3, 2, 3, 4]]
        >>> delta.tolist()
        [[-2]]
    """
    if not isinstance(token_types, torch.Tensor) or token_types.dim() != 2 or token_types.dtype.is_floating_point:
        got = f"shape {tuple(token_types.shape)} {token_types.dtype}" if isinstance(token_types, torch.Tensor) else type(token_types).__name__
        raise fail("token_types an integer tensor [b, s] (0 text, 1 image, 2 video)", got, "pass transformers' mm_token_type_ids")
    if text_after not in _TEXT_AFTER:
        raise fail(f"text_after in {_TEXT_AFTER}", repr(text_after), '"max" follows the Qwen reference code')
    m = integer("spatial_merge_size", spatial_merge_size, maximum=1 << 16, fix="Qwen2-VL uses 2")
    if token_types.device.type == "meta":
        raise fail("token_types with values", "a tensor on the meta device", "pass the processor's mm_token_type_ids (on CPU or an accelerator)")
    bad = set(torch.unique(token_types).tolist()) - {0, 1, 2}
    if bad:
        raise fail("token types in {0, 1, 2}", f"values {sorted(bad)}", "0 = text, 1 = image, 2 = video")
    grids = {1: _as_grids(image_grid_thw, "image_grid_thw"), 2: _as_grids(video_grid_thw, "video_grid_thw")}
    n_videos = len(grids[2])
    if video_time_intervals is None:
        intervals = [1.0] * n_videos
    else:
        fix_dt = "pass a list with tokens_per_second * second_per_grid_t per video (e.g. [2 * 0.5] for one video)"
        try:
            seq = list(video_time_intervals) if not isinstance(video_time_intervals, (str, bytes)) else None
        except TypeError:  # a float, a 0-d tensor
            seq = None
        if seq is None:
            raise fail(f"video_time_intervals a sequence of {n_videos} numbers (one per video)", describe(video_time_intervals), fix_dt)
        intervals = [real("video_time_intervals entries", v, minimum=0, fix=fix_dt) for v in seq]
        if len(intervals) != n_videos:
            raise fail(f"{n_videos} video_time_intervals (one per video)", str(len(intervals)), fix_dt)
    split_video_frames = flag("split_video_frames", split_video_frames)
    if split_video_frames:
        intervals = [dt for g, dt in zip(grids[2], intervals) for _ in range(g[0])]
        grids[2] = [(1, g[1], g[2]) for g in grids[2] for _ in range(g[0])]
    for kind, gl in grids.items():
        for g in gl:
            if g[0] < 1 or g[1] % m or g[2] % m or g[1] < 1 or g[2] < 1:
                name = "image_grid_thw" if kind == 1 else "video_grid_thw"
                raise fail(f"{name} rows (t, h, w) positive with h, w divisible by spatial_merge_size={m}", str(g), "check the processor output")
    used = {1: 0, 2: 0}
    b, s = token_types.shape
    device = token_types.device
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (b, s) or attention_mask.is_complex():
            got = (f"shape {tuple(attention_mask.shape)} {attention_mask.dtype}" if isinstance(attention_mask, torch.Tensor)
                   else describe(attention_mask))
            raise fail(f"attention_mask a tensor [b, s] = {[b, s]} like token_types (1 real token, 0 padding)", got,
                       "pass the processor's attention_mask of the same batch (one row per sequence)")
        if attention_mask.device.type == "meta":
            raise fail("attention_mask with values", "a tensor on the meta device", "pass the processor's attention_mask")
        attention_mask = attention_mask.to(device)
        bad_mask = set(torch.unique(attention_mask).tolist()) - {0, 1}
        if bad_mask:
            raise fail("attention_mask values in {0, 1} (1 real token, 0 padding)", f"values {sorted(bad_mask)[:5]}",
                       "pass the processor's attention_mask (not an additive -inf mask)")
    out = torch.zeros(3, b, s, dtype=torch.int64, device=device)
    deltas = []
    for row in range(b):
        types = token_types[row]
        keep = None
        if attention_mask is not None:
            keep = attention_mask[row].bool()
            types = types[keep]
        pieces: List[torch.Tensor] = []
        p = 0
        for kind, grp in itertools.groupby(types.tolist()):
            n_tok = len(list(grp))
            if kind == 0:
                pieces.append((torch.arange(n_tok, dtype=torch.int64, device=CPU) + p).expand(3, -1))  # [3, L]
                p += n_tok
                continue
            covered = 0
            while covered < n_tok:
                idx = used[kind]
                if idx >= len(grids[kind]):
                    name = "image_grid_thw" if kind == 1 else "video_grid_thw"
                    raise fail(f"one {name} row per {'image' if kind == 1 else 'video'}", f"only {len(grids[kind])} rows for the tokens of batch row {row}", "pass a grid for every image/video in the batch")
                gt, gh, gw = grids[kind][idx]
                gh, gw = gh // m, gw // m
                if covered + gt * gh * gw > n_tok:  # (before building a grid that the tokens cannot hold)
                    raise fail(
                        "a run of vision tokens matching its grids' token counts t·(h/m)·(w/m)",
                        f"{n_tok} tokens vs {covered + gt * gh * gw} from the grids (batch row {row})",
                        "check image_grid_thw/video_grid_thw and spatial_merge_size",
                    )
                dt = 1.0 if kind == 1 else intervals[idx]
                used[kind] += 1
                # float32 product then truncation, as transformers does (torch.arange(t) * interval).long()
                tf = torch.arange(gt, dtype=torch.float32, device=CPU) * torch.tensor(dt, dtype=torch.float32, device=CPU)
                if p + float(tf[-1]) > MAX_EXACT_POSITION:  # (also before .long(), which wraps a float past 2**63)
                    raise fail(
                        "video_time_intervals small enough for positions <= 2**53 (exact in the float64 angle)",
                        f"interval {dt:g} for a video of {gt} temporal patches (last temporal position {p + float(tf[-1]):.4g})",
                        "pass tokens_per_second * second_per_grid_t (e.g. 2 * 0.5), not a timestamp",
                    )
                ti = tf.long()
                tt, hh, ww = torch.meshgrid(ti, torch.arange(gh, device=CPU), torch.arange(gw, device=CPU), indexing="ij")
                block = torch.stack((tt, hh, ww)).reshape(3, -1) + p  # [3, T·H·W]
                pieces.append(block)
                covered += block.shape[1]
                p = int(block.max()) + 1 if text_after == "max" else p + max(gh, gw)
            if covered != n_tok:
                raise fail(
                    "a run of vision tokens matching its grids' token counts t·(h/m)·(w/m)",
                    f"{n_tok} tokens vs {covered} from the grids (batch row {row})",
                    "check image_grid_thw/video_grid_thw and spatial_merge_size",
                )
        pos = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.int64, device=CPU)  # [3, L]
        if keep is not None:
            out[:, row, keep] = pos.to(device)
        else:
            out[:, row] = pos.to(device)
        deltas.append((int(pos.max()) + 1 if pos.numel() else 0) - pos.shape[1])
    for kind, name in ((1, "image_grid_thw"), (2, "video_grid_thw")):
        if used[kind] != len(grids[kind]):
            what = "frame rows (split_video_frames=True)" if kind == 2 and split_video_frames else "rows"
            raise fail(
                f"one {name} row per {'image' if kind == 1 else 'video'} of token_types (in order over the batch)",
                f"{len(grids[kind])} {what} for {used[kind]} {'images' if kind == 1 else 'videos'} in the tokens",
                f"pass the grids of exactly the {'images' if kind == 1 else 'videos'} in this batch",
            )
    return out, torch.tensor(deltas, dtype=torch.int64, device=device)[:, None]


def mrope_decode_positions(delta: torch.Tensor, start: Union[int, torch.Tensor], length: int = 1) -> torch.Tensor:
    """M-RoPE ids ``(3, b, length)`` for decoding ``length`` tokens after ``start`` cached ones.

    Token ``k`` (``start <= k < start + length``) gets ``k + delta`` on all three axes, the
    continuation of :func:`mrope_positions` (transformers' ``rope_deltas``).

    ``start``: an int or 0-d tensor (every sequence), or an integer tensor ``[b]`` / ``[b, 1]``
    of per-sequence cache lengths (``b = delta.shape[0]``), counted in real tokens: with
    left padding, ``attention_mask.sum(-1)``, as transformers' ``cumsum`` of the mask.
    ``delta`` must be an integer tensor and the positions ``start + delta`` must lie in
    ``[0, 2**53]`` (RopeError otherwise; one host read of the positions, skipped while
    torch.compile traces).

    Example:
        >>> mrope_decode_positions(torch.tensor([[-2]]), 7)[:, 0].tolist()
        [[5], [5], [5]]
    """
    if not isinstance(delta, torch.Tensor) or delta.dim() != 2 or delta.shape[1] != 1:
        raise fail("delta an int tensor [b, 1] from mrope_positions", repr(getattr(delta, "shape", delta)), "pass the second output of mrope_positions")
    if delta.dtype.is_floating_point or delta.dtype.is_complex or delta.dtype == torch.bool:
        raise fail("delta with an integer dtype (position offsets are exact integers)", f"dtype {delta.dtype}",
                   "pass the second output of mrope_positions (int64), or delta.long()")
    length = integer("length", length, minimum=0, maximum=MAX_EXACT_POSITION, fix="pass the number of tokens to decode")
    if isinstance(start, torch.Tensor):
        check_positions(start, "start")
        b = delta.shape[0]
        if tuple(start.shape) not in ((), (b,), (b, 1)):
            raise fail(f"start an int, a 0-d tensor or a tensor [b] = [{b}] or [b, 1] (one cache length per sequence of delta)",
                       f"shape {list(start.shape)}", "pass one number of cached tokens per sequence, in delta's batch order")
        st = start.to(device=delta.device, dtype=torch.int64)
    else:
        st = torch.tensor(
            integer("start", start, minimum=0, maximum=MAX_EXACT_POSITION, fix="pass the number of cached tokens"),
            device=delta.device, dtype=torch.int64,
        )
    if st.dim() == 1:
        st = st[:, None]  # per-sample cache lengths [b, 1]
    k = torch.arange(length, device=delta.device, dtype=torch.int64) + st  # [length] or [b, length]
    pos = k + delta.to(torch.int64)  # [b, length]
    if pos.numel() and host_readable(pos):
        lo, hi = (int(v) for v in torch.aminmax(pos))
        if lo < 0:
            raise fail("decode positions start + delta >= 0", f"a minimum of {lo} (start {describe(start)}, delta down to "
                       f"{int(delta.min())})", "start counts the tokens already in the cache (at least the prefill length, "
                       "attention_mask.sum(-1) with padding), not the index of the last one")
        if hi > MAX_EXACT_POSITION:
            raise fail("decode positions start + delta + length - 1 <= 2**53 (exact in the float64 angle)",
                       f"a maximum of {hi}", "pass the delta of mrope_positions and the number of cached tokens")
    return pos.unsqueeze(0).expand(3, -1, -1)  # [3, b, length]


# --------------------------------------------------------------------------- module


class MultiAxisRotaryEmbedding(torch.nn.Module):
    """M-RoPE / multi-axis RoPE of q and k as a module (Qwen2-VL chunked, Qwen3-VL interleaved).

    Pair ``j`` keeps frequency ``cfg.inv_freq()[j]`` and takes its angle from the position on
    the axis ``pair_axes(sections, interleaved)[j]`` (see :func:`multi_axis_cos_sin`). With
    the same position on every axis (text tokens) it equals 1-D :class:`ropekit.RotaryEmbedding`,
    bit for bit: ``cfg.direction = -1`` rotates by ``-φ`` and with ``cfg.rotary_offset = o``
    only dims ``[o, o + r)`` of the head rotate (the others pass through).

    Args:
        cfg: the rotary configuration (its ``layout`` is used for the pairs).
        sections: rotary pairs per axis, summing to ``r/2`` (e.g. ``[16, 24, 24]``).
        interleaved: Qwen3-VL's pair-to-axis rule instead of consecutive blocks.
        backend: apply backend (``"auto"`` picks the fastest available).
        table_dtype: dtype of cos/sin (angles are float64, rounded once); default float32,
            float64 for float64 q (as :class:`ropekit.RotaryEmbedding`: float64 inputs stay
            float64, and text tokens get its bits in every dtype).
        attention_scaling: fold ``cfg.attention_factor`` into cos/sin.

    Tables are computed per call from the positions (they are not a function of one index),
    so the module holds no buffers.

    Example:
        >>> import ropekit
        >>> rope = MultiAxisRotaryEmbedding(ropekit.RopeConfig(head_dim=16), [2, 3, 3])
        >>> q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 1, 16)       # [b, s, h, d]
        >>> pos = torch.randint(0, 9, (2, 5, 3))                            # [b, s, (t, h, w)]
        >>> q2, k2 = rope(q, k, pos)
        >>> q2.shape, k2.shape
        (torch.Size([2, 5, 4, 16]), torch.Size([2, 5, 1, 16]))
    """

    def __init__(
        self,
        cfg: RopeConfig,
        sections: Sequence[int],
        *,
        interleaved: bool = False,
        backend: str = "auto",
        table_dtype: Optional[torch.dtype] = None,
        attention_scaling: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(cfg, RopeConfig):
            raise fail("cfg a ropekit.RopeConfig", type(cfg).__name__, "build one with RopeConfig(head_dim=...)")
        self.cfg = cfg
        self.sections = _check_sections(sections, cfg.n_pairs)
        self.interleaved = flag("interleaved", interleaved)
        if interleaved:
            pair_axes(self.sections, interleaved=True)  # RopeError now for sections the rule cannot honour
        self.backend = backend
        if table_dtype is not None:
            check_dtype(table_dtype)
        self.table_dtype = table_dtype
        self.attention_scaling = flag("attention_scaling", attention_scaling)

    def extra_repr(self) -> str:
        return f"sections={list(self.sections)}, interleaved={self.interleaved}, layout={self.cfg.layout!r}"

    def rope_init(self, device: Union[str, torch.device, None] = None) -> None:
        """Nothing to rebuild (the module holds no tables): here so that every ropekit module
        can be materialised the same way, ``module.to_empty(device=...)`` then ``rope_init()``."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        positions: torch.Tensor,
        *,
        format: str = "bshd",
        seq_len: Optional[int] = None,
        inplace: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` and ``k``.

        Args:
            q: ``[b, s, hq, d]`` (or ``bhsd``/``sbhd`` by ``format``; ``[t, hq, d]`` for ``thd``).
            k: same layout with ``hk`` heads.
            positions: integer ``[b, s, n_axes]``, or ``[s, n_axes]`` / ``[1, s, n_axes]``
                shared by the batch (``[t, n_axes]`` for ``thd``); transformers'
                ``position_ids`` ``(3, b, s)`` are ``position_ids.movedim(0, -1)``.
            format: ``"bshd"``, ``"bhsd"``, ``"sbhd"`` or ``"thd"``.
            seq_len: total length for length-dependent scaling.
            inplace: rotate q and k in place.

        Returns:
            ``(q_rot, k_rot)``.
        """
        from .functional import apply_rotary_qk
        from .positions import table_view as _table_view
        from .positions import split_qk_format

        inplace = flag("inplace", inplace)
        b, s = split_qk_format(q, k, format)
        check_head_width(self.cfg, q=q, k=k)
        if not isinstance(positions, torch.Tensor):
            raise fail("positions an integer tensor [..., n_axes]", type(positions).__name__, "pass torch.as_tensor(positions)")
        if positions.device.type == "meta" and q.device.type != "meta":
            raise fail(f"positions with values (q/k are on {q.device})", "positions on the meta device",
                       "build the positions on q's device (e.g. with mrope_positions)")
        n_axes = len(self.sections)
        ok = [(s, n_axes)] if format == "thd" else list(dict.fromkeys([(s, n_axes), (b, s, n_axes), (1, s, n_axes)]))
        if tuple(positions.shape) not in ok:
            raise fail(
                f"positions of shape {' or '.join(str(list(o)) for o in ok)} for q in format {format!r}",
                f"shape {list(positions.shape)}",
                "one position per token and axis; transformers' (3, b, s) position_ids: .movedim(0, -1)",
            )
        if positions.dim() == 3 and positions.shape[0] == 1:  # [1, s, n_axes]: shared by the batch
            positions = positions[0]
        cos, sin = multi_axis_cos_sin(
            self.cfg,
            positions.to(q.device),
            self.sections,
            interleaved=self.interleaved,
            dtype=self.table_dtype or (torch.float64 if torch.float64 in (q.dtype, getattr(k, "dtype", None))
                                       else torch.float32),  # the wider of q and k (RotaryEmbedding's rule)
            seq_len=seq_len,
            attention_scaling=self.attention_scaling,
        )  # [*positions.shape[:-1], r/2]
        pdims = positions.dim() - 1
        cos, sin = _table_view(cos, format, pdims), _table_view(sin, format, pdims)
        conj, o = self.cfg.direction == -1, self.cfg.rotary_offset  # as ropekit.RotaryEmbedding: -θ, dims [o, o + r)
        if not o:
            return apply_rotary_qk(q, k, cos, sin, layout=self.cfg.layout, inplace=inplace, backend=self.backend, conjugate=conj)
        qo, ko = (q, k) if inplace else (q.clone(), k.clone())  # the dims outside [o, o + r) pass through
        apply_rotary_qk(qo[..., o:], ko[..., o:], cos, sin, layout=self.cfg.layout, inplace=True, backend=self.backend, conjugate=conj)
        return qo, ko
