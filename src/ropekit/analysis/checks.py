"""Property checks of a rotary config and agreement of every available backend with the
float64 oracle — what ``ropekit verify`` runs. Each check measures one number and
compares it with a stated bound.

Example:
    >>> from ropekit import RopeConfig
    >>> checks = property_checks(RopeConfig(head_dim=64), context=4096)
    >>> all(c.passed for c in checks), checks[0].name
    (True, 'rotation is orthogonal: max |RᵀR - I|')
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Sequence

import torch

from .._checks import describe, integer
from .._errors import fail
from ..config import RopeConfig
from . import _check_cfg, decay_bound, relative_position_error

__all__ = ["Check", "property_checks", "backend_checks", "run_checks"]

_F64 = torch.float64


@dataclasses.dataclass
class Check:
    """One measured number and the bound it must not exceed.

    ``skipped`` checks (e.g. a dtype a backend does not support) count as passed.
    """

    name: str
    value: float
    bound: float
    note: str = ""
    skipped: bool = False

    @property
    def passed(self) -> bool:
        return self.skipped or (math.isfinite(self.value) and self.value <= self.bound)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "value": self.value if math.isfinite(self.value) else None,
            "bound": self.bound,
            "passed": self.passed,
            "skipped": self.skipped,
            "note": self.note,
        }


def _context(context: Optional[int]) -> int:
    """``context`` (default 4096) as an int in ``[1, 2**53]``, else a RopeError."""
    if context is None:
        return 4096
    return integer("context", context, minimum=1, maximum=1 << 53, fix="pass the context length in tokens, or None (4096)")


def _positions(context: Optional[int], n_small: int = 4) -> torch.Tensor:
    """A few small positions and the last positions of the context (large angles)."""
    top = max(int(context or 4096), 2 * n_small)
    return torch.cat([torch.arange(n_small), torch.arange(top - n_small, top)])  # [2 n_small]


def property_checks(cfg: RopeConfig, *, context: Optional[int] = None) -> List[Check]:
    """Mathematical properties of ``cfg``'s rotation, in float64 (plus the float32 tables).

    1. ``R(m)`` is orthogonal; 2. ``R(m)R(n) = R(m+n)``; 3. ``⟨f(q,m), f(k,n)⟩`` depends
    only on ``m - n``; 4. the decay bound is ``(r/2+1)/2`` at distance 0 and never above
    it; 5. float32 tables are the float64 values rounded once (within ``2^-24`` relative
    to the attention factor); 6. the conjugate rotation undoes the rotation (float32).

    Frequencies of length-dependent schemes are fixed at ``seq_len = context`` (an int in
    ``[1, 2**53]``, default 4096).
    """
    from ..functional import apply_rotary
    from ..reference import rotation_matrix
    from ..tables import cos_sin

    _check_cfg(cfg)
    ctx = _context(context)
    out: List[Check] = []
    pos = _positions(ctx)
    eye = torch.eye(cfg.rotary_dim, dtype=_F64)
    R = rotation_matrix(cfg, pos, seq_len=ctx)  # [p, r, r]
    out.append(Check("rotation is orthogonal: max |RᵀR - I|", float((R.transpose(-1, -2) @ R - eye).abs().max()), 1e-12))

    pairs = [(3, 5), (1000, 24), (ctx // 2, ctx - ctx // 2 - 1)]
    err = 0.0
    for m, n in pairs:
        Rm, Rn, Rmn = (rotation_matrix(cfg, p, seq_len=ctx) for p in (m, n, m + n))
        err = max(err, float((Rm @ Rn - Rmn).abs().max()))
    # float64 angles: the error grows like position · θ_0 · 2^-53 (~1e-11 at 10^5)
    out.append(Check(f"R(m)·R(n) = R(m+n) up to m+n = {ctx - 1}: max abs diff", err, 1e-9))

    starts = sorted({0, 1, 17, 1000 % ctx, max(ctx - 1001, 0)})
    rel = relative_position_error(cfg, distances=(0, 1, 5, 100, 1000), starts=starts)
    out.append(Check("relative position: <f(q,m), f(k,n)> depends on m-n only: max dev / (|q||k|)", rel, 1e-9))

    half = cfg.n_pairs
    b = decay_bound(cfg, torch.cat([torch.zeros(1), torch.logspace(0, math.log10(ctx), 200, dtype=_F64)]), seq_len=ctx)
    dev = abs(float(b[0]) - (half + 1) / 2) + max(0.0, float(b[1:].max() - b[0]))
    out.append(Check(f"decay bound: B(0) = (r/2+1)/2 = {(half + 1) / 2:g}, B(Δ) <= B(0): deviation", dev, 1e-12))

    c32, s32 = cos_sin(cfg, pos, seq_len=ctx)
    c64, s64 = cos_sin(cfg, pos, dtype=_F64, seq_len=ctx)
    terr = float(torch.maximum((c32.double() - c64).abs(), (s32.double() - s64).abs()).max())
    af = max(1.0, abs(cfg.attention_factor))
    out.append(Check("float32 tables = float64 cos/sin rounded once: max abs err", terr, af * 2.0**-24))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, pos.numel(), 3, cfg.head_dim, generator=g)  # [b, s, h, d] float32
    c, s = cos_sin(cfg, pos, seq_len=ctx, attention_scaling=False)  # [s, r/2]
    y = apply_rotary(x, c[:, None], s[:, None], layout=cfg.layout, backend="eager")
    back = apply_rotary(y, c[:, None], s[:, None], layout=cfg.layout, backend="eager", conjugate=True)
    out.append(Check("conjugate rotation undoes the rotation (float32): max abs err", float((back - x).abs().max()), 1e-5))
    return out


def backend_checks(
    cfg: RopeConfig,
    names: Sequence[str],
    *,
    context: Optional[int] = None,
    shape: Sequence[int] = (2, 8, 3),
    on_check: Optional[Callable[[Check], None]] = None,
) -> List[Check]:
    """Every backend in ``names`` against the dense float64 oracle on ``x [b, s, h, d]``
    (``shape = (b, s, h)``; ``s`` positions: the first and the last of the context):

    - forward float32: ``max |y - y_ref| <= 1e-5 · max(1, attention factor)`` (float32
      products of values ~N(0,1); a wrong pairing gives errors of order 1);
    - backward float32: the same bound on ``dL/dx`` for ``L = Σ y·g``;
    - fused per-head RMSNorm + RoPE (:func:`ropekit.apply_qk_norm_rotary`), forward and the
      gradients of q, k and both weights, against the float64 composition: the same bound
      relative to each tensor's largest value;
    - forward bfloat16: rounded once, ``|y - y_ref| <= ½ ulp_bf16(y_ref) + 2e-6`` per element
      (one ulp for Triton under its CPU interpreter, whose float32 -> bf16 cast truncates).

    ``shape`` is three ints, each in ``[1, 4096]``; ``context`` an int in ``[1, 2**53]``
    (default 4096). ``on_check`` is called with each check as soon as it is measured.
    """
    from .. import backends as _backends
    from ..functional import apply_qk_norm_rotary, apply_rotary
    from ..tables import cos_sin

    _check_cfg(cfg)
    ctx = _context(context)
    b, s, h = _shape(shape)
    if isinstance(names, (str, bytes)):
        raise fail("names a list of backend names", describe(names), f"pass [{names!r}]")
    if on_check is not None and not callable(on_check):
        raise fail("on_check a callable or None", describe(on_check), "pass a function taking one Check")
    pos = _positions(ctx, n_small=max(s // 2, 1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, pos.numel(), h, cfg.head_dim, generator=g)  # [b, s, h, d]
    gy = torch.randn(x.shape, generator=g)
    c, sn = cos_sin(cfg, pos, seq_len=ctx)  # float32 [s, r/2]
    c, sn = c[:, None], sn[:, None]  # [s, 1, r/2]
    # oracle: the dense float64 matrix applied to the same float32 tables
    x64 = x.double().requires_grad_(True)
    ref = apply_rotary(x64, c, sn, layout=cfg.layout, backend="reference")
    (ref * gy.double()).sum().backward()
    ref_grad = x64.grad
    ref = ref.detach()
    af = max(1.0, abs(cfg.attention_factor))
    out: List[Check] = []

    def add(ch: Check) -> None:
        out.append(ch)
        if on_check is not None:
            on_check(ch)

    for name in names:
        if name == "reference":
            continue
        be = _backends.get(name)
        tag = f"backend {name} ({cfg.layout}, r={cfg.rotary_dim}/d={cfg.head_dim})"
        y = apply_rotary(x, c, sn, layout=cfg.layout, backend=name)
        add(Check(f"{tag} forward float32: max abs err vs oracle", float((y.double() - ref).abs().max()), 1e-5 * af))

        xg = x.clone().requires_grad_(True)
        yg = apply_rotary(xg, c, sn, layout=cfg.layout, backend=name)
        (yg * gy).sum().backward()
        add(Check(f"{tag} backward float32: max abs err of dx", float((xg.grad.double() - ref_grad).abs().max()), 1e-5 * af))

        # fused per-head RMSNorm + RoPE (q = x, k = its first head): forward and all four gradients
        # against the float64 composition (values ~|w| ~ 1, float32 arithmetic: the same bound)
        wq, wk = 1 + 0.5 * torch.randn(cfg.head_dim, generator=g), torch.randn(cfg.head_dim, generator=g)
        leaves = [t.clone().requires_grad_(True) for t in (x, x[:, :, :1], wq, wk)]
        leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
        res = []
        for ls, bk in ((leaves, name), (leaves64, "reference")):
            qo, ko = apply_qk_norm_rotary(*ls, c, sn, eps=1e-6, weight_offset=0.5, layout=cfg.layout, backend=bk)
            res.append([qo, ko, *torch.autograd.grad((qo * gy).sum() + ko.sum(), ls)])
        errs = [float((a.detach().double() - b.detach()).abs().max() / max(1.0, float(b.detach().abs().max())))
                for a, b in zip(*res)]
        add(Check(f"{tag} qk-norm float32: max err of q, k vs oracle (relative to max |·|)", max(errs[:2]), 1e-5 * af))
        add(Check(f"{tag} qk-norm backward float32: max err of dq, dk, dw_q, dw_k (relative to max |·|)", max(errs[2:]),
                  1e-5 * af))

        xb = x.to(torch.bfloat16)
        # one rounding of the float32 result: |y - ref| <= ½ ulp_bf16(ref) + float32 slack
        # the value is the worst element's error over the error one rounding may make, so a
        # correctly rounded result always comes close to 1 (some element lands near ½ ulp)
        ulps, note = 0.5, "1.0 = the most one correct rounding can be off: values just under 1 are expected"
        if name == "triton" and not xb.is_cuda:
            ulps, note = 1.0, "Triton's CPU interpreter truncates float32 -> bfloat16 (1 ulp allowed); values just under 1 are expected"
        if not be.supports(xb):
            add(Check(f"{tag} forward bfloat16", float("nan"), 1.0, note="bfloat16 not supported", skipped=True))
            continue
        refb = apply_rotary(xb.double(), c, sn, layout=cfg.layout, backend="reference")
        yb = apply_rotary(xb, c, sn, layout=cfg.layout, backend=name)
        err = (yb.double() - refb).abs() / (ulps * _bf16_ulp(refb) + 2e-6 * af)
        add(Check(f"{tag} forward bfloat16: max err / ({ulps:g} ulp + 2e-6)", float(err.max()), 1.0, note=note))
    return out


def _shape(shape: Sequence[int]) -> tuple:
    """``shape`` as three ints ``(b, s, h)``, each in ``[1, 4096]``, else a RopeError."""
    what, fix = "shape three ints (b, s, h), each in [1, 4096]", "pass e.g. shape=(2, 8, 3)"
    try:
        vals = tuple(shape)
    except TypeError:
        raise fail(what, describe(shape), fix) from None
    if isinstance(shape, (str, bytes)) or len(vals) != 3:
        raise fail(what, describe(shape), fix)
    return tuple(integer(f"shape[{i}]", v, minimum=1, maximum=4096, fix=fix) for i, v in enumerate(vals))


def _bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers (8 significant bits) at ``|v|``: ``2^(floor(log2|v|) - 7)``."""
    _, e = torch.frexp(v)  # v = m · 2^e, 0.5 <= |m| < 1
    return torch.ldexp(torch.ones_like(v), e - 8)


def run_checks(cfg: RopeConfig, *, context: Optional[int] = None, names: Optional[Sequence[str]] = None) -> List[Check]:
    """:func:`property_checks` then :func:`backend_checks` for ``names`` (default: every
    backend available on this machine, :func:`ropekit.backends.available`)."""
    from .. import backends as _backends

    if names is None:
        names = _backends.available()
    return property_checks(cfg, context=context) + backend_checks(cfg, names, context=context)
