"""The cases of other RoPE libraries' public test suites, re-written against ropekit's API.

Each block names the peer suite it follows and the cases it takes from it; the test code is
ropekit's own. Every expected value comes from a float64 reference computed here (the
pair rotation as the peers' own torch references write it, ``rotate64``; frequencies from
the formulas of transformers' ``modeling_rope_utils``, ``inv_freq_*``), never from a number
copied out of a peer's snapshot.

- flash-attention ``tests/test_rotary.py``: ``apply_rotary_emb`` with arbitrary cos/sin
  tables of the input dtype, ``seqlen_offsets`` 0 / int / per-batch tensor, interleaved,
  in place, ``rotary_dim = headdim / 2``, packed ``cu_seqlens`` (varlen), the packed
  ``qkv`` / ``kv`` in-place variants (GQA included), forward and backward.
- vLLM ``tests/kernels/core/test_pos_encoding.py`` and ``test_rotary_embedding.py``:
  ``is_neox_style``, head sizes 32..256 (108 and 120 included), ``rotary_dim = 32``, query as
  ``[b, s, h, d]``, flattened ``[b, s, h*d]`` and sliced out of a wider head, no key,
  positions ``[b, s]`` into a ``cos_sin_cache``, several linear scaling factors batched in
  one concatenated cache (multi-LoRA).
- Liger-Kernel ``test/transformers/test_rope.py``: transformers' full-width cos/sin,
  ``bhsd`` transposed views, ``hk`` smaller and larger than ``hq``, head dim 92, float32
  and bfloat16, position ids ``[1, s]`` and ``[b, s]``, backward.
- transformers ``tests/utils/test_modeling_rope_utils.py``: ``inv_freq`` and the attention
  factor of every ``rope_type`` (default, linear, dynamic, yarn, longrope, llama3,
  proportional) for the configs those tests build, the nested per-layer-type form, dynamic
  NTK returning to the original frequencies after a long sequence, missing keys refused.

Tolerances: ropekit rotates in float32 (float64 for float64 inputs) and rounds once, so a
result must lie within one ulp of its dtype (at the larger of the two magnitudes) of the
float64 reference, plus the float32 rounding of the products, ``3·2^-24·(|a|+|b|)(|cos|+|sin|)``
per pair (which matters only where the pair's two terms cancel), plus the table's own
rounding where the reference uses exact angles rather than the tables ropekit was given.
Rotated lanes of an exact zero and the pass-through dims must match exactly.

Sizes are smaller than the peers' (CPU, every backend): the shapes keep what makes each case
hard (odd head counts, ``hk > hq``, non-power-of-two head dims, sequence lengths that are not
multiples of a tile). The Triton backend runs under ``TRITON_INTERPRET=1`` (the root conftest)
on a few cases only.
"""

from __future__ import annotations

import contextlib
import math
import zlib

import pytest
import torch

import ropekit
from ropekit import (
    RopeConfig,
    RopeError,
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_gather,
    apply_rotary_qk,
    cos_sin,
    from_full_width,
)
from ropekit.scaling import Linear
from _oracle import inv_freq64, triton_on_cpu

BACKENDS = ropekit.backends.available()
FAST = [b for b in BACKENDS if b != "triton"]
TRITON = ["triton"] if "triton" in BACKENDS else []
LAYOUTS = ("half", "interleaved")
LOW = (torch.float16, torch.bfloat16)


def _ctx(backend):
    """Triton on CPU tensors: run the ops' Triton impls (forward and backward) under the interpreter."""
    return triton_on_cpu("cpu", "peer") if backend == "triton" else contextlib.nullcontext()


def _gen(*key) -> torch.Generator:
    """A generator seeded from the case (the same in every process: crc32, not hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


# --------------------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------------------


def _lanes(r: int, layout: str):
    return (slice(0, r // 2), slice(r // 2, r)) if layout == "half" else (slice(0, r, 2), slice(1, r, 2))


def rotate64(x, cos, sin, layout):
    """``(y, mag)``: the pair rotation in float64, as flash-attention's ``apply_rotary_emb_torch``,
    vLLM's ``forward_native`` and transformers' ``rotate_half`` write it — pair ``(a, b)`` to
    ``(a·cos − b·sin, a·sin + b·cos)``, dims past ``r = 2·cos.shape[-1]`` unchanged — and the
    magnitude ``(|a|+|b|)(|cos|+|sin|)`` of each rotated lane (0 for pass-through dims), the
    scale of float32 rounding."""
    x, c, s = x.double(), cos.double(), sin.double()
    ia, ib = _lanes(2 * c.shape[-1], layout)
    a, b = x[..., ia], x[..., ib]
    y, mag = x.clone(), torch.zeros_like(x)
    y[..., ia], y[..., ib] = a * c - b * s, a * s + b * c
    m = (a.abs() + b.abs()) * (c.abs() + s.abs())
    mag[..., ia], mag[..., ib] = m, m
    return y, mag


def _ulp(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at magnitude ``m`` (float64), subnormals included."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(m.clamp_min(fi.tiny))  # m = f·2^e, f in [0.5, 1)
    return torch.ldexp(torch.full_like(m, fi.eps / 2), e)


def check(got, want, mag, *, table_u: float = 0.0, what: str = "output"):
    """``got`` within 1 ulp of its dtype + compute rounding of the float64 ``want`` (see the
    module docstring); exact where ``mag == 0`` (pass-through dims, zero pairs)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    u = 2.0**-53 if got.dtype == torch.float64 else 2.0**-24
    g = got.detach().double()
    err = (g - want).abs()
    tol = _ulp(torch.maximum(g.abs(), want.abs()), got.dtype) + (3 * u + table_u) * mag
    tol = torch.where(mag == 0, torch.zeros_like(tol), tol)
    bad = err > tol
    if bool(bad.any()):
        i = int(torch.argmax(torch.where(bad, err - tol, torch.zeros_like(err))))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements off; e.g. flat index {i}: got "
            f"{g.flatten()[i].item()!r}, want {want.flatten()[i].item()!r} (tol {tol.flatten()[i].item():.3g})"
        )


def exact_tables(pos, inv, af=1.0):
    """float64 cos/sin of ``pos · inv`` (exact integer positions), times the attention factor."""
    ang = pos.double()[..., None] * inv.double()
    return af * torch.cos(ang), af * torch.sin(ang)


