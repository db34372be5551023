"""``ropekit.apply_qk_norm_rotary`` on every CPU backend, against a float64 oracle (issue 17).

Written against the public API only, parametrised over ``ropekit.backends.available()``
(triton has its own tests), so the same file judges the composition of
``backends/_generic.py`` today and a fused kernel tomorrow.

The oracle (:func:`oracle`) is plain float64 torch, independent of ropekit's code: per head
row ``x`` of ``d`` elements ``n = x / sqrt(mean(x²) + eps) * (offset + w)`` over all ``d``
dims, then the explicit pair rotation of the first ``r`` dims (``"half"``: ``(i, i + r/2)``;
``"interleaved"``: ``(2i, 2i + 1)``). Its gradients are torch's autograd of that float64
code.

Tolerances (:func:`assert_oracle`), from the error analysis of the specified computation
(float32 arithmetic, float64 for float64 inputs, one rounding to the output dtype), with
``u`` the unit roundoff of the compute dtype (2**-24 or 2**-53):

* ``δ = C · u · scale`` per element, ``scale`` the same formula evaluated on absolute values
  (the condition number of each element: for a rotated lane ``|a||c| + |b||s|``, so
  cancellation in ``a·c − b·s`` is allowed its absolute, not relative, error). ``C = 16``:
  the norm is ~5 roundings (the mean square's sum over ``d`` counts ~½·log2(d) more), the
  weight (with its offset) 2, the rotation 3; the composition measures at most 5.5 (forward)
  and 5.0 (gradients), see the report of issue 17. Weight gradients are sums over all
  ``N`` rows: ``C_w = 16 + sqrt(N)`` (measured < 1 with torch's cascade sums).
* outputs narrower than the compute dtype (bfloat16, float16; a float32 weight gradient of
  float64 inputs) add ``0.5 ulp(|oracle| + δ)``: the float32 result rounded once, to
  nearest. This is stricter than "within 1 ulp of the oracle rounded": a second rounding
  (the normalised value rounded to bf16 before the rotation, transformers' way) breaks it
  on ~25 % of the elements, and :func:`test_the_bound_rejects_wrong_kernels` keeps it so.

Overflow of the mean square (|x| ~ 1e30 in float32/bfloat16, ``x²`` beyond float32's
range): the specified float32 accumulation gives ``mean = inf``, ``1/sqrt(inf) = 0`` and
the row comes out as **exact zeros** (finite, no NaN), like ``torch.nn.functional.rms_norm``
on float32 and transformers' Qwen3RMSNorm. That is what ropekit does and what is tested
(:func:`test_mean_square_overflow_gives_zero_rows`); float64 inputs have the range and are
exact there. With ``eps = 0`` an all-zero row is ``0 · inf = NaN`` (as in torch), so only
``eps > 0`` is promised NaN-free.
"""

from __future__ import annotations

import math

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, apply_qk_norm_rotary, apply_rotary_qk, cos_sin

BACKENDS = [b for b in ropekit.backends.available() if b != "triton"]  # triton: tests/test_triton.py
FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
F32 = torch.float32
C_ELEM = 16.0


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1717)


def _id(v):
    return str(v).replace("torch.", "")


# ------------------------------------------------------------------------------------------------
# oracle


