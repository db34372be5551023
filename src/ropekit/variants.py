"""Research variants of RoPE that reduce to per-pair rotations: p-RoPE, xPos, RoPE-Mixed.

Each builds half-width ``(cos, sin)`` tables ``[..., r/2]`` and applies them with
:func:`ropekit.apply_rotary` (every backend). Shapes: ``b`` batch, ``s`` sequence, ``h``
heads, ``d`` head dim, ``r`` rotary dim; a rotary pair ``i`` has frequency ``θ_i``.

- **p-RoPE** (Barbero et al. 2024, "Round and Round We Go! What makes Rotary Positional
  Encodings useful?", arXiv 2410.06205): only the ``⌊p·r/2⌋`` highest frequencies rotate;
  the lowest-frequency pairs get ``θ_i = 0`` (angle 0: ``cos = 1, sin = 0``).
- **xPos** (Sun et al. 2022, "A Length-Extrapolatable Transformer", arXiv 2212.10554):
  RoPE plus an exponential decay, q scaled by ``ζ^{m/B}`` and k by ``ζ^{-n/B}``.
- **RoPE-Mixed** (Heo et al. 2024, "Rotary Position Embedding for Vision Transformer",
  arXiv 2403.13298): learnable per-head 2-D (N-D) frequencies, ``φ = p_x θ^x + p_y θ^y``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from ._checks import flag, integer, real
from ._errors import fail
from .config import CPU, MAX_EXACT_POSITION, RopeConfig, check_head_width, check_seq_len
from .tables import _as_positions, _default_seq_len, check_cfg, check_dtype, check_positions, cos_sin_f64

__all__ = [
    "p_rope_inv_freq",
    "p_rope_cos_sin",
    "XPosTables",
    "xpos_zeta",
    "xpos_max_distance",
    "xpos_cos_sin",
    "apply_xpos",
    "RopeMixed",
]

_check_cfg = check_cfg
_check_dtype = check_dtype


# --------------------------------------------------------------------------- p-RoPE
def p_rope_n_rotated(cfg: RopeConfig, p: float) -> int:
    """``⌊p · r/2⌋`` (computed as the paper's code does: ``int(p * r // 2)``)."""
    p = real("p", p, minimum=0.0, maximum=1.0, fix="p = 1 is plain RoPE, p = 0 is NoPE; the paper uses p = 0.25 or 0.75")
    return int(p * cfg.rotary_dim // 2)  # type: ignore[operator]


def p_rope_inv_freq(cfg: RopeConfig, p: float, *, seq_len: Optional[int] = None) -> torch.Tensor:
    """p-RoPE frequencies, float64 ``[r/2]``: ``cfg.inv_freq(seq_len)`` with all but the
    ``⌊p·r/2⌋`` highest frequencies set to 0.

    Barbero et al. 2024 (arXiv 2410.06205, sec. 6): ``θ_i`` is kept for the
    ``⌊p·r/2⌋`` largest ``θ_i`` and replaced by 0 for the rest, so the lowest-frequency
    ("semantic") channels are never rotated. ``p = 1`` is RoPE, ``p = 0`` is NoPE.

    Example:
        >>> cfg = RopeConfig(head_dim=8, base=10000.0)            # θ = 1, 0.1, 0.01, 0.001
        >>> [round(v, 6) for v in p_rope_inv_freq(cfg, 0.5).tolist()]
        [1.0, 0.1, 0.0, 0.0]
    """
    _check_cfg(cfg)
    k = p_rope_n_rotated(cfg, p)
    inv = cfg.inv_freq(seq_len).clone()  # float64 [r/2]
    # the lowest frequencies are the smallest θ (the last ones for every monotone spectrum)
    order = torch.argsort(inv, descending=True, stable=True)
    inv[order[k:]] = 0.0
    return inv


def p_rope_cos_sin(
    cfg: RopeConfig,
    positions: Union[torch.Tensor, int, list, range],
    p: float,
    *,
    dtype: torch.dtype = torch.float32,
    seq_len: Optional[int] = None,
    attention_scaling: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Half-width p-RoPE tables ``[*positions.shape, r/2]``: angle ``m·θ_i`` for the rotated
    pairs, exactly 0 (``cos = 1``, ``sin = 0``) for the others.

    Precision as :func:`ropekit.cos_sin` (float64 angles from integer positions, one rounding).

    Example:
        >>> cfg = RopeConfig(head_dim=8)
        >>> cos, sin = p_rope_cos_sin(cfg, torch.arange(3), 0.25)
        >>> sin[:, 1:].abs().max().item()            # only pair 0 rotates
        0.0
    """
    _check_cfg(cfg)
    _check_dtype(dtype)
    pos = check_positions(_as_positions(positions))
    seq_len = check_seq_len(seq_len)
    if seq_len is None:
        seq_len = _default_seq_len(cfg, pos)
    attention_scaling = flag("attention_scaling", attention_scaling)
    inv = p_rope_inv_freq(cfg, p, seq_len=seq_len).to(pos.device)
    ang = pos.to(torch.float64).unsqueeze(-1) * inv  # float64 [..., r/2]
    cos, sin = cos_sin_f64(ang)
    if attention_scaling and cfg.attention_factor != 1.0:
        cos, sin = cos * cfg.attention_factor, sin * cfg.attention_factor
    return cos.to(dtype), sin.to(dtype)


# --------------------------------------------------------------------------- xPos
class XPosTables(NamedTuple):
    """Half-width xPos tables: ``q`` uses ``(cos_q, sin_q)``, ``k`` uses ``(cos_k, sin_k)``."""

    cos_q: torch.Tensor
    sin_q: torch.Tensor
    cos_k: torch.Tensor
    sin_k: torch.Tensor


def xpos_zeta(cfg: RopeConfig, gamma: float = 0.4) -> torch.Tensor:
    """``ζ_i = (2i/r + γ) / (1 + γ)``, float64 ``[r/2]`` (xPos eq. for ``ζ``; ``γ = 0.4``).

    Example:
        >>> [round(z, 6) for z in xpos_zeta(RopeConfig(head_dim=4), gamma=0.4).tolist()]  # 0.4/1.4, 0.9/1.4
        [0.285714, 0.642857]
    """
    _check_cfg(cfg)
    gamma = real("gamma", gamma, above=0, fix="xPos uses gamma = 0.4")
    i2 = torch.arange(0, cfg.rotary_dim, 2, dtype=torch.float64, device=CPU)  # type: ignore[arg-type]  # [r/2] = 2i
    return (i2 / cfg.rotary_dim + gamma) / (1.0 + gamma)


def xpos_cos_sin(
    cfg: RopeConfig,
    positions: Union[torch.Tensor, int, list, range],
    *,
    gamma: float = 0.4,
    scale_base: float = 512.0,
    center: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    seq_len: Optional[int] = None,
) -> XPosTables:
    """xPos tables (Sun et al. 2022, arXiv 2212.10554, eq. 9-10):

        f_q(q, m) = R_m (ζ^{(m-c)/B} ⊙ q),     f_k(k, n) = R_n (ζ^{-(n-c)/B} ⊙ k)
        f_q(q, m)ᵀ f_k(k, n) = Σ_i ζ_i^{(m-n)/B} · [pair i of qᵀ R_{n-m} k]

    with ``ζ_i = (2i/r + γ)/(1+γ)`` (:func:`xpos_zeta`), ``B = scale_base``. The scale
    multiplies both lanes of pair ``i``, so it is folded into the tables:
    ``cos_q = ζ^{(m-c)/B} cos mθ``, ``sin_q = ζ^{(m-c)/B} sin mθ``, and likewise for ``k``
    with the opposite exponent. The score depends on ``m - n`` only; the center ``c``
    cancels and exists for range: ``ζ_0^{±(m-c)/B}`` must stay inside the table dtype
    (float32: ``|m - c| <= 87.3·B/|ln ζ_0| = 35 694`` for ``B = 512, γ = 0.4``, so up to
    ~71 000 positions around a mid-sequence center; the paper's ``c = 0`` form ends at
    ~35 700). Positions outside that range are a RopeError, never inf/0 tables; see
    :func:`xpos_max_distance` for the limit of each dtype. (Meta tensors and graphs being
    traced by torch.compile have no values to check: there ``center`` is required to be
    right, and defaults to 0.)

    Args:
        cfg: rotary configuration (frequencies ``θ_i``; scaling allowed).
        positions: integer positions ``[...]``.
        gamma: ``γ`` of ``ζ`` (0.4 in the paper).
        scale_base: ``B`` (512 in the paper).
        center: ``c``; default ``(min + max) // 2`` of ``positions``. Pass the same ``c``
            for every call whose q and k meet (e.g. a fixed ``c`` for a KV cache).
        dtype: table dtype; angles and scales are float64, rounded once.

    Returns:
        :class:`XPosTables` ``(cos_q, sin_q, cos_k, sin_k)``, each ``[*positions.shape, r/2]``.
        ``cfg.attention_factor`` is folded in as :func:`ropekit.cos_sin` does.

    Example:
        >>> cfg = RopeConfig(head_dim=8)
        >>> t = xpos_cos_sin(cfg, torch.arange(6))
        >>> t.cos_q.shape
        torch.Size([6, 4])
    """
    from .tables import cos_sin

    _check_cfg(cfg)
    _check_dtype(dtype)
    scale_base = real("scale_base", scale_base, above=0, fix="xPos uses scale_base = 512")
    pos = check_positions(_as_positions(positions))
    zeta = xpos_zeta(cfg, gamma).to(pos.device)  # float64 [r/2]
    has_values = pos.numel() and pos.device.type != "meta" and not torch.compiler.is_compiling()
    lo, hi = (int(v) for v in torch.aminmax(pos)) if has_values else (0, 0)  # one sync for both ends
    if center is None:
        center = (lo + hi) // 2
    center = integer("center", center, minimum=-MAX_EXACT_POSITION, maximum=MAX_EXACT_POSITION,
                     fix="pass the position the scales are taken relative to (an int), or None")
    if has_values:
        _check_xpos_range(cfg, lo, hi, center, gamma, scale_base, dtype)
    cos, sin = cos_sin(cfg, pos, dtype=torch.float64, seq_len=seq_len)  # [..., r/2]
    # exponent (m - c)/B in float64 from exact integers; ζ^e = exp(e · ln ζ)
    e = (pos.to(torch.float64) - float(center)).unsqueeze(-1) / scale_base  # [..., 1]
    up = torch.exp(e * torch.log(zeta))  # ζ^{(m-c)/B}   [..., r/2]
    down = torch.exp(-e * torch.log(zeta))  # ζ^{-(m-c)/B}
    return XPosTables(
        (cos * up).to(dtype), (sin * up).to(dtype), (cos * down).to(dtype), (sin * down).to(dtype)
    )


def xpos_max_distance(cfg: RopeConfig, *, gamma: float = 0.4, scale_base: float = 512.0, dtype: torch.dtype = torch.float32) -> int:
    """Largest ``|m - c|`` for which every xPos scale ``ζ_i^{±(m-c)/B}`` (times the attention
    factor) is a finite, normal number of ``dtype``: ``⌊B · L / |ln ζ_0|⌋`` with
    ``L = min(ln(max) - ln(attention_factor), -ln(tiny))`` of ``dtype``.

    float32 with the paper's ``B = 512, γ = 0.4``: 35 694, i.e. windows of about 71 000
    positions around the center; float64: about 290 000; float16: about 3 900. Capped at
    ``2**54``, the largest ``|m - c|`` of positions and centers ropekit accepts (a ``γ`` so
    large that ``ζ`` rounds to 1, or a huge ``B``, limits nothing).

    Example:
        >>> xpos_max_distance(RopeConfig(head_dim=64))
        35694
    """
    _check_cfg(cfg)
    _check_dtype(dtype)
    gamma = real("gamma", gamma, above=0, fix="xPos uses gamma = 0.4")
    scale_base = real("scale_base", scale_base, above=0, fix="xPos uses scale_base = 512")
    fi = torch.finfo(dtype)
    room = min(math.log(fi.max) - math.log(max(cfg.attention_factor, 1.0)), -math.log(fi.tiny))
    worst = abs(math.log(gamma / (1.0 + gamma)))  # |ln ζ_0|, the fastest-changing scale
    # |m - c| never exceeds 2·2**53 (positions in [0, 2**53], center in [-2**53, 2**53]): past that
    # cap every distance is fine, e.g. a huge γ whose ζ_0 rounds to 1 (no scale) or a huge B
    cap = 2 * MAX_EXACT_POSITION
    if worst == 0.0:
        return cap
    far = scale_base * room / worst
    return int(far) if far < cap else cap


def _check_xpos_range(cfg: RopeConfig, lo: int, hi: int, center: int, gamma: float, scale_base: float, dtype) -> None:
    far = max(abs(lo - center), abs(hi - center))
    limit = xpos_max_distance(cfg, gamma=gamma, scale_base=scale_base, dtype=dtype)
    if far > limit:
        wider = xpos_max_distance(cfg, gamma=gamma, scale_base=scale_base, dtype=torch.float64)
        raise fail(
            f"positions within {limit} of the center c for xPos tables in {dtype} (beyond it "
            f"ζ^(±(m-c)/B) overflows to inf or underflows to 0)",
            f"positions {lo} .. {hi} with c={center}, |m - c| up to {far}",
            f"pass a center= nearer the positions (q and k that meet must share it), a larger scale_base, "
            f"or dtype=torch.float64 (|m - c| up to {wider})",
        )


def apply_xpos(
    q: torch.Tensor,
    k: torch.Tensor,
    tables: XPosTables,
    *,
    layout: str = "half",
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply xPos: ``q`` with ``(cos_q, sin_q)``, ``k`` with ``(cos_k, sin_k)`` via
    :func:`ropekit.apply_rotary` (tables broadcastable as there, e.g. ``[s, 1, r/2]`` for
    ``bshd``). Rotation in float32 (float64 for float64 inputs), one cast to the input dtype.
    """
    from .functional import apply_rotary

    if not isinstance(tables, XPosTables):
        raise fail("tables from ropekit.variants.xpos_cos_sin", type(tables).__name__, "build them with xpos_cos_sin(cfg, positions)")
    return (
        apply_rotary(q, tables.cos_q, tables.sin_q, layout=layout, backend=backend),
        apply_rotary(k, tables.cos_k, tables.sin_k, layout=layout, backend=backend),
    )


# --------------------------------------------------------------------------- RoPE-Mixed
_INITS = ("mixed", "axial")


class RopeMixed(nn.Module):
    """RoPE-Mixed (Heo et al. 2024, arXiv 2403.13298, eq. 11-12): learnable frequencies per
    head and axis. For a token at ``p = (p_1, ..., p_A)`` (``A = n_axes``; 2 for images),
    head ``h`` rotates pair ``i`` by

        φ_{h,i}(p) = Σ_a p_a · θ^a_{h,i}            (RoPE-Mixed: θ^x, θ^y both learnable)

    so ``q_mᵀ k_n`` after rotation depends on ``p_m - p_n`` only. ``θ`` is the
    ``nn.Parameter`` :attr:`freqs` ``[A, h, r/2]``.

    Init (``init="mixed"``, the paper's ``init_random_2d_freqs``, needs ``A = 2`` and
    ``r % 4 == 0``): magnitudes ``μ_j = theta^(-4j/r)``, ``j < r/4``; per head a random
    direction ``α``; pairs ``j`` and ``j + r/4`` get directions ``α`` and ``α + π/2``:
    ``θ^x = μ cos(·)``, ``θ^y = μ sin(·)``. ``init="axial"``: RoPE-Axial, the special case
    where each pair listens to one axis only — exactly :class:`ropekit.multi_axis.AxialRope`
    with ``base = theta`` (the paper uses ``theta = 100`` for axial, ``10`` for mixed); it
    needs ``n_axes <= r/2`` (a RopeError otherwise: an axis without a pair would start out
    ignoring its positions).

    Args:
        head_dim: ``d``.
        num_heads: ``h``.
        n_axes: ``A``.
        rotary_dim: ``r`` (default ``d``).
        theta: frequency base of the init.
        init: ``"mixed"`` or ``"axial"``.
        layout: pair layout of q/k.
        generator: optional ``torch.Generator`` for the random init.

    Precision: tables are computed from the parameters in their dtype (float32 by default)
    with differentiable ops, so angles carry float32 rounding (``~|φ|·2^-24``); positions
    are converted exactly (integers below ``2^24``). Gradients reach :attr:`freqs` through
    :func:`ropekit.apply_rotary`'s ``cos``/``sin`` gradients.

    Example:
        >>> from ropekit.multi_axis import image_positions
        >>> rope = RopeMixed(head_dim=16, num_heads=2)
        >>> q, k = torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16)   # [b, s, h, d]
        >>> q2, k2 = rope(q, k, positions=image_positions(2, 3))         # [s, 2]
        >>> q2.shape, rope.freqs.shape
        (torch.Size([1, 6, 2, 16]), torch.Size([2, 2, 8]))
    """

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        *,
        n_axes: int = 2,
        rotary_dim: Optional[int] = None,
        theta: float = 10.0,
        init: str = "mixed",
        layout: str = "half",
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        cfg = RopeConfig(head_dim, base=100.0, rotary_dim=rotary_dim, layout=layout)  # validation only
        num_heads = integer("num_heads", num_heads, maximum=1 << 16, fix="pass the number of attention heads")
        n_axes = integer("n_axes", n_axes, maximum=64, fix="2 for images, 3 for video")
        if init not in _INITS:
            raise fail(f"init in {_INITS}", repr(init), '"mixed" (paper) or "axial" (RoPE-Axial start)')
        theta = real("theta", theta, above=1, fix="the paper uses 10 (mixed) or 100 (axial)")
        head_dim = cfg.head_dim
        r = cfg.rotary_dim
        self.head_dim, self.num_heads, self.n_axes = head_dim, num_heads, n_axes
        self.rotary_dim, self.layout, self.theta, self.init = r, layout, float(theta), init
        if init == "mixed" and (n_axes != 2 or r % 4):  # type: ignore[operator]
            raise fail(
                "n_axes == 2 and rotary_dim % 4 == 0 for init='mixed'",
                f"n_axes={n_axes}, rotary_dim={r}",
                "use init='axial' for other shapes (frequencies stay learnable)",
            )
        if init == "axial" and n_axes > r // 2:  # type: ignore[operator]
            # RoPE-Axial gives each pair one axis; an axis without a pair would start out
            # ignoring its positions (its θ all 0), so refuse rather than start that way
            raise fail(
                "n_axes <= rotary_dim / 2 for init='axial' (every axis gets at least one pair)",
                f"n_axes={n_axes}, rotary_dim={r} ({r // 2} pairs)",  # type: ignore[operator]
                f"use rotary_dim >= {2 * n_axes} or fewer axes",
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise fail("generator a torch.Generator or None", type(generator).__name__, "pass torch.Generator().manual_seed(0)")
        # the parameter follows the active device (a torch.device context, e.g. meta, or the
        # default device) like torch.nn's own layers; its values are computed on CPU
        self.freqs = nn.Parameter(torch.empty(n_axes, num_heads, r // 2, dtype=torch.float32))  # [A, h, r/2]
        self.rope_init(generator=generator)

    def initial_freqs(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The init of :attr:`freqs` (see the class docstring): float64 ``[A, h, r/2]`` on CPU."""
        r, h, A = self.rotary_dim, self.num_heads, self.n_axes
        if self.init == "mixed":
            q = r // 4
            # float64 init: μ_j = theta^(-4j/r)
            i4 = torch.arange(0, r, 4, dtype=torch.float64, device=CPU)
            mag = torch.pow(torch.tensor(self.theta, dtype=torch.float64, device=CPU), -i4 / r)[:q]
            if generator is not None and generator.device.type != "cpu":
                raise fail("a CPU torch.Generator (the init is computed on CPU)", f"one on {generator.device}", "pass torch.Generator()")
            alpha = torch.rand(h, 1, generator=generator, dtype=torch.float64, device=CPU) * 2 * math.pi  # [h, 1]
            ang = torch.cat((alpha.expand(-1, q), alpha.expand(-1, q) + math.pi / 2), dim=-1)  # [h, r/2]
            mags = torch.cat((mag, mag))  # [r/2]
            return torch.stack((mags * torch.cos(ang), mags * torch.sin(ang)))  # [2, h, r/2]
        from .multi_axis import AxialRope

        ax = AxialRope(r, n_axes=A, base=self.theta)  # n_axes <= r/2 checked in __init__
        axes, w = ax.axes(), ax.inv_freq()  # [r/2]
        f = torch.zeros(A, h, r // 2, dtype=torch.float64, device=CPU)
        f[axes, :, torch.arange(r // 2, device=CPU)] = w[:, None]
        return f

    def rope_init(self, generator: Optional[torch.Generator] = None) -> None:
        """(Re)initialise :attr:`freqs` in place, e.g. after ``to_empty`` from the meta device.

        A no-op while :attr:`freqs` is on the meta device (it has no storage to fill).
        """
        if self.freqs.device.type == "meta":
            return
        with torch.no_grad():
            self.freqs.copy_(self.initial_freqs(generator))

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_heads={self.num_heads}, n_axes={self.n_axes}, "
            f"rotary_dim={self.rotary_dim}, init={self.init!r}, layout={self.layout!r}"
        )

    def _check_shapes(self, q: torch.Tensor, k: torch.Tensor, positions: Any) -> None:
        """q, k ``[b, s, h, d]`` with ``h = num_heads`` and one position per token: without this a
        ``[1, A]`` positions tensor broadcast over every token (all rotated alike), silently."""
        h = self.num_heads
        for name, t in (("q", q), ("k", k)):
            if t.dim() != 4 or t.shape[2] != h:
                raise fail(
                    f"{name} [b, s, h, d] with h = num_heads = {h}",
                    f"{name} of shape {tuple(t.shape)}",
                    "pass bshd tensors (x.transpose(1, 2) for bhsd); k needs all h heads (repeat GQA heads first)",
                )
        if k.shape[:2] != q.shape[:2]:
            raise fail("q and k with the same [b, s]", f"{tuple(q.shape[:2])} and {tuple(k.shape[:2])}",
                       "RopeMixed rotates q and k at the same positions (self-attention)")
        if not isinstance(positions, torch.Tensor):
            return  # angles() names the problem
        b, s = q.shape[:2]
        lead = tuple(positions.shape[:-1])
        if not (lead == (s,) or (len(lead) == 2 and lead[1] == s and lead[0] in (1, b))):
            raise fail(
                f"positions [s, n_axes] or [b, s, n_axes] with s = {s}, b = {b} (one position per token of q)",
                f"positions of shape {tuple(positions.shape)}",
                "build them for the tokens of q, e.g. ropekit.multi_axis.image_positions(h, w) for s = h*w",
            )

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """``φ [..., h, r/2] = Σ_a positions[..., a] · freqs[a]`` (differentiable in :attr:`freqs`)."""
        if not isinstance(positions, torch.Tensor) or positions.dim() < 1 or positions.shape[-1] != self.n_axes:
            got = f"shape {tuple(positions.shape)}" if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise fail(f"positions [..., n_axes={self.n_axes}]", got, "build them with ropekit.multi_axis.image_positions(h, w)")
        if not positions.dtype.is_floating_point:
            check_positions(positions)
        elif positions.numel() and positions.device.type != "meta" and not torch.compiler.is_compiling():
            if not bool(torch.isfinite(positions).all()):
                raise fail("finite positions", "inf or nan in positions", "check how the positions were computed")
        f = self.freqs
        p = positions.to(device=f.device, dtype=f.dtype)  # integers < 2^24 are exact in float32
        return torch.einsum("...a,ahj->...hj", p, f)  # [..., h, r/2]

    def cos_sin(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Half-width tables ``[..., h, r/2]`` in the parameters' dtype, differentiable."""
        ang = self.angles(positions)
        return torch.cos(ang), torch.sin(ang)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, *, positions: torch.Tensor, backend: str = "auto"
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q, k [b, s, h, d]`` (``h = num_heads`` for both) at ``positions [s, A]`` or
        ``[b, s, A]`` (``b`` may be 1); other shapes are a RopeError, never a broadcast."""
        from .functional import apply_rotary

        check_head_width(self, q=q, k=k)
        self._check_shapes(q, k, positions)
        cos, sin = self.cos_sin(positions)  # [(b,) s, h, r/2]
        return (
            apply_rotary(q, cos, sin, layout=self.layout, backend=backend),
            apply_rotary(k, cos, sin, layout=self.layout, backend=backend),
        )