def test_checker_rejects_wrong_results():
    """The comparison above is not vacuous: two ulps off, the other pairing, or a changed
    pass-through dim are caught."""
    gen = _gen("checker")
    x = torch.randn(4, 3, 16, generator=gen)
    c, s = cos_sin(RopeConfig(16, rotary_dim=8), torch.arange(4))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        xd = x.to(dtype)
        want, mag = rotate64(xd, c[:, None], s[:, None], "half")
        got = apply_rotary(xd, c[:, None], s[:, None], backend="reference")
        check(got, want, mag)
        two_ulps = (got.double() + 2 * _ulp(got.double().abs(), dtype)).to(dtype)
        with pytest.raises(AssertionError):
            check(two_ulps, want, mag)
        with pytest.raises(AssertionError):
            check(apply_rotary(xd, c[:, None], s[:, None], layout="interleaved", backend="reference"), want, mag)
        moved = got.clone()
        moved[..., 12] = moved[..., 12] * (1 + 2 * torch.finfo(dtype).eps)
        with pytest.raises(AssertionError):
            check(moved, want, mag)


# ======================================================================================
# flash-attention tests/test_rotary.py
# ======================================================================================

FA_B, FA_S, FA_H, FA_D = 3, 13, 2, 32  # peers: 32, 217, 4, 128


def fa_tables(s, r, dtype, gen):
    """Its ``generate_cos_sin``: uniform random angles (not position-derived) for 2·s rows, in x's dtype."""
    angle = torch.rand(2 * s, r // 2, generator=gen, dtype=torch.float64) * 2 * math.pi
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


def fa_offsets(kind, b, s, gen):
    """Its ``generate_seqlen_offsets``: 0, one int in [0, s], or an int32 tensor [b]."""
    if kind == "zero":
        return 0
    if kind == "int":
        return int(torch.randint(0, s + 1, (1,), generator=gen))
    return torch.randint(0, s + 1, (b,), generator=gen, dtype=torch.int32)


def _fa_positions(off, b, s):
    return (torch.as_tensor(off, dtype=torch.int64).reshape(-1, 1) + torch.arange(s)).expand(b, s)


def _fa_func(backend, dtype, layout, inplace, frac, kind):
    b, s, h, d = FA_B, FA_S, FA_H, FA_D
    r = int(frac * d)
    gen = _gen("fa", backend, dtype, layout, inplace, frac, kind)
    x0 = torch.randn(b, s, h, d, generator=gen).to(dtype)
    cos_t, sin_t = fa_tables(s, r, dtype, gen)
    off = fa_offsets(kind, b, s, gen)
    leaf = x0.clone().requires_grad_()
    # ropekit refuses in place on a leaf that requires grad (flash-attention writes into it
    # unseen by autograd): in place runs on a non-leaf, as after a projection
    x = leaf.clone() if inplace else leaf
    g = torch.randn(b, s, h, d, generator=gen).to(dtype)
    with _ctx(backend):
        out, _ = apply_rotary_gather(x, x.new_empty(b, s, 0, d), cos_t, sin_t, offsets=off, layout=layout,
                                     inplace=inplace, backend=backend)
        out.backward(g)
    pos = _fa_positions(off, b, s)
    c, sn = cos_t[pos][:, :, None], sin_t[pos][:, :, None]  # its index_cos_sin
    check(out, *rotate64(x0, c, sn, layout))
    if inplace:
        assert out.data_ptr() == x.data_ptr()
    else:
        assert torch.equal(leaf.detach(), x0)  # the input is left alone
    check(leaf.grad, *rotate64(g, c, -sn, layout), what="grad")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [*LOW, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fa_rotary_emb_func(backend, dtype, layout):
    """test_rotary_emb_func: inplace x rotary_fraction x seqlen_offsets kind."""
    for inplace in (False, True):
        for frac in (1.0, 0.5):
            for kind in ("zero", "int", "tensor"):
                _fa_func(backend, dtype, layout, inplace, frac, kind)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype, layout, inplace, frac, kind", [
    (torch.float16, "interleaved", True, 0.5, "tensor"),
    (torch.bfloat16, "half", False, 1.0, "int"),
], ids=str)
def test_fa_rotary_emb_func_triton(backend, dtype, layout, inplace, frac, kind):
    _fa_func(backend, dtype, layout, inplace, frac, kind)


def _fa_varlen(backend, dtype, layout, inplace, frac, kind, via_module=False):
    b, s, h, d = FA_B + 1, FA_S, FA_H, FA_D
    r = int(frac * d)
    gen = _gen("fa-varlen", backend, dtype, layout, inplace, frac, kind, via_module)
    lengths = torch.randint(max(1, s - 5), s + 1, (b,), generator=gen)
    lengths[1] = 0  # an empty sequence in the batch (cu_seqlens repeats a boundary)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)  # as unpad_input gives it
    t = int(cu[-1])
    x0 = torch.randn(t, h, d, generator=gen).to(dtype)
    off = fa_offsets(kind, b, s, gen)
    seq = torch.repeat_interleave(torch.arange(b), lengths)  # each token's sequence
    local = torch.arange(t) - cu.long()[seq]
    pos = local + (off.long()[seq] if isinstance(off, torch.Tensor) else off)
    leaf = x0.clone().requires_grad_()
    x = leaf.clone() if inplace else leaf
    g = torch.randn(t, h, d, generator=gen).to(dtype)
    with _ctx(backend):
        if via_module:  # exact tables from a config, the module's packed path
            cfg = RopeConfig(d, rotary_dim=r, layout=layout)
            out = RotaryEmbedding(cfg, backend=backend).rotate(x, cu_seqlens=cu, offsets=off, format="thd",
                                                               inplace=inplace)
            c, sn = exact_tables(pos, inv_freq64(r))
            table_u = 2.0**-24
        else:
            cos_t, sin_t = fa_tables(s, r, dtype, gen)
            out, _ = apply_rotary_gather(x, x.new_empty(t, 0, d), cos_t, sin_t, cu_seqlens=cu, offsets=off,
                                         format="thd", layout=layout, inplace=inplace, backend=backend)
            c, sn = cos_t[pos], sin_t[pos]
            table_u = 0.0
        out.backward(g)
    c, sn = c[:, None], sn[:, None]
    check(out, *rotate64(x0, c, sn, layout), table_u=table_u)
    if not inplace:
        assert torch.equal(leaf.detach(), x0)
    check(leaf.grad, *rotate64(g, c, -sn, layout), table_u=table_u, what="grad")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fa_rotary_emb_varlen_func(backend, dtype, layout):
    """test_rotary_emb_varlen_func: packed sequences (cu_seqlens) continuing at seqlen_offsets."""
    for inplace in (False, True):
        for frac in (1.0, 0.5):
            for kind in ("zero", "int", "tensor"):
                _fa_varlen(backend, dtype, layout, inplace, frac, kind)
    _fa_varlen(backend, dtype, layout, False, 0.5, "tensor", via_module=True)