def pair_index(r: int, layout: str):
    i = torch.arange(r // 2)
    return (i, i + r // 2) if layout == "half" else (2 * i, 2 * i + 1)


def rotate64(n, cos, sin, layout):
    """Explicit pair rotation of the first r dims of float64 ``n``; also the per-element
    error scale (the same sums on absolute values). Dims past r pass."""
    r = 2 * cos.shape[-1]
    i1, i2 = pair_index(r, layout)
    c, s = cos.double(), sin.double()
    a, b = n[..., i1], n[..., i2]
    y = n.index_copy(-1, i1, a * c - b * s).index_copy(-1, i2, b * c + a * s)
    aa, ba, ca, sa = a.abs(), b.abs(), c.abs(), s.abs()
    scale = n.abs().index_copy(-1, i1, aa * ca + ba * sa).index_copy(-1, i2, ba * ca + aa * sa)
    return y, scale


def norm64(x64, w64, eps, offset):
    return x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps) * (offset + w64)


def oracle(x, w, cos, sin, eps=1e-6, offset=0.0, layout="half"):
    """float64 ``rot(x / sqrt(mean(x²) + eps) * (offset + w))`` and its error scale."""
    n = norm64(x.detach().double(), w.detach().double(), eps, offset)
    return rotate64(n, cos, sin, layout)


def oracle_grads(x, w, cos, sin, g, eps=1e-6, offset=0.0, layout="half"):
    """float64 ``(dx, dw)`` for upstream ``g`` (torch's autograd of the oracle), and their
    error scales: the backward formula on absolute values,
    ``dx_j = r w_j g'_j - r³ x_j / d · Σ_i x_i w_i g'_i`` with ``g' = Rᵀ g``, ``dw = Σ_rows x r g'``."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y, _ = rotate64(norm64(x64, w64, eps, offset), cos, sin, layout)
    dx, dw = torch.autograd.grad(y, (x64, w64), g.double())
    d = x.shape[-1]
    xa, wa = x.detach().double().abs(), (offset + w.detach().double()).abs()
    rs = 1 / torch.sqrt((xa * xa).mean(-1, keepdim=True) + eps)
    _, ga = rotate64(g.double(), cos, sin, layout)  # |Rᵀ g| scale (the same sums as R g)
    sx = rs * wa * ga + rs**3 * xa / d * (xa * wa * ga).sum(-1, keepdim=True)
    sw = (xa * rs * ga).reshape(-1, d).sum(0)
    return dx, dw, sx, sw


# ------------------------------------------------------------------------------------------------
# the bound


def compute_dtype(x_dtype):
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def ulp(v, dtype):
    """The spacing of ``dtype`` at ``|v|`` (float64 tensor); subnormal spacing below tiny."""
    fi = torch.finfo(dtype)
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}[dtype]
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(fi.tiny))) - mant)


def bound(ref, scale, out_dtype, cdt, c=C_ELEM):
    u = 2.0**-53 if cdt == torch.float64 else 2.0**-24
    delta = c * u * scale
    if torch.finfo(out_dtype).bits < torch.finfo(cdt).bits:  # one rounding of the compute-dtype value
        delta = delta + 0.5 * ulp(ref.abs() + delta, out_dtype)
    return delta


def assert_oracle(out, ref, scale, cdt, what, c=C_ELEM):
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    err = (out.detach().double() - ref).abs()
    tol = bound(ref, scale, out.dtype, cdt, c)
    bad = ~(err <= tol)  # NaN counts as bad
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0])
        ratio = float((err / tol.clamp_min(1e-300))[bad].max()) if bad.sum() else 0.0
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {out.numel()} elements beyond the bound (max err/bound {ratio:.3g}); "
            f"first at {i}: got {float(out[i])!r}, oracle {float(ref[i])!r}, bound {float(tol[i]):.3g}"
        )


def run_and_check(backend, q, k, wq, wk, cos, sin, *, eps=1e-6, offset=0.0, layout="half", grads=True):
    """Forward (and backward: dq, dk, dq_weight, dk_weight) of one call against the oracle.

    ``q``/``k`` keep their strides: the leaves are ``detach()`` views of the same memory.
    Also checks the outputs' shapes/dtypes and that nothing of the inputs was written.
    """
    before = [t.clone() for t in (q, k, wq, wk, cos, sin)]
    leaves = [t.detach().requires_grad_(grads) for t in (q, k, wq, wk)]
    qo, ko = apply_qk_norm_rotary(*leaves, cos, sin, eps=eps, weight_offset=offset, layout=layout, backend=backend)
    assert (qo.shape, qo.dtype, ko.shape, ko.dtype) == (q.shape, q.dtype, k.shape, k.dtype)
    for nm, o, x, w in (("q", qo, q, wq), ("k", ko, k, wk)):
        ref, sc = oracle(x, w, cos, sin, eps, offset, layout)
        assert_oracle(o, ref, sc, compute_dtype(x.dtype), f"{backend} forward {nm}")
    if grads:
        gq, gk = torch.randn(q.shape).to(q.dtype), torch.randn(k.shape).to(k.dtype)
        dq, dk, dwq, dwk = torch.autograd.grad((qo, ko), leaves, (gq, gk))
        for nm, dx, dw, x, w, g in (("q", dq, dwq, q, wq, gq), ("k", dk, dwk, k, wk, gk)):
            assert (dx.dtype, dw.dtype, dw.shape) == (x.dtype, w.dtype, w.shape)
            rx, rw, sx, sw = oracle_grads(x, w, cos, sin, g, eps, offset, layout)
            cdt = compute_dtype(x.dtype)
            assert_oracle(dx, rx, sx, cdt, f"{backend} d{nm}")
            assert_oracle(dw, rw, sw, cdt, f"{backend} d{nm}_weight", c=C_ELEM + math.sqrt(x.numel() // x.shape[-1]))
    for t, b in zip((q, k, wq, wk, cos, sin), before):
        assert torch.equal(t, b), "an out-of-place call wrote into its inputs"
    return qo, ko


def tables(shape, dtype=F32):
    """cos/sin of random angles (every quadrant: sin = 0 at position 0 would hide a wrong pairing)."""
    ang = torch.rand(shape, dtype=torch.float64) * 2 * math.pi
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def weight(d, dtype, offset):
    """Weights that are not 1 (a weight applied to the wrong dim shows), near 0 for Gemma's 1 + w."""
    w = 0.3 * torch.randn(d) if offset else 1.0 + 0.5 * torch.randn(d)
    return w.to(dtype)


def x_(shape, dtype, mag=2.0):
    """Rows of varied magnitude (each row is normalised by its own RMS, not the tensor's)."""
    rowscale = torch.exp2(torch.randint(-3, 4, shape[:-1] + (1,)).double())
    return (mag * torch.randn(shape, dtype=torch.float64) * rowscale).to(dtype)


# ------------------------------------------------------------------------------------------------
# the oracle itself


def test_oracle_agrees_with_torch_rms_norm_and_ropekits_dense_matrix():
    x, w = torch.randn(2, 5, 3, 24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    cos, sin = tables((5, 1, 8), torch.float64)
    for layout in ("half", "interleaved"):
        n = norm64(x, w, 1e-5, 1.0)
        torch.testing.assert_close(n, torch.nn.functional.rms_norm(x, (24,), 1.0 + w, 1e-5), rtol=1e-14, atol=0)
        y, _ = oracle(x, w, cos, sin, 1e-5, 1.0, layout)
        torch.testing.assert_close(y, ropekit.reference.apply(n, cos, sin, layout), rtol=1e-14, atol=1e-15)


class _Mutant:
    """Plausible wrong kernels; the checker used for the backends must reject every one."""

    @staticmethod
    def rounding_twice(x, w, cos, sin, layout):  # the normalised value rounded to x.dtype, then rotated
        n = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).to(x.dtype)
        return apply_rotary_qk(n, n, cos, sin, layout=layout, backend="eager")[0]

    @staticmethod
    def mean_over_r(x, w, cos, sin, layout):
        r = 2 * cos.shape[-1]
        xf = x.float()
        n = xf * torch.rsqrt(xf[..., :r].pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
        return apply_rotary_qk(n, n, cos, sin, layout=layout, backend="eager")[0].to(x.dtype)

    @staticmethod
    def other_layout(x, w, cos, sin, layout):
        other = "interleaved" if layout == "half" else "half"
        return apply_qk_norm_rotary(x, x, w, w, cos, sin, layout=other, backend="eager")[0]

    @staticmethod
    def weight_after_rotation(x, w, cos, sin, layout):
        one = torch.ones_like(w)
        y = apply_qk_norm_rotary(x, x, one, one, cos, sin, layout=layout, backend="eager")[0]
        return (y.float() * w.float()).to(x.dtype)

    @staticmethod
    def truncating_cast(x, w, cos, sin, layout):  # float32 -> bf16 by dropping bits, not rounding
        y = apply_qk_norm_rotary(x.float(), x.float(), w, w, cos, sin, layout=layout, backend="eager")[0]
        return (y.view(torch.int32) & ~0xFFFF).view(torch.float32).to(x.dtype)


@pytest.mark.parametrize("mutant", [m for m in vars(_Mutant) if not m.startswith("_")])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_the_bound_rejects_wrong_kernels(mutant, layout):
    """The tolerance is tight enough to tell a one-rounding kernel from each mutant (bf16)."""
    x = x_((2, 8, 4, 96), torch.bfloat16)
    w = weight(96, torch.bfloat16, 0.0)
    cos, sin = tables((8, 1, 32))
    out = getattr(_Mutant, mutant)(x, w, cos, sin, layout)
    ref, sc = oracle(x, w, cos, sin, 1e-6, 0.0, layout)
    with pytest.raises(AssertionError, match="beyond the bound"):
        assert_oracle(out, ref, sc, F32, mutant)
    # and the real thing passes the same check on the same data
    good = apply_qk_norm_rotary(x, x, w, w, cos, sin, layout=layout, backend="eager")[0]
    assert_oracle(good, ref, sc, F32, "eager")


# ------------------------------------------------------------------------------------------------
# forward and backward against the oracle


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward_vs_oracle(backend, dtype, layout, offset):
    b, s, hq, hk, d = 2, 6, 4, 2, 64
    q, k = x_((b, s, hq, d), dtype), x_((b, s, hk, d), dtype)
    wq, wk = weight(d, dtype, offset), weight(d, dtype, offset)
    cos, sin = tables((s, 1, d // 2))
    run_and_check(backend, q, k, wq, wk, cos, sin, offset=offset, layout=layout)


def _bshd(dtype, d=64, r=None, hq=4, hk=2, b=2, s=5):
    r = r or d
    return dict(q=x_((b, s, hq, d), dtype), k=x_((b, s, hk, d), dtype), d=d, tab=(s, 1, r // 2))


def _case_fused_qkv(dtype, d=32, hq=4, hk=2, b=2, s=5):
    buf = x_((b, s, (hq + 2 * hk) * d), dtype).view(b, s, hq + 2 * hk, d)  # one projection output
    return dict(q=buf[:, :, :hq], k=buf[:, :, hq:hq + hk], d=d, tab=(s, 1, d // 2))


def _case_bshd_of_bhsd(dtype, d=32, b=2, s=5):
    q = x_((b, 4, s, d), dtype).transpose(1, 2)
    k = x_((b, 2, s, d), dtype).transpose(1, 2)
    return dict(q=q, k=k, d=d, tab=(s, 1, d // 2))


def _case_last_stride(dtype, d=16, b=2, s=5):
    q = x_((b, s, d, 4), dtype).transpose(-1, -2)  # stride 4 along d
    k = x_((b, s, 2, 2 * d), dtype)[..., ::2]  # stride 2 along d
    return dict(q=q, k=k, d=d, tab=(s, 1, d // 4))


def _case_strided_params(dtype, d=32, b=2, s=5):
    """Weights and tables that are strided views (stride 2 / a slice of a wider table)."""
    c = _bshd(dtype, d=d, b=b, s=s)
    c["w"] = lambda wd, off: weight(2 * d, wd, off)[::2]
    c["tables"] = lambda: tuple(t[..., : d // 2] for t in tables((s, 1, d)))
    return c


SHAPES = {
    **{f"d{d}_r{r}_{lay}": (lambda dt, d=d, r=r: _bshd(dt, d=d, r=r), lay)
       for d, r in [(80, 40), (96, 64), (6, 2), (2, 2), (130, 128), (128, 128), (64, 32)]
       for lay in ("half", "interleaved")},
    "gqa_hk1": (lambda dt: _bshd(dt, hq=8, hk=1), "half"),
    "mha_hq_eq_hk": (lambda dt: _bshd(dt, hq=3, hk=3), "interleaved"),
    "more_k_heads": (lambda dt: _bshd(dt, hq=1, hk=4), "half"),
    "bhsd": (lambda dt: dict(q=x_((2, 4, 5, 32), dt), k=x_((2, 1, 5, 32), dt), d=32, tab=(5, 16)), "half"),
    "thd": (lambda dt: dict(q=x_((9, 4, 32), dt), k=x_((9, 2, 32), dt), d=32, tab=(9, 1, 12)), "interleaved"),
    "extra_leading": (lambda dt: dict(q=x_((2, 3, 4, 4, 16), dt), k=x_((2, 3, 4, 1, 16), dt), d=16, tab=(4, 1, 8)),
                      "half"),
    "bshd_view_of_bhsd": (_case_bshd_of_bhsd, "half"),
    "fused_qkv_slices": (_case_fused_qkv, "interleaved"),
    "non_unit_last_stride": (_case_last_stride, "half"),
    "strided_weight_and_tables": (_case_strided_params, "interleaved"),
    "tables_1_1_r2": (lambda dt: dict(_bshd(dt), tab=(1, 1, 32)), "half"),
    "tables_r2_only": (lambda dt: dict(_bshd(dt), tab=(32,)), "interleaved"),
    "tables_per_batch": (lambda dt: dict(_bshd(dt), tab=(2, 5, 1, 32)), "half"),
    "tables_expanded": (lambda dt: dict(_bshd(dt), tables=lambda: tuple(t.expand(5, 1, 32) for t in tables((1, 1, 32)))),
                        "interleaved"),
    "tables_bf16": (lambda dt: dict(_bshd(dt), tables=lambda: tables((5, 1, 32), torch.bfloat16)), "half"),
    "tables_f64": (lambda dt: dict(_bshd(dt), tables=lambda: tables((5, 1, 32), torch.float64)), "interleaved"),
    "q_k_dtypes_differ": (lambda dt: dict(_bshd(dt), k=x_((2, 5, 2, 64), torch.bfloat16 if dt == F32 else F32)), "half"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_strides_tables_vs_oracle(backend, case, dtype):
    make, layout = SHAPES[case]
    c = make(dtype)
    d = c["d"]
    mk_w = c.get("w", lambda wd, off: weight(d, wd, off))
    wq, wk = mk_w(c["q"].dtype, 0.0), mk_w(c["k"].dtype, 0.0)
    cos, sin = c["tables"]() if "tables" in c else tables(c["tab"])
    run_and_check(backend, c["q"], c["k"], wq, wk, cos, sin, layout=layout)


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("xdt,wdt", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                     (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16),
                                     (torch.float32, torch.float64), (torch.float64, torch.float32)], ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_dtype_differs_from_q(backend, xdt, wdt, offset):
    """The weight is converted exactly to the compute dtype and the offset added there (a
    bf16 ``1 + w`` would round: Gemma's weights are near 0, so that shows)."""
    q, k = x_((2, 5, 4, 48), xdt), x_((2, 5, 2, 48), xdt)
    wq, wk = weight(48, wdt, offset), weight(48, wdt, offset)
    cos, sin = tables((5, 1, 20))
    run_and_check(backend, q, k, wq, wk, cos, sin, offset=offset, layout="interleaved")


@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-3, 0.1, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_eps(backend, dtype, eps):
    """Small inputs (mean square ~1e-4 .. 1e-1) so that eps matters: added to the mean
    square, inside the square root, once per row."""
    q, k = x_((2, 5, 4, 32), dtype, mag=0.02), x_((2, 5, 2, 32), dtype, mag=0.02)
    wq, wk = weight(32, dtype, 0.0), weight(32, dtype, 0.0)
    cos, sin = tables((5, 1, 12))
    run_and_check(backend, q, k, wq, wk, cos, sin, eps=eps, layout="half")


@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(backend, dtype):
    """An all-zero head row comes out as zeros (eps > 0: no NaN), gradients finite; the
    other rows of the same call are unaffected."""
    q, k = x_((2, 5, 4, 32), dtype), x_((2, 5, 2, 32), dtype)
    q[0, 1] = 0  # every q head of one token
    q[1, 3, 2] = 0  # one head
    k[:, 4] = 0
    wq, wk = weight(32, dtype, 1.0), weight(32, dtype, 1.0)
    cos, sin = tables((5, 1, 16))
    qo, ko = run_and_check(backend, q, k, wq, wk, cos, sin, offset=1.0, layout="interleaved")
    assert (qo[0, 1] == 0).all() and (qo[1, 3, 2] == 0).all() and (ko[:, 4] == 0).all()
    assert qo.isfinite().all() and ko.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_square_overflow_gives_zero_rows(backend, dtype):
    """|x| = 1e30: x² overflows float32, the float32 mean square is inf and the row is
    exact zeros (see the module docstring); no NaN/inf, other rows exact to the oracle."""
    d = 32
    q, k = x_((1, 4, 3, d), dtype), x_((1, 4, 2, d), dtype)
    q[0, 1] = 1e30
    q[0, 2, 1] = torch.linspace(-1e30, 1e30, d)
    k[0, 0, 1, 5] = 1e30  # a single huge element in an otherwise ordinary row
    wq, wk = weight(d, dtype, 0.0), weight(d, dtype, 0.0)
    cos, sin = tables((4, 1, 16))
    with torch.no_grad():
        qo, ko = apply_qk_norm_rotary(q, k, wq, wk, cos, sin, backend=backend)
    huge = torch.zeros(q.shape[:-1], dtype=torch.bool)
    huge[0, 1], huge[0, 2, 1] = True, True
    assert (qo[huge] == 0).all() and (ko[0, 0, 1] == 0).all()
    assert qo.isfinite().all() and ko.isfinite().all()
    # torch's own float32 RMSNorm says the same (the behaviour this follows)
    ref_torch = torch.nn.functional.rms_norm(q.float(), (d,), wq.float(), 1e-6)
    assert (ref_torch[huge] == 0).all()
    ref, sc = oracle(q, wq, cos, sin)
    assert_oracle(qo[~huge], ref[~huge], sc[~huge], F32, f"{backend} ordinary rows beside huge ones")
    ref, sc = oracle(k, wk, cos, sin)
    assert_oracle(ko[0, 1:], ref[0, 1:], sc[0, 1:], F32, f"{backend} k rows beside a huge one")


@pytest.mark.parametrize("dtype,mag", [(torch.float32, 1e15), (torch.float32, 1e-15), (torch.bfloat16, 1e15),
                                       (torch.bfloat16, 1e-15), (torch.float16, 6e4), (torch.float16, 1e-3),
                                       (torch.float64, 1e30), (torch.float64, 1e150), (torch.float64, 1e-150)], ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_and_small_magnitudes_within_range(backend, dtype, mag):
    """Magnitudes whose squares (and their sum over d) stay in the compute dtype's range:
    exact to the oracle, relative to the row (the norm is scale-free)."""
    f64 = torch.float64
    q, k = (mag * torch.randn(2, 3, 4, 32, dtype=f64)).to(dtype), (mag * torch.randn(2, 3, 1, 32, dtype=f64)).to(dtype)
    if dtype == torch.float16:
        q, k = q.clamp(-6e4, 6e4), k.clamp(-6e4, 6e4)
    wq, wk = weight(32, dtype, 0.0), weight(32, dtype, 0.0)
    cos, sin = tables((3, 1, 16))
    eps = 0.0 if mag < 1 else 1e-6  # eps would dominate the tiny rows' mean square
    # gradients where r³ = mean(x²)^-3/2 stays normal in the compute dtype (see the next test)
    grads = 1e-3 <= mag <= 1e5 or (dtype == torch.float64 and 1e-3 <= mag <= 1e30)
    run_and_check(backend, q, k, wq, wk, cos, sin, eps=eps, layout="half", grads=grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_at_large_magnitude_float32(backend):
    """rms(x) ~ 1e15. The composition's autograd of ``rsqrt`` formed mean(x²)^-3/2, subnormal
    for rms(x) > ~4e12 (0.2-3% gradient error at 1e15, as torch's rms_norm): an xfail until
    the composition took ``1 / sqrt`` (the kernels' formula), whose derivative has no such
    intermediate."""
    q, k = (1e15 * torch.randn(2, 3, 4, 32)), torch.randn(2, 3, 1, 32)
    cos, sin = tables((3, 1, 16))
    run_and_check(backend, q, k, weight(32, F32, 0.0), weight(32, F32, 0.0), cos, sin)


@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend, dtype):
    """0 tokens: empty outputs, zero weight gradients; k with 0 heads: q still right."""
    d = 16
    q, k = torch.randn(2, 0, 4, d).to(dtype), torch.randn(2, 0, 2, d).to(dtype)
    wq, wk = (weight(d, dtype, 0.0).requires_grad_() for _ in range(2))
    cos, sin = tables((0, 1, 8))
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    qo, ko = apply_qk_norm_rotary(qg, kg, wq, wk, cos, sin, backend=backend)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    (qo.sum() + ko.sum()).backward()
    assert torch.equal(wq.grad, torch.zeros_like(wq)) and torch.equal(wk.grad, torch.zeros_like(wk))
    assert qg.grad.shape == q.shape
    qe, ke = q.clone(), k.clone()
    assert apply_qk_norm_rotary(qe, ke, wq.detach(), wk.detach(), cos, sin, inplace=True, backend=backend)[0] is qe
    # k without heads beside a normal q
    q1, k0 = x_((2, 3, 4, d), dtype), torch.randn(2, 3, 0, d).to(dtype)
    cos, sin = tables((3, 1, 8))
    run_and_check(backend, q1, k0, weight(d, dtype, 0.0), weight(d, dtype, 0.0), cos, sin)


# ------------------------------------------------------------------------------------------------
# gradcheck, the unfused composition


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("backend", [b for b in ("eager", "cpu") if b in BACKENDS])
def test_gradcheck(backend, layout, inplace):
    """Finite differences in float64: q, k and both weights (partial rotary, GQA, offset, eps)."""
    f64 = torch.float64
    q, k = torch.randn(2, 3, 2, 6, dtype=f64), torch.randn(2, 3, 1, 6, dtype=f64)
    wq, wk = torch.randn(6, dtype=f64), torch.randn(6, dtype=f64)
    cos, sin = tables((3, 1, 2), f64)

    def fn(q, k, wq, wk):
        if inplace:  # on non-leaves (the leaves autograd may not modify)
            q, k = q * 1.0, k * 1.0
        return apply_qk_norm_rotary(q, k, wq, wk, cos, sin, eps=1e-3, weight_offset=1.0, layout=layout,
                                    inplace=inplace, backend=backend)

    args = tuple(t.requires_grad_() for t in (q, k, wq, wk))
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_unfused_composition(backend, dtype, layout):
    """``rms_norm(x.float(), (d,), offset + w.float(), eps)`` then ``apply_rotary_qk(...,
    backend="eager")`` in float32, cast once: equal up to float32 rounding. (``offset + w``
    is added in float32: ``(offset + w).float()`` would round ``1 + w`` in bf16 first.)

    float32: the bound above; bf16/fp16: the two can differ only where their float32 values
    straddle a rounding boundary, by one ulp, on a few elements."""
    d, off, eps = 80, 1.0, 1e-5
    q, k = x_((2, 6, 4, d), dtype), x_((2, 6, 2, d), dtype)
    wq, wk = weight(d, dtype, off), weight(d, dtype, off)
    cfg = RopeConfig(d, rotary_dim=64)
    cos, sin = cos_sin(cfg, torch.randint(0, 4096, (2, 6)))  # [b, s, r/2] from ropekit's own tables
    cos, sin = cos[:, :, None], sin[:, :, None]
    nq = torch.nn.functional.rms_norm(q.float(), (d,), off + wq.float(), eps)
    nk = torch.nn.functional.rms_norm(k.float(), (d,), off + wk.float(), eps)
    uq, uk = apply_rotary_qk(nq, nk, cos, sin, layout=layout, backend="eager")
    qo, ko = apply_qk_norm_rotary(q, k, wq, wk, cos, sin, eps=eps, weight_offset=off, layout=layout, backend=backend)
    for nm, o, u, x, w in (("q", qo, uq, q, wq), ("k", ko, uk, k, wk)):
        _, sc = oracle(x, w, cos, sin, eps, off, layout)
        delta = C_ELEM * 2.0**-24 * sc
        diff = (o.double() - u.to(dtype).double()).abs()
        if dtype == torch.float32:
            assert (diff <= delta).all(), f"{nm}: {float((diff / delta).max()):.3g} x the float32 bound"
        else:
            top = torch.maximum(o.double().abs(), u.double().abs())
            assert (diff <= ulp(top, dtype) + delta).all(), f"{nm}: a difference of more than one ulp"
            assert (diff != 0).double().mean() < 0.01, f"{nm}: {int((diff != 0).sum())} elements differ"


# ------------------------------------------------------------------------------------------------
# in place


@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_same_bits_as_out_of_place(backend, dtype):
    """In place on q and k sliced from one qkv buffer: returns q and k themselves, writes
    the out-of-place result bit for bit, and leaves v and nothing else touched."""
    b, s, hq, hk, d = 2, 5, 4, 2, 48
    buf = x_((b, s, hq + 2 * hk, d), dtype)
    q, k, v = buf[:, :, :hq], buf[:, :, hq:hq + hk], buf[:, :, hq + hk:]
    wq, wk = weight(d, dtype, 0.0), weight(d, dtype, 0.0)
    cos, sin = tables((s, 1, 20))
    v0 = v.clone()
    want_q, want_k = apply_qk_norm_rotary(q, k, wq, wk, cos, sin, layout="interleaved", backend=backend)
    qo, ko = apply_qk_norm_rotary(q, k, wq, wk, cos, sin, layout="interleaved", inplace=True, backend=backend)
    assert qo is q and ko is k
    assert torch.equal(q, want_q) and torch.equal(k, want_k) and torch.equal(v, v0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_under_autograd_on_projection_views(backend, dtype):
    """``qkv = lin(x)``; q and k its views; in place then backward: the same forward bits
    and the same gradients (projection weight, bias, input, both norm weights) as out of place."""
    b, s, hq, hk, d, hidden = 2, 5, 4, 2, 32, 24
    lin = torch.nn.Linear(hidden, (hq + 2 * hk) * d).to(dtype)
    x = torch.randn(b, s, hidden).to(dtype).requires_grad_()
    wq, wk = weight(d, dtype, 0.0).requires_grad_(), weight(d, dtype, 0.0).requires_grad_()
    cos, sin = tables((s, 1, 12))
    gq, gk, gv = torch.randn(b, s, hq, d).to(dtype), torch.randn(b, s, hk, d).to(dtype), torch.randn(b, s, hk, d).to(dtype)
    res = []
    for inplace in (False, True):
        params = (lin.weight, lin.bias, x, wq, wk)
        for p in params:
            p.grad = None
        qkv = lin(x).view(b, s, hq + 2 * hk, d)
        q, k, v = qkv[..., :hq, :], qkv[..., hq:hq + hk, :], qkv[..., hq + hk:, :]
        qo, ko = apply_qk_norm_rotary(q, k, wq, wk, cos, sin, eps=1e-5, inplace=inplace, backend=backend)
        if inplace:
            assert qo is q and ko is k
        ((qo * gq).sum() + (ko * gk).sum() + (v * gv).sum()).backward()
        res.append([qo.detach().clone(), ko.detach().clone()] + [p.grad.clone() for p in params])
    for name, a, c in zip(("q", "k", "lin.weight", "lin.bias", "x", "q_weight", "k_weight"), *res):
        assert torch.equal(a, c), f"{name}: in place differs from out of place by {float((a - c).abs().max())}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_refusals(backend):
    q, k = torch.randn(1, 3, 4, 16), torch.randn(1, 3, 2, 16)
    w = torch.ones(16)
    cos, sin = tables((3, 1, 8))
    q0 = q.clone()
    for kk, what in ((q[:, :, 1:3], "overlapping"), (q, "q itself")):
        with pytest.raises(RopeError, match="share no memory|overlap"):
            apply_qk_norm_rotary(q, kk, w, w, cos, sin, inplace=True, backend=backend)
        assert torch.equal(q, q0), f"a refused call ({what}) wrote into q"
    with pytest.raises(RopeError, match="leaf"):
        apply_qk_norm_rotary(q.clone().requires_grad_(), k, w, w, cos, sin, inplace=True, backend=backend)
    with pytest.raises(RopeError, match="alias"):
        apply_qk_norm_rotary(q[:, :1].expand(1, 3, 4, 16), k, w, w, cos, sin, inplace=True, backend=backend)
    # a leaf weight that requires grad is fine in place (only q and k are written)
    wg = w.clone().requires_grad_()
    qo, _ = apply_qk_norm_rotary(q.clone(), k.clone(), wg, wg, cos, sin, inplace=True, backend=backend)
    qo.sum().backward()
    assert wg.grad is not None and wg.grad.isfinite().all()


# ------------------------------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_calls_same_bits(backend):
    q, k = x_((2, 7, 4, 64), torch.bfloat16), x_((2, 7, 2, 64), torch.bfloat16)
    wq, wk = weight(64, torch.float32, 0.0), weight(64, torch.float32, 0.0)
    cos, sin = tables((7, 1, 32))
    gq, gk = torch.randn(q.shape).to(q.dtype), torch.randn(k.shape).to(k.dtype)

    def once():
        leaves = [t.clone().requires_grad_() for t in (q, k, wq, wk)]
        out = apply_qk_norm_rotary(*leaves, cos, sin, weight_offset=1.0, backend=backend)
        return list(out) + list(torch.autograd.grad(out, leaves, (gq, gk)))

    first = once()
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first, once()))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled cpu operators are not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_cpu_same_bits_for_1_and_2_threads(dtype):
    """Inputs above the operators' ~1 MB threshold for parallel work (q: 4 MiB in float32):
    forward, dq, dk and the weight gradients (a reduction over every row) do not depend on
    the thread count; "auto" on CPU is the cpu backend."""
    b, s, hq, hk, d = 1, 512, 16, 4, 128
    q, k = x_((b, s, hq, d), dtype), x_((b, s, hk, d), dtype)
    wq, wk = weight(d, dtype, 0.0), weight(d, dtype, 0.0)
    cos, sin = tables((s, 1, d // 2))
    gq, gk = torch.randn(q.shape).to(dtype), torch.randn(k.shape).to(dtype)
    n0 = torch.get_num_threads()
    res = {}
    try:
        for nt, be in ((1, "cpu"), (2, "cpu"), (2, "auto")):
            torch.set_num_threads(nt)
            leaves = [t.clone().requires_grad_() for t in (q, k, wq, wk)]
            out = apply_qk_norm_rotary(*leaves, cos, sin, backend=be)
            res[nt, be] = list(out) + list(torch.autograd.grad(out, leaves, (gq, gk)))
    finally:
        torch.set_num_threads(n0)
    names = ("q_out", "k_out", "dq", "dk", "dq_weight", "dk_weight")
    for key in ((2, "cpu"), (2, "auto")):
        for nm, a, c in zip(names, res[1, "cpu"], res[key]):
            assert torch.equal(a, c), f"{nm}: 1 thread vs {key} differ by {float((a.double() - c.double()).abs().max())}"


# ------------------------------------------------------------------------------------------------
# refusals: every one a RopeError (a ValueError) that names the problem


def _bad_cases():
    d = 16
    q, k, w = torch.randn(1, 3, 4, d), torch.randn(1, 3, 2, d), torch.ones(d)
    cos, sin = tables((3, 1, 8))
    ok = dict(q=q, k=k, q_weight=w, k_weight=w, cos=cos, sin=sin)
    C = lambda match, **kw: (dict(ok, **kw), match)  # noqa: E731
    return {
        "weight_h_times_d": C(r"q_weight of shape \[16\].*got shape \[64\]", q_weight=torch.ones(4 * d)),
        "weight_d_plus_1": C(r"k_weight of shape \[16\].*got shape \[17\]", k_weight=torch.ones(d + 1)),
        "weight_2d": C(r"q_weight of shape \[16\].*\[1, 16\]", q_weight=torch.ones(1, d)),
        "weight_0d": C(r"q_weight of shape", q_weight=torch.tensor(1.0)),
        "weight_int": C("q_weight of a real floating dtype", q_weight=torch.ones(d, dtype=torch.int32)),
        "weight_bool": C("k_weight of a real floating dtype", k_weight=torch.ones(d, dtype=torch.bool)),
        "weight_complex": C("q_weight of a real floating dtype", q_weight=torch.ones(d, dtype=torch.complex64)),
        "weight_other_device": C("q_weight on q's device", q_weight=w.to("meta")),
        "weight_list": C("q_weight a torch.Tensor", q_weight=[1.0] * d),
        "weight_none": C("k_weight a torch.Tensor", k_weight=None),
        "weight_for_q_dim_given_to_k": C(r"k_weight of shape \[32\]", k=torch.randn(1, 3, 2, 2 * d)),
        "weight_for_k_dim_given_to_q": C(r"q_weight of shape \[32\]", q=torch.randn(1, 3, 4, 2 * d)),
        # a named backend refuses q's dtype before the dtype check itself ("cpu": float dtypes only)
        "q_int": C('q of a real floating dtype|backend "cpu" supports, got torch.int32', q=q.int()),
        "k_int64": C("k of a real floating dtype", k=k.long()),
        "q_complex": C('q of a real floating dtype|backend "cpu" supports, got torch.complex64', q=q.to(torch.complex64)),
        "q_list": C("q a torch.Tensor", q=q.tolist()),
        "k_numpy": C("k a torch.Tensor", k=k.numpy()),
        "q_none": C("q a torch.Tensor", q=None),
        "cos_list": C("cos a torch.Tensor", cos=cos.tolist()),
        "q_0d": C(r"q \[\.\.\., d\]", q=torch.tensor(1.0)),
        "tables_full_width": C("width r/2 <= d/2", cos=torch.ones(3, 1, d), sin=torch.ones(3, 1, d)),
        "tables_too_wide": C("width r/2 <= d/2", cos=torch.ones(3, 1, d // 2 + 1), sin=torch.ones(3, 1, d // 2 + 1)),
        "tables_too_wide_for_k": C("width r/2 <= d/2 = 4", k=torch.randn(1, 3, 2, d // 2)),
        "cos_sin_shapes_differ": C("cos and sin of the same shape", sin=sin[..., :4]),
        "tables_not_broadcastable": C("broadcastable", cos=torch.ones(5, 1, 8), sin=torch.ones(5, 1, 8)),
        "tables_int": C("cos of a real floating dtype", cos=cos.int(), sin=sin.int()),
        "q_meta_k_cpu": C("device", q=q.to("meta"), q_weight=w.to("meta"), cos=cos.to("meta"), sin=sin.to("meta")),
        "q_cpu_k_meta": C("device", k=k.to("meta")),
        "tables_meta": C("cos on q's device", cos=cos.to("meta"), sin=sin.to("meta")),
        "eps_negative": C("eps a finite number >= 0", eps=-1e-6),
        "eps_nan": C("eps a finite number >= 0", eps=float("nan")),
        "eps_inf": C("eps a finite number >= 0", eps=math.inf),
        "eps_string": C("eps.*the string '1e-6'", eps="1e-6"),
        "eps_none": C("eps a finite number", eps=None),
        "eps_bool": C("eps a finite number", eps=True),
        "offset_inf": C("weight_offset a finite number", weight_offset=math.inf),
        "offset_nan": C("weight_offset a finite number", weight_offset=float("nan")),
        "offset_string": C("weight_offset.*the string", weight_offset="1"),
        "layout": C("layout in", layout="halves"),
        "backend": C("backend in", backend="nope"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_a_rope_error(backend, case):
    args, match = BAD[case]
    args = dict(args)
    kw = {n: args.pop(n) for n in ("eps", "weight_offset", "layout", "backend") if n in args}
    kw.setdefault("backend", backend)
    pos = [args.pop(n) for n in ("q", "k", "q_weight", "k_weight", "cos", "sin")]
    with pytest.raises(RopeError, match=match) as e:
        apply_qk_norm_rotary(*pos, **kw)
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert msg.startswith("expected ") and "Fix: " in msg, msg  # the house format: what, got, how to fix


# ------------------------------------------------------------------------------------------------
# graphs, meta


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("backend", [b for b in ("eager", "cpu") if b in BACKENDS] + ["auto"])
def test_compile_fullgraph_matches_eager(backend, inplace):
    """dynamo + AOTAutograd (``backend="aot_eager"``: no inductor build, ~1 s), forward and
    backward, in place on views of a projection output too."""
    import torch._dynamo

    torch._dynamo.reset()
    d = 16
    cos, sin = tables((5, 1, 6))

    def fn(x, wq, wk):
        qkv = x * 2.0
        q, k = qkv[:, :, :4], qkv[:, :, 4:6]
        qo, ko = apply_qk_norm_rotary(q, k, wq, wk, cos, sin, eps=1e-5, weight_offset=1.0, layout="interleaved",
                                      inplace=inplace, backend=backend)
        return qo, ko

    args = [torch.randn(2, 5, 8, d).requires_grad_(), weight(d, F32, 1.0).requires_grad_(),
            weight(d, F32, 1.0).requires_grad_()]
    gq, gk = torch.randn(2, 5, 4, d), torch.randn(2, 5, 2, d)
    try:
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        res = []
        for f in (fn, compiled):
            qo, ko = f(*args)
            res.append([qo.detach(), ko.detach()] + list(torch.autograd.grad((qo, ko), args, (gq, gk))))
    finally:
        torch._dynamo.reset()
    for nm, a, c in zip(("q", "k", "dx", "dq_weight", "dk_weight"), *res):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5, msg=lambda m: f"{nm}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_tensors(backend, dtype):
    m = torch.device("meta")
    q, k = torch.empty(2, 7, 4, 64, device=m, dtype=dtype), torch.empty(2, 7, 1, 64, device=m, dtype=dtype)
    w = torch.empty(64, device=m, dtype=F32)
    cos = sin = torch.empty(7, 1, 24, device=m)
    qo, ko = apply_qk_norm_rotary(q, k, w, w, cos, sin, backend=backend)
    assert (qo.shape, ko.shape, qo.dtype, ko.dtype, qo.device, ko.device) == (q.shape, k.shape, dtype, dtype, m, m)
    kt = torch.empty(2, 1, 7, 64, device=m, dtype=dtype).transpose(1, 2)  # a bshd view of bhsd memory
    qo, ko = apply_qk_norm_rotary(q, kt, w, w, cos, sin, backend=backend)
    assert ko.shape == kt.shape and ko.device == m


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_tensors_in_place(backend):
    m = torch.device("meta")
    q, k = torch.empty(2, 7, 4, 64, device=m), torch.empty(2, 7, 1, 64, device=m)
    w, cos = torch.empty(64, device=m), torch.empty(7, 1, 24, device=m)
    qo, ko = apply_qk_norm_rotary(q, k, w, w, cos, cos, inplace=True, backend=backend)
    assert qo is q and ko is k