@pytest.mark.parametrize("backend", TRITON)
def test_fa_rotary_emb_varlen_func_triton(backend):
    _fa_varlen(backend, torch.float16, "half", True, 0.5, "tensor")
    _fa_varlen(backend, torch.bfloat16, "interleaved", False, 1.0, "int", via_module=True)


def _fa_qkv(backend, dtype, layout, frac, kind, gqa):
    """test_rotary_emb_qkv: q and k of a packed qkv rotated in place, v untouched."""
    b, s, h, d = FA_B, FA_S, 4, FA_D
    hk = h // 2
    r = int(frac * d)
    gen = _gen("fa-qkv", backend, dtype, layout, frac, kind, gqa)
    shape = (b, s, h + 2 * hk, d) if gqa else (b, s, 3, h, d)
    qkv0 = torch.randn(shape, generator=gen).to(dtype)
    cos_t, sin_t = fa_tables(s, r, dtype, gen)
    off = fa_offsets(kind, b, s, gen)
    leaf = qkv0.clone().requires_grad_()
    qkv = leaf.clone()
    # plain slices: in place on unbind()/split() outputs is refused by autograd (see
    # test_inplace_on_multi_output_views_refused_before_writing)
    if gqa:
        parts = lambda t: (t[:, :, :h], t[:, :, h:h + hk], t[:, :, h + hk:])  # noqa: E731
    else:
        parts = lambda t: (t[:, :, 0], t[:, :, 1], t[:, :, 2])  # noqa: E731
    q, k, _ = parts(qkv)
    g = torch.randn(shape, generator=gen).to(dtype)
    with _ctx(backend):
        qo, ko = apply_rotary_gather(q, k, cos_t, sin_t, offsets=off, layout=layout, inplace=True, backend=backend)
        qkv.backward(g)
    assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
    pos = _fa_positions(off, b, s)
    c, sn = cos_t[pos][:, :, None], sin_t[pos][:, :, None]
    got_q, got_k, got_v = parts(qkv)
    x_q, x_k, x_v = parts(qkv0)
    check(got_q, *rotate64(x_q, c, sn, layout), what="q")
    check(got_k, *rotate64(x_k, c, sn, layout), what="k")
    assert torch.equal(got_v, x_v)
    grads = parts(leaf.grad)
    for name, gg, got in zip("qk", parts(g)[:2], grads[:2]):
        check(got, *rotate64(gg, c, -sn, layout), what=f"grad {name}")
    assert torch.equal(grads[2], parts(g)[2])


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("gqa", [False, True], ids=["qkv", "gqa"])
def test_fa_rotary_emb_qkv(backend, dtype, gqa):
    for layout in LAYOUTS:
        for frac in (1.0, 0.5):
            for kind in ("zero", "int", "tensor"):
                _fa_qkv(backend, dtype, layout, frac, kind, gqa)


@pytest.mark.parametrize("backend", TRITON)
def test_fa_rotary_emb_qkv_triton(backend):
    _fa_qkv(backend, torch.float16, "interleaved", 0.5, "tensor", True)


@pytest.mark.parametrize("backend", FAST + TRITON)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fa_rotary_emb_kv(backend, dtype):
    """test_rotary_emb_kv: the k half of a packed kv rotated in place (tables gathered by the
    caller: apply_rotary with [b, s, 1, r/2] tables), v untouched, head dim 64."""
    b, s, h, d = 2, 11, FA_H, 64
    combos = [("interleaved", 0.5, "tensor")] if backend == "triton" else [
        (lo, fr, kd) for lo in LAYOUTS for fr in (1.0, 0.5) for kd in ("zero", "int", "tensor")]
    for layout, frac, kind in combos:
        r = int(frac * d)
        gen = _gen("fa-kv", backend, dtype, layout, frac, kind)
        kv0 = torch.randn(b, s, 2, h, d, generator=gen).to(dtype)
        cos_t, sin_t = fa_tables(s, r, dtype, gen)
        pos = _fa_positions(fa_offsets(kind, b, s, gen), b, s)
        c, sn = cos_t[pos][:, :, None], sin_t[pos][:, :, None]
        leaf = kv0.clone().requires_grad_()
        kv = leaf.clone()
        g = torch.randn(kv.shape, generator=gen).to(dtype)
        with _ctx(backend):
            apply_rotary(kv[:, :, 0], c, sn, layout=layout, inplace=True, backend=backend)
            kv.backward(g)
        check(kv[:, :, 0], *rotate64(kv0[:, :, 0], c, sn, layout))
        assert torch.equal(kv[:, :, 1], kv0[:, :, 1])
        check(leaf.grad[:, :, 0], *rotate64(g[:, :, 0], c, -sn, layout), what="grad k")
        assert torch.equal(leaf.grad[:, :, 1], g[:, :, 1])


@pytest.mark.parametrize("backend", FAST + TRITON)
def test_fa_seqlen_offsets_through_module(backend):
    """The seqlen_offsets cases with the module's own exact tables: int32 [b] offsets (KV-cache
    lengths) for decode (s = 1) and chunks (s = 3), tables grown between calls."""
    combos = [("interleaved", [5000, 2], 1)] if backend == "triton" else [
        (lo, offs, s) for lo in LAYOUTS for offs in ([3, 700], [5000, 2], [0, 1], [9, 70000]) for s in (1, 3)]
    ropes = {lo: RotaryEmbedding(RopeConfig(64, rotary_dim=32, layout=lo), backend=backend) for lo in LAYOUTS}
    for layout, offs, s in combos:
        gen = _gen("fa-mod", backend, layout, offs, s)
        off = torch.tensor(offs, dtype=torch.int32)
        q = torch.randn(2, s, 4, 64, generator=gen).to(torch.bfloat16)
        k = torch.randn(2, s, 2, 64, generator=gen).to(torch.bfloat16)
        with _ctx(backend):
            qo, ko = ropes[layout](q, k, offsets=off)
        c, sn = exact_tables(off.long()[:, None] + torch.arange(s), inv_freq64(32))
        c, sn = c[:, :, None], sn[:, :, None]
        check(qo, *rotate64(q, c, sn, layout), table_u=2.0**-24, what=f"q {offs}")
        check(ko, *rotate64(k, c, sn, layout), table_u=2.0**-24, what=f"k {offs}")


@pytest.mark.parametrize("backend", FAST + TRITON)
def test_fa_offsets_past_the_table_refused(backend):
    """flash-attention asserts ``seqlen_offsets + seqlen <= seqlen_ro``: ropekit raises a RopeError
    and writes nothing (also in place)."""
    b, s, h, d = 2, 5, 2, 16
    cos_t, sin_t = fa_tables(s, d, torch.float32, _gen("fa-oob"))  # 2·s rows
    x, k = torch.randn(b, s, h, d), torch.randn(b, s, 1, d)
    x0, k0 = x.clone(), k.clone()
    with _ctx(backend):
        for off in (s + 1, torch.tensor([0, s + 1], dtype=torch.int32)):
            with pytest.raises(RopeError, match="position"):
                apply_rotary_gather(x, k, cos_t, sin_t, offsets=off, inplace=True, backend=backend)
            assert torch.equal(x, x0) and torch.equal(k, k0)
        cu = torch.tensor([0, 3, 10], dtype=torch.int32)
        with pytest.raises(RopeError, match="position"):  # the second packed sequence runs to position 2·s
            apply_rotary_gather(x.view(10, h, d), k.view(10, 1, d), cos_t, sin_t, cu_seqlens=cu,
                                offsets=torch.tensor([0, s + 1]), format="thd", inplace=True, backend=backend)
        assert torch.equal(x, x0) and torch.equal(k, k0)


@pytest.mark.parametrize("split", ["unbind", "split", "chunk"])
@pytest.mark.parametrize("backend", FAST + TRITON)
def test_inplace_on_multi_output_views_refused_before_writing(backend, split):
    """flash-attention's packed qkv, split the way its reference does (``qkv.unbind(2)``; also
    ``split`` / ``chunk``), then rotated in place: autograd forbids writing such views (torch
    raised its RuntimeError after the fused cpu / triton ops had written them), so every call
    must be a RopeError that writes nothing (as for a leaf, or a view of a leaf, that requires
    grad)."""
    b, s, h, d = 2, 5, 2, 16
    c, sn = cos_sin(RopeConfig(d), torch.arange(s))
    qkv = torch.randn(b, s, 3, h, d, requires_grad=True).clone()  # a non-leaf, as after a projection
    before = qkv.detach().clone()
    if split == "unbind":  # [b, s, h, d] views
        q, k, _ = qkv.unbind(2)
        ct, st = c[:, None], sn[:, None]
    else:  # [b, s, 1, h, d] views
        q, k, _ = qkv.split(1, 2) if split == "split" else qkv.chunk(3, 2)
        ct, st = c[:, None, None], sn[:, None, None]
    calls = [lambda: apply_rotary(q, ct, st, inplace=True, backend=backend),
             lambda: apply_rotary_qk(q, k, ct, st, inplace=True, backend=backend)]  # fmt: skip
    if split == "unbind":
        calls.append(lambda: apply_rotary_gather(q, k, c, sn, inplace=True, backend=backend))
    with _ctx(backend):
        for call in calls:
            with pytest.raises(RopeError, match="several views"):
                call()
    assert torch.equal(qkv.detach(), before)


# ======================================================================================
# vLLM tests/kernels/core/test_pos_encoding.py, test_rotary_embedding.py
# ======================================================================================

VLLM_HEAD_SIZES = [32, 64, 80, 96, 108, 112, 120, 128, 192, 256]
VLLM_ROTARY_DIMS = [None, 32]
VLLM_HEADS, VLLM_B, VLLM_S, VLLM_MAX_POS = 17, 2, 3, 8192  # peer: 17 heads, batch 5, seq 11 / 8192
_CACHES: dict = {}


def vllm_cache(d, r):
    """vLLM's ``cos_sin_cache``: ``cat(cos, sin, -1)`` [max_position, r] (float32), read back as its
    two strided halves."""
    key = (d, r)
    if key not in _CACHES:
        c, s = cos_sin(RopeConfig(d, rotary_dim=r), torch.arange(VLLM_MAX_POS))
        _CACHES[key] = torch.cat([c, s], dim=-1)
    return _CACHES[key].chunk(2, dim=-1)


def vllm_module(cfg, backend):
    """One module per config and backend (its table, grown to 8192 rows once, is reused)."""
    key = (cfg, backend)
    if key not in _CACHES:
        _CACHES[key] = RotaryEmbedding(cfg, backend=backend)
    return _CACHES[key]


def _vllm_case(backend, neox, shape_kind, dtype, d, rot, use_key):
    r = d if rot is None else rot
    b, s, h = VLLM_B, VLLM_S, VLLM_HEADS
    layout = "half" if neox else "interleaved"
    gen = _gen("vllm", backend, neox, shape_kind, dtype, d, rot, use_key)
    # key=None runs through a module per backend and config, each building its own table: its
    # positions stay below 1024 (8192-row tables are the cache path's, with key)
    pos = torch.randint(0, VLLM_MAX_POS if use_key else 1024, (b, s), generator=gen)
    if shape_kind == "flat":  # [b, s, h*d]: viewed as heads (ropekit needs the heads dim)
        store = torch.randn(b, s, h * d, generator=gen).to(dtype)
        q = store.view(b, s, h, d)
    elif shape_kind == "padded":  # sliced out of a wider head: head stride d + 64
        store = torch.randn(b, s, h, d + 64, generator=gen).to(dtype)
        q = store[..., :d]
    else:
        store = torch.randn(b, s, h, d, generator=gen).to(dtype)
        q = store
    k = torch.randn(b, s, h, d, generator=gen).to(dtype) if use_key else None
    store0, q0, k0 = store.clone(), q.clone(), None if k is None else k.clone()
    cfg = RopeConfig(d, rotary_dim=r, layout=layout)
    with _ctx(backend):
        if use_key:  # vLLM's op is in place on query and key
            cos_v, sin_v = vllm_cache(d, r)
            qo, ko = apply_rotary_gather(q, k, cos_v, sin_v, positions=pos, layout=layout, inplace=True,
                                         backend=backend)
            assert ko.data_ptr() == k.data_ptr()
        else:  # key=None: one tensor through the module
            qo = vllm_module(cfg, backend).rotate(q, positions=pos, inplace=True)
    assert qo.data_ptr() == q.data_ptr()
    c, sn = exact_tables(pos, inv_freq64(r))
    c, sn = c[:, :, None], sn[:, :, None]
    check(q, *rotate64(q0, c, sn, layout), table_u=2.0**-24, what=f"query d={d} r={r}")
    if use_key:
        check(k, *rotate64(k0, c, sn, layout), table_u=2.0**-24, what=f"key d={d} r={r}")
    if shape_kind == "padded":
        assert torch.equal(store[..., d:], store0[..., d:])  # the slice's neighbours untouched


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_vllm_rotary_embedding(backend, neox, dtype):
    """test_rotary_embedding (+ the head sizes 32/108 of test_rotary_embedding_opcheck and the
    head sizes 96/128/192 of older versions), with and without key. Every head size x rotary
    dim x key case runs once per test, its query shape (batch / flat / padded) taken in turn,
    so that each shape meets every head size across the two values of use_key."""
    kinds = ("batch", "flat", "padded")
    for i, d in enumerate(VLLM_HEAD_SIZES):
        for j, rot in enumerate(VLLM_ROTARY_DIMS):
            for u, use_key in enumerate((True, False)):
                _vllm_case(backend, neox, kinds[(i + 2 * j + u) % 3], dtype, d, rot, use_key)


@pytest.mark.parametrize("backend", TRITON)
def test_vllm_rotary_embedding_triton(backend):
    _vllm_case(backend, False, "padded", torch.bfloat16, 120, 32, True)
    _vllm_case(backend, True, "flat", torch.float16, 80, None, False)


@pytest.mark.parametrize("backend", FAST + TRITON)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_vllm_token_major_layout(backend, dtype):
    """vLLM's runtime layout: positions [num_tokens], query [num_tokens, hq*d] and key
    [num_tokens, hk*d] (GQA): viewed as packed [t, h, d] with format="thd"."""
    combos = [(120, 32, False)] if backend == "triton" else [
        (d, r, neox) for d in (64, 80, 108, 256) for r in (None, 32) for neox in (True, False)]
    for d, rot, neox in combos:
        r = d if rot is None else rot
        layout = "half" if neox else "interleaved"
        t, hq, hk = 9, VLLM_HEADS, 3
        gen = _gen("vllm-tok", backend, dtype, d, rot, neox)
        pos = torch.randint(0, VLLM_MAX_POS, (t,), generator=gen)
        q_flat = torch.randn(t, hq * d, generator=gen).to(dtype)
        k_flat = torch.randn(t, hk * d, generator=gen).to(dtype)
        q0, k0 = q_flat.clone(), k_flat.clone()
        cos_v, sin_v = vllm_cache(d, r)
        with _ctx(backend):
            apply_rotary_gather(q_flat.view(t, hq, d), k_flat.view(t, hk, d), cos_v, sin_v, positions=pos,
                                format="thd", layout=layout, inplace=True, backend=backend)
        c, sn = exact_tables(pos, inv_freq64(r))
        c, sn = c[:, None], sn[:, None]
        check(q_flat.view(t, hq, d), *rotate64(q0.view(t, hq, d), c, sn, layout), table_u=2.0**-24, what="query")
        check(k_flat.view(t, hk, d), *rotate64(k0.view(t, hk, d), c, sn, layout), table_u=2.0**-24, what="key")


def _vllm_multi_lora(backend, neox, dtype, d, rot):
    """test_batched_rotary_embedding_multi_lora: one cache holding the tables of linear scaling
    factors 1, 2, 4 back to back; each token's position is offset into its factor's block."""
    r = d if rot is None else rot
    b, s, h, max_pos = VLLM_B, VLLM_S, VLLM_HEADS, 64  # peer: max_position 8192
    layout = "half" if neox else "interleaved"
    factors = [1, 2, 4]
    gen = _gen("vllm-lora", backend, neox, dtype, d, rot)
    tabs = [cos_sin(RopeConfig(d, rotary_dim=r, layout=layout, scaling=Linear(f)), torch.arange(max_pos * f))
            for f in factors]
    cos_t, sin_t = torch.cat([t[0] for t in tabs]), torch.cat([t[1] for t in tabs])
    starts = torch.tensor([0] + [max_pos * f for f in factors[:-1]]).cumsum(0)
    kinds = (torch.arange(b * s) % len(factors))[torch.randperm(b * s, generator=gen)].reshape(b, s)  # all three
    pos = torch.randint(0, max_pos, (b, s), generator=gen)
    q0 = torch.randn(b, s, h * d, generator=gen).to(dtype)
    k0 = torch.randn(b, s, h * d, generator=gen).to(dtype)
    q, k = q0.view(b, s, h, d), k0.view(b, s, h, d)
    with _ctx(backend):
        qo, ko = apply_rotary_gather(q, k, cos_t, sin_t, positions=pos + starts[kinds], layout=layout, backend=backend)
    scale = torch.tensor(factors, dtype=torch.float64)[kinds]  # [b, s]
    ang = pos.double()[..., None] * inv_freq64(r) / scale[..., None]
    c, sn = torch.cos(ang)[:, :, None], torch.sin(ang)[:, :, None]
    check(qo, *rotate64(q, c, sn, layout), table_u=2.0**-24, what="query")
    check(ko, *rotate64(k, c, sn, layout), table_u=2.0**-24, what="key")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_vllm_batched_rotary_embedding_multi_lora(backend, neox, dtype):
    for d in (64, 80, 112, 120, 256):
        for rot in VLLM_ROTARY_DIMS:
            _vllm_multi_lora(backend, neox, dtype, d, rot)


@pytest.mark.parametrize("backend", TRITON)
def test_vllm_batched_rotary_embedding_multi_lora_triton(backend):
    _vllm_multi_lora(backend, False, torch.bfloat16, 80, 32)


# ======================================================================================
# Liger-Kernel test/transformers/test_rope.py
# ======================================================================================


def hf_full_tables(pos_ids, d, dtype, base=10000.0):
    """transformers' LlamaRotaryEmbedding (default rope): float32 inv_freq and angles,
    ``emb = cat(freqs, freqs)``, cos/sin ``[B, s, d]`` cast to the activation dtype."""
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = pos_ids[..., None].float() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def hf_apply_rotary_pos_emb64(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (bhsd, unsqueeze_dim=1) in float64, differentiable."""
    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)
    c, s = cos.double()[:, None], sin.double()[:, None]
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


def _liger(backend, bsz, seq, hq, hk, d, dtype, expand):
    gen = _gen("liger", backend, bsz, seq, hq, hk, d, dtype, expand)
    q0 = torch.randn(bsz, seq, hq, d, generator=gen).transpose(1, 2).to(dtype)  # bhsd views of bshd memory
    k0 = torch.randn(bsz, seq, hk, d, generator=gen).transpose(1, 2).to(dtype)
    pos_ids = torch.arange(seq)[None]
    if expand:
        pos_ids = pos_ids.expand(bsz, -1)
    cos, sin = hf_full_tables(pos_ids, d, dtype)  # [1 | b, s, d]
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    dq, dk = torch.randn(q.shape, generator=gen).to(dtype), torch.randn(k.shape, generator=gen).to(dtype)
    with _ctx(backend):
        # full-width tables are not accepted: halve them first (from_full_width checks the two copies)
        c, s = from_full_width(cos, "half"), from_full_width(sin, "half")  # [1 | b, s, d/2]
        qo, ko = apply_rotary_qk(q, k, c[:, None], s[:, None], backend=backend)
        gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    q64, k64 = q0.double().requires_grad_(), k0.double().requires_grad_()
    wq, wk = hf_apply_rotary_pos_emb64(q64, k64, cos, sin)
    wgq, wgk = torch.autograd.grad((wq, wk), (q64, k64), (dq.double(), dk.double()))
    ch, sh = c[:, None], s[:, None]
    for got, want, x, name in ((qo, wq, q0, "q"), (ko, wk, k0, "k")):
        ref, mag = rotate64(x, ch, sh, "half")
        assert torch.allclose(ref, want.detach(), rtol=0, atol=1e-12)  # the two references agree
        check(got, want.detach(), mag, what=name)
    for got, want, gg, name in ((gq, wgq, dq, "dq"), (gk, wgk, dk, "dk")):
        check(got, want, rotate64(gg, ch, -sh, "half")[1], what=name)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("bsz, seq, hq, hk, d", [
    (1, 7, 32, 32, 64), (2, 7, 32, 32, 64),      # peer: seq 128
    (1, 7, 32, 8, 64), (2, 7, 32, 8, 64),        # different q/k heads
    (3, 9, 7, 13, 92), (3, 9, 7, 11, 92),        # "weird shapes": hk > hq, no multiple (peer: 423, 73/213, 73/155)
    (1, 2, 2, 2, 8), (1, 2, 1, 2, 8),            # test_functional_correctness
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("expand", [True, False], ids=["pos_b", "pos_1"])
def test_liger_rope_correctness(backend, bsz, seq, hq, hk, d, dtype, expand):
    _liger(backend, bsz, seq, hq, hk, d, dtype, expand)


@pytest.mark.parametrize("backend", TRITON)
def test_liger_rope_correctness_triton(backend):
    _liger(backend, 3, 5, 3, 5, 92, torch.bfloat16, True)


@pytest.mark.parametrize("backend", FAST)
def test_liger_module_bhsd(backend):
    """The same case through RotaryEmbedding(format="bhsd") with position ids [1, s] / [b, s]."""
    bsz, seq, hq, hk, d = 3, 9, 7, 13, 92
    gen = _gen("liger-mod", backend)
    rope = RotaryEmbedding(RopeConfig(d), backend=backend)
    for pos in (torch.arange(seq)[None], torch.arange(seq)[None].expand(bsz, -1) + torch.tensor([[0], [5], [9]])):
        q = torch.randn(bsz, seq, hq, d, generator=gen).transpose(1, 2)
        k = torch.randn(bsz, seq, hk, d, generator=gen).transpose(1, 2)
        qo, ko = rope(q, k, positions=pos, format="bhsd")
        c, sn = exact_tables(pos.expand(bsz, seq), inv_freq64(d))
        c, sn = c[:, None], sn[:, None]
        check(qo, *rotate64(q, c, sn, "half"), table_u=2.0**-24)
        check(ko, *rotate64(k, c, sn, "half"), table_u=2.0**-24)


@pytest.mark.parametrize("backend", FAST)
def test_liger_odd_head_dim(backend):
    """Liger's (9, 7, 41, 41, 41): an odd head cannot rotate whole (pairs), so the config and a
    21-pair table are refused; 20 pairs of a 41-wide head rotate and the last dim passes through."""
    with pytest.raises(RopeError):
        RopeConfig(head_dim=41)
    gen = _gen("liger-odd", backend)
    x = torch.randn(9, 7, 41, 41, generator=gen)
    c21, s21 = cos_sin(RopeConfig(42), torch.arange(7))
    with pytest.raises(RopeError):
        apply_rotary(x, c21[:, None], s21[:, None], backend=backend)
    cfg = RopeConfig(41, rotary_dim=40)
    c, s = cos_sin(cfg, torch.arange(7))
    y = apply_rotary(x, c[:, None], s[:, None], backend=backend)
    check(y, *rotate64(x, c[:, None], s[:, None], "half"))
    assert torch.equal(y[..., 40], x[..., 40])


# ======================================================================================
# transformers tests/utils/test_modeling_rope_utils.py
# ======================================================================================
# LlamaConfig() defaults those tests build on: hidden 4096 / 32 heads -> head dim 128,
# rope_theta 1e4, max_position_embeddings 2048. Gemma3TextConfig: head_dim 256, 8 heads,
# max_position_embeddings 131072.

LLAMA = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 2048}
GEMMA3 = {"model_type": "gemma3_text", "hidden_size": 2304, "num_attention_heads": 8, "head_dim": 256,
          "max_position_embeddings": 131072, "layer_types": ["full_attention", "sliding_attention"]}


def hf_cfg(params, base=LLAMA, **extra):
    return RopeConfig.from_hf(dict(base, rope_parameters=dict({"rope_theta": 10000.0}, **params), **extra))


# float64 versions of modeling_rope_utils' formulas (the peer's own reference) ---------


def inv_freq_default(d, base=10000.0):
    return 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)


def inv_freq_dynamic(d, factor, max_pos, seq_len, base=10000.0):
    if seq_len <= max_pos:
        return inv_freq_default(d, base)
    return inv_freq_default(d, base * ((factor * seq_len / max_pos) - (factor - 1)) ** (d / (d - 2)))


def inv_freq_yarn(d, factor, orig, beta_fast=32.0, beta_slow=1.0, base=10000.0, truncate=True):
    def corr(beta):
        return (d * math.log(orig / (beta * 2 * math.pi))) / (2 * math.log(base))
    low, high = corr(beta_fast), corr(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep θ_i
    pos = inv_freq_default(d, base)
    return pos / factor * (1 - extrapolation) + pos * extrapolation


def inv_freq_llama3(d, factor, low_ff, high_ff, orig, base=10000.0):
    inv = inv_freq_default(d, base)
    wavelen = 2 * math.pi / inv
    low_wl, high_wl = orig / low_ff, orig / high_ff
    out = torch.where(wavelen > low_wl, inv / factor, inv)
    smooth = (orig / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return torch.where(medium, smoothed, out)


def inv_freq_proportional(d, prf, factor=1.0, base=10000.0):
    k = int(prf * d // 2)
    inv = 1.0 / base ** (torch.arange(0, 2 * k, 2, dtype=torch.float64) / d) / factor
    return torch.cat([inv, torch.zeros(d // 2 - k, dtype=torch.float64)])


def close64(got, want):
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


def test_hf_default_rope_numerically():
    cfg = hf_cfg({"rope_type": "default"})
    assert (cfg.head_dim, cfg.rotary_dim, cfg.attention_factor) == (128, 128, 1.0)
    close64(cfg.inv_freq(), inv_freq_default(128))
    nested = hf_cfg({"rope_type": "default"}, base=GEMMA3)  # flat params with layer types: one config
    close64(nested.inv_freq(), inv_freq_default(256))


def test_hf_linear_rope_numerically():
    for factor in (2.0, 10.0, 20.0):
        cfg = hf_cfg({"rope_type": "linear", "factor": factor})
        assert cfg.attention_factor == 1.0
        close64(cfg.inv_freq(), inv_freq_default(128) / factor)


def test_hf_dynamic_rope_numerically():
    for factor in (2.0, 10.0, 20.0):
        cfg = hf_cfg({"rope_type": "dynamic", "factor": factor})
        assert cfg.attention_factor == 1.0
        for seq_len in (None, 0, 1, 2048, torch.tensor(1)):  # within the original context: the default
            close64(cfg.inv_freq(seq_len), inv_freq_default(128))
    cfg = hf_cfg({"rope_type": "dynamic", "factor": 10.0})
    got = cfg.inv_freq(16384)
    close64(got, inv_freq_dynamic(128, 10.0, 2048, 16384))
    assert not torch.allclose(got, inv_freq_default(128) / 10.0)  # not a linear factor
    gemma = RopeConfig.from_hf(dict(GEMMA3, rope_parameters={
        "full_attention": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 10.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}))
    close64(gemma["full_attention"].inv_freq(200000), inv_freq_dynamic(256, 10.0, 131072, 200000))
    close64(gemma["full_attention"].inv_freq(131072), inv_freq_default(256))
    close64(gemma["sliding_attention"].inv_freq(200000), inv_freq_default(256))


@pytest.mark.parametrize("backend", FAST)
def test_hf_dynamic_rope_resets_after_long_sequence(backend):
    """transformers' module keeps the grown frequencies until a sequence is short again; ropekit
    is stateless: a short call after a long one rotates with the original frequencies."""
    cfg = hf_cfg({"rope_type": "dynamic", "factor": 4.0}, max_position_embeddings=8, hidden_size=16,
                 num_attention_heads=2)
    assert cfg.head_dim == 8
    rope = RotaryEmbedding(cfg, backend=backend)
    gen = _gen("dyn", backend)
    for s in (32, 4, 32, 8):
        q, k = torch.randn(1, s, 2, 8, generator=gen), torch.randn(1, s, 2, 8, generator=gen)
        qo, ko = rope(q, k)
        c, sn = exact_tables(torch.arange(s), inv_freq_dynamic(8, 4.0, 8, s))
        check(qo, *rotate64(q, c[:, None], sn[:, None], "half"), table_u=2.0**-24, what=f"s={s}")
        check(ko, *rotate64(k, c[:, None], sn[:, None], "half"), table_u=2.0**-24, what=f"s={s}")


def test_hf_yarn_rope_numerically():
    d, default = 128, inv_freq_default(128)
    for factor in (2.0, 10.0, 20.0):
        cfg = hf_cfg({"rope_type": "yarn", "factor": factor})  # original_max_position_embeddings: 2048
        assert cfg.attention_factor == 0.1 * math.log(factor) + 1.0
        cfg = hf_cfg({"rope_type": "yarn", "factor": factor, "attention_factor": 0.5})
        assert cfg.attention_factor == 0.5
    cfg = hf_cfg({"rope_type": "yarn", "factor": 10.0, "beta_fast": 32, "beta_slow": 1})
    got = cfg.inv_freq()
    close64(got, inv_freq_yarn(d, 10.0, 2048, 32, 1))
    assert bool(((default / 10.0 - 1e-8 <= got) & (got <= default + 1e-8)).all())  # bounded by the factor
    got = hf_cfg({"rope_type": "yarn", "factor": 10.0, "beta_fast": 1000, "beta_slow": 1}).inv_freq()
    close64(got, inv_freq_yarn(d, 10.0, 2048, 1000, 1))
    # all but the first interpolate (transformers writes it as `< default + 1e-8`, a margin
    # float32 rounds away at 1.0; in float64: the first is unchanged, the others below)
    assert got[0] == default[0] and bool((got[1:] < default[1:]).all())
    torch.testing.assert_close(got[-20:], default[-20:] / 10.0)
    for truncate in (True, False):  # GPT-OSS's truncate=False keeps the fractional ramp ends
        got = hf_cfg({"rope_type": "yarn", "factor": 32.0, "beta_fast": 32, "beta_slow": 1, "truncate": truncate,
                      "original_max_position_embeddings": 4096}).inv_freq()
        close64(got, inv_freq_yarn(d, 32.0, 4096, 32, 1, truncate=truncate))
    g = RopeConfig.from_hf(dict(GEMMA3, rope_parameters={
        "full_attention": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 10.0, "beta_fast": 32,
                           "beta_slow": 1},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}))
    close64(g["full_attention"].inv_freq(), inv_freq_yarn(256, 10.0, 131072, 32, 1))
    close64(g["sliding_attention"].inv_freq(), inv_freq_default(256))
    g8 = RopeConfig.from_hf(dict(GEMMA3, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 10.0,
                                                        "beta_fast": 1000, "beta_slow": 1,
                                                        "original_max_position_embeddings": 8}))
    got, base = g8.inv_freq(), inv_freq_default(256)
    close64(got, inv_freq_yarn(256, 10.0, 8, 1000, 1))
    assert got[0] == base[0] and bool((got[1:] < base[1:]).all())


def test_hf_yarn_tables_carry_the_attention_factor():
    """cos_sin folds the factor in, as transformers' rotary module returns cos·af, sin·af."""
    cfg = hf_cfg({"rope_type": "yarn", "factor": 10.0})
    pos = torch.tensor([0, 1, 7, 2047, 2048, 20479])
    c, s = cos_sin(cfg, pos)
    wc, ws = exact_tables(pos, inv_freq_yarn(128, 10.0, 2048), af=0.1 * math.log(10.0) + 1.0)
    for got, want in ((c, wc), (s, ws)):
        assert bool(((got.double() - want).abs() <= _ulp(want.abs(), torch.float32)).all())


def test_hf_longrope_rope_numerically():
    d = 128
    short, long = [2.0] * (d // 2), [float(i) for i in range(1, d // 2 + 1)]
    default = inv_freq_default(d)
    for factor in (2.0, 10.0, 20.0):
        p = {"rope_type": "longrope", "factor": factor, "short_factor": short, "long_factor": long}
        assert hf_cfg(p).attention_factor == math.sqrt(1 + math.log(factor) / math.log(2048))
        assert hf_cfg(dict(p, attention_factor=0.5)).attention_factor == 0.5
    cfg = hf_cfg({"rope_type": "longrope", "factor": 1.0, "short_factor": short, "long_factor": long})
    assert cfg.attention_factor == 1.0
    for seq_len in (0, 1, 2048):
        close64(cfg.inv_freq(seq_len), default / torch.tensor(short, dtype=torch.float64))
    close64(cfg.inv_freq(2049), default / torch.tensor(long, dtype=torch.float64))
    g = RopeConfig.from_hf(dict(GEMMA3, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 2.0,
                                                       "short_factor": [2.0] * 128,
                                                       "long_factor": [float(i) for i in range(1, 129)]}))
    assert g.attention_factor == math.sqrt(1 + math.log(2.0) / math.log(131072))
    close64(g.inv_freq(131073), inv_freq_default(256) / torch.arange(1, 129, dtype=torch.float64))


def test_hf_llama3_rope_numerically():
    d, default = 128, inv_freq_default(128)
    base_p = {"rope_type": "llama3", "original_max_position_embeddings": 2048, "low_freq_factor": 1,
              "high_freq_factor": 4}
    for factor in (2.0, 10.0, 20.0):
        assert hf_cfg(dict(base_p, factor=factor)).attention_factor == 1.0
    got = hf_cfg(dict(base_p, factor=10.0)).inv_freq()
    close64(got, inv_freq_llama3(d, 10.0, 1, 4, 2048))
    assert bool(((default / 10.0 <= got) & (got <= default)).all())
    got = hf_cfg(dict(base_p, factor=10.0, high_freq_factor=1000)).inv_freq()
    close64(got, inv_freq_llama3(d, 10.0, 1, 1000, 2048))
    assert bool((got < default).all())  # no frequency counts as high any more: all scaled
    g = RopeConfig.from_hf(dict(GEMMA3, rope_parameters=dict(base_p, rope_theta=10000.0, factor=10.0)))
    close64(g.inv_freq(), inv_freq_llama3(256, 10.0, 1, 4, 2048))


def test_hf_proportional_rope_numerically():
    d = 128
    for prf, k in ((1.0, 64), (0.5, 32), (0.25, 16)):
        cfg = hf_cfg({"rope_type": "proportional", "partial_rotary_factor": prf})
        inv = cfg.inv_freq()
        assert cfg.attention_factor == 1.0 and inv.shape == (d // 2,)
        assert bool((inv[:k] != 0).all()) and bool((inv[k:] == 0).all())
        close64(inv, inv_freq_proportional(d, prf))
    close64(hf_cfg({"rope_type": "proportional", "partial_rotary_factor": 1.0, "factor": 1.0}).inv_freq(),
            inv_freq_default(d))
    for factor in (2.0, 10.0):
        close64(hf_cfg({"rope_type": "proportional", "partial_rotary_factor": 1.0, "factor": factor}).inv_freq(),
                inv_freq_default(d) / factor)
    close64(hf_cfg({"rope_type": "proportional", "partial_rotary_factor": 0.5, "factor": 2.0}).inv_freq(),
            inv_freq_proportional(d, 0.5) / 2.0)


def test_hf_missing_required_keys_refused():
    """test_rope_validation: a scaled rope_type with only rope_theta is refused (a RopeError, where
    transformers raises KeyError); default and proportional need nothing more."""
    for rope_type in ("linear", "dynamic", "yarn", "longrope", "llama3"):
        with pytest.raises(RopeError):
            hf_cfg({"rope_type": rope_type})
    assert hf_cfg({"rope_type": "default"}).scaling is None
    assert hf_cfg({"rope_type": "proportional"}).inv_freq().shape == (64,)


def test_hf_against_installed_transformers():
    """The same configs against the installed transformers' own rope functions (float32)."""
    tr = pytest.importorskip("transformers")
    from transformers import LlamaConfig, ROPE_INIT_FUNCTIONS

    short, long = [2.0] * 64, [float(i) for i in range(1, 65)]
    cases = [
        ({"rope_type": "linear", "factor": 10.0}, None),
        ({"rope_type": "dynamic", "factor": 10.0}, 16384),
        ({"rope_type": "yarn", "factor": 10.0, "beta_fast": 32, "beta_slow": 1}, None),
        ({"rope_type": "yarn", "factor": 10.0, "beta_fast": 1000, "beta_slow": 1}, None),
        ({"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.5}, None),
        ({"rope_type": "longrope", "factor": 10.0, "short_factor": short, "long_factor": long}, 0),
        ({"rope_type": "longrope", "factor": 10.0, "short_factor": short, "long_factor": long}, 2049),
        ({"rope_type": "llama3", "factor": 10.0, "original_max_position_embeddings": 2048, "low_freq_factor": 1,
          "high_freq_factor": 4}, None),
        ({"rope_type": "proportional", "partial_rotary_factor": 0.25}, None),
    ]
    for params, seq_len in cases:
        if params["rope_type"] not in ROPE_INIT_FUNCTIONS:
            continue
        c = LlamaConfig()
        c.rope_parameters = dict(params, rope_theta=10000.0)
        kw = {} if seq_len is None else {"seq_len": seq_len}
        inv, af = ROPE_INIT_FUNCTIONS[params["rope_type"]](config=c, device="cpu", **kw)
        cfg = RopeConfig.from_hf(c)
        torch.testing.assert_close(cfg.inv_freq(seq_len), inv.double(), rtol=4e-7, atol=0, msg=str(params))
        assert cfg.attention_factor == pytest.approx(af, rel=1e-12), params
    assert tr.__version__
