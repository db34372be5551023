"""Positions as users hold them: ``rerotate`` (exact re-rotation of cached keys),
``apply_rotary_gather`` (user tables + positions), packed ``thd`` with per-sequence offsets,
M-RoPE from per-axis tables, and ``RotaryEmbedding.rotate``.

Oracle: :func:`_oracle.rope_bshd` (float64, per-pair Python-float angles) on the ``bshd``
view of the inputs; backward against torch's gradient of the same oracle.
"""

from __future__ import annotations

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, RotaryEmbedding, apply_rotary, apply_rotary_gather, cos_sin, rerotate
from ropekit.multi_axis import apply_rotary_mrope, mrope_tables, multi_axis_cos_sin
from ropekit.positions import resolve_positions
from ropekit.scaling import YaRN, DynamicNTK, LongRoPE

from _oracle import rope_bshd

BACKENDS = ropekit.backends.available()
FORMATS = ("bshd", "bhsd", "sbhd", "thd")
# (dtype, atol, rtol) against the float64 oracle: float32 tables and math, one rounding
TOL = {
    torch.float32: (3e-6, 3e-6),
    torch.float64: (1e-12, 1e-12),
    torch.bfloat16: (2e-2, 1.6e-2),
    torch.float16: (3e-3, 2e-3),
}
U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}  # unit roundoff


# ----------------------------------------------------------------------------- format helpers
def to_fmt(x, fmt):
    """A ``[b, s, h, d]`` tensor as a view/copy in ``fmt`` (``thd``: ``b`` must be 1)."""
    if fmt == "bshd":
        return x
    if fmt == "bhsd":
        return x.transpose(1, 2)
    if fmt == "sbhd":
        return x.transpose(0, 1)
    assert x.shape[0] == 1
    return x[0]


def from_fmt(x, fmt):
    if fmt == "bshd":
        return x
    if fmt == "bhsd":
        return x.transpose(1, 2)
    if fmt == "sbhd":
        return x.transpose(0, 1)
    return x[None]


def oracle(x_bshd, pos2d, cfg):
    return rope_bshd(x_bshd, pos2d, cfg.rotary_dim, cfg.layout, cfg.base)


# ----------------------------------------------------------------------------- resolve_positions
def test_packed_offsets_positions():
    cu = torch.tensor([0, 3, 3, 5])
    got = resolve_positions("thd", None, 5, cu_seqlens=cu, offsets=torch.tensor([10, 4, 0]))
    assert got.tolist() == [10, 11, 12, 0, 1]
    assert resolve_positions("thd", None, 5, cu_seqlens=cu, offsets=7).tolist() == [7, 8, 9, 7, 8]
    assert resolve_positions("thd", None, 5, cu_seqlens=cu).tolist() == [0, 1, 2, 0, 1]  # unchanged without offsets
    for bad in (torch.tensor([1, 2]), torch.tensor([[1, 2, 3]]), -1, True, torch.tensor([1.0, 2.0, 3.0])):
        with pytest.raises(RopeError, match="expected .*Fix:"):
            resolve_positions("thd", None, 5, cu_seqlens=cu, offsets=bad)
    with pytest.raises(RopeError, match=">= 0"):
        resolve_positions("thd", None, 5, cu_seqlens=cu, offsets=torch.tensor([1, -2, 0]))
    with pytest.raises(RopeError, match="cu_seqlens"):
        resolve_positions("thd", None, 5, offsets=torch.tensor([1, 2, 3]))  # offsets alone say nothing for thd
    with pytest.raises(RopeError, match="at most one"):
        resolve_positions("bshd", 2, 5, cu_seqlens=cu, offsets=torch.tensor([1, 2]))
    with pytest.raises(RopeError, match="at most one"):
        resolve_positions("thd", None, 5, cu_seqlens=cu, offsets=1, positions=torch.arange(5))


def test_packed_offsets_sync_free_branch(monkeypatch):
    """The branch taken under torch.compile/export (searchsorted, no data-dependent shape)
    gives the same positions as the eager one."""
    cu = torch.tensor([0, 3, 3, 5, 9])
    off = torch.tensor([10, 4, 0, 100])
    eager = resolve_positions("thd", None, 9, cu_seqlens=cu, offsets=off)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = resolve_positions("thd", None, 9, cu_seqlens=cu, offsets=off)
    assert traced.tolist() == eager.tolist() == [10, 11, 12, 0, 1, 100, 101, 102, 103]


# ----------------------------------------------------------------------------- apply_rotary_gather
def _case(fmt, b, s, seed):
    """Positions for q in ``fmt``: kwargs for the call and the ``[b, s]`` oracle positions."""
    g = torch.Generator().manual_seed(seed)
    if fmt == "thd":
        cu = torch.tensor([0, 2, 2, s])
        off = torch.tensor([30, 5, 60])
        pos = torch.cat([torch.arange(2) + 30, torch.arange(s - 2) + 60])
        return {"cu_seqlens": cu, "offsets": off}, pos[None]
    kind = seed % 3
    if kind == 0:
        off = torch.randint(0, 90, (b,), generator=g)
        return {"offsets": off}, off[:, None] + torch.arange(s)
    if kind == 1:
        p = torch.randint(0, 100, (b, s), generator=g)
        return {"positions": p}, p
    p = torch.randint(0, 100, (s,), generator=g)
    return {"positions": p}, p.expand(b, s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ropekit.LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gather_forward_backward_vs_oracle(backend, fmt, layout, dtype):
    cfg = RopeConfig(24, rotary_dim=16, layout=layout)  # partial rotary
    b = 1 if fmt == "thd" else 2
    s, hq, hk = 6, 3, 1
    seed = FORMATS.index(fmt) * 7 + ropekit.LAYOUTS.index(layout)
    kw, pos2d = _case(fmt, b, s, seed)
    torch.manual_seed(seed)
    q0, k0 = torch.randn(b, s, hq, 24).to(dtype), torch.randn(b, s, hk, 24).to(dtype)
    tdt = torch.float64 if dtype == torch.float64 else torch.float32
    cos_t, sin_t = cos_sin(cfg, torch.arange(100), dtype=tdt)  # [n, r/2]
    q = to_fmt(q0, fmt).clone().requires_grad_()
    k = to_fmt(k0, fmt).clone().requires_grad_()
    qo, ko = apply_rotary_gather(q, k, cos_t, sin_t, format=fmt, layout=layout, backend=backend, **kw)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(from_fmt(qo, fmt).double(), oracle(q0, pos2d, cfg), atol=atol, rtol=rtol)
    torch.testing.assert_close(from_fmt(ko, fmt).double(), oracle(k0, pos2d, cfg), atol=atol, rtol=rtol)
    gq, gk = torch.randn(b, s, hq, 24).to(dtype), torch.randn(b, s, hk, 24).to(dtype)
    ((qo * to_fmt(gq, fmt)).sum() + (ko * to_fmt(gk, fmt)).sum()).backward()
    qr, kr = q0.double().requires_grad_(), k0.double().requires_grad_()
    ((oracle(qr, pos2d, cfg) * gq.double()).sum() + (oracle(kr, pos2d, cfg) * gk.double()).sum()).backward()
    torch.testing.assert_close(from_fmt(q.grad, fmt).double(), qr.grad, atol=2 * atol, rtol=2 * rtol)
    torch.testing.assert_close(from_fmt(k.grad, fmt).double(), kr.grad, atol=2 * atol, rtol=2 * rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_out_of_table_is_refused_before_writing(backend):
    cos_t, sin_t = cos_sin(RopeConfig(8), torch.arange(10))
    q, k = torch.randn(2, 4, 2, 8), torch.randn(2, 4, 1, 8)
    keep = q.clone(), k.clone()
    for kw in ({"positions": torch.tensor([0, 1, 2, 10])}, {"offsets": torch.tensor([0, 7])}, {"offsets": 7}):
        with pytest.raises(RopeError, match=r"expected positions in \[0, 10\).*Fix:"):
            apply_rotary_gather(q, k, cos_t, sin_t, inplace=True, backend=backend, **kw)
        assert torch.equal(q, keep[0]) and torch.equal(k, keep[1])
    with pytest.raises(RopeError, match=r"(\[0, 10\).*-1)|>= 0"):
        apply_rotary_gather(q, k, cos_t, sin_t, positions=torch.tensor([0, -1, 2, 3]), backend=backend)


def test_gather_bad_inputs():
    cos_t, sin_t = cos_sin(RopeConfig(8), torch.arange(10))
    q, k = torch.randn(2, 4, 2, 8), torch.randn(2, 4, 1, 8)
    cases = [
        dict(cos_table=cos_t[None], sin_table=sin_t[None]),  # not [n, r/2]
        dict(cos_table=cos_t, sin_table=sin_t[:5]),  # shapes differ
        dict(cos_table=torch.cat([cos_t, cos_t], -1), sin_table=torch.cat([sin_t, sin_t], -1)[:, :5]),
        dict(positions=torch.arange(4.0)),  # float positions
        dict(positions=torch.arange(5)),  # wrong length
        dict(format="thd"),  # q has 4 dims
        dict(layout="neox"),
    ]
    for c in cases:
        kw = dict(cos_table=cos_t, sin_table=sin_t)
        kw.update(c)
        with pytest.raises(RopeError, match="expected .*got .*Fix:"):
            apply_rotary_gather(q, k, kw.pop("cos_table"), kw.pop("sin_table"), **kw)
    with pytest.raises(RopeError, match="full-width"):  # width d: transformers' full tables
        full = torch.cat([cos_t, cos_t], -1)
        apply_rotary_gather(q, k, full, full)
    with pytest.raises(RopeError):
        apply_rotary_gather(q, torch.randn(2, 5, 1, 8), cos_t, sin_t)  # k of another sequence length


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("empty", ["k", "q"])
def test_gather_with_an_empty_partner_still_rotates_the_other(backend, empty):
    cfg = RopeConfig(16)
    cos_t, sin_t = cos_sin(cfg, torch.arange(50))
    x0 = torch.randn(2, 5, 3, 16)
    off = torch.tensor([3, 40])
    none = torch.empty(2, 5, 0, 16)
    args = (x0, none) if empty == "k" else (none, x0)
    out = apply_rotary_gather(*args, cos_t, sin_t, offsets=off, backend=backend)
    got = out[0] if empty == "k" else out[1]
    torch.testing.assert_close(got.double(), oracle(x0, off[:, None] + torch.arange(5), cfg), atol=3e-6, rtol=3e-6)


# ----------------------------------------------------------------------------- rerotate
def _per_token_or_sequence(fmt, b, s, g):
    """(old, new) position pairs of every accepted form, with their ``[b, s]`` expansions."""
    if fmt == "thd":
        m = torch.randint(0, 5000, (s,), generator=g)
        n = torch.randint(0, 5000, (s,), generator=g)
        return [(m, n, m[None], n[None])]
    m2 = torch.randint(0, 5000, (b, s), generator=g)
    n2 = torch.randint(0, 5000, (b, s), generator=g)
    mb = torch.randint(0, 5000, (b,), generator=g)
    ns = torch.randint(0, 5000, (s,), generator=g)
    return [
        (m2, n2, m2, n2),  # per token [b, s]
        (m2, mb, m2, mb[:, None].expand(b, s)),  # per token -> per sequence [b] (StreamingLLM: all to one)
        (mb, mb + 17, mb[:, None].expand(b, s), (mb + 17)[:, None].expand(b, s)),  # per sequence shift
        (ns, ns - ns.min(), ns.expand(b, s), (ns - ns.min()).expand(b, s)),  # [s] shared, moving left
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ropekit.LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_rerotate_forward_backward_vs_oracle(backend, fmt, layout, dtype):
    cfg = RopeConfig(20, rotary_dim=12, layout=layout, base=500.0)  # partial rotary
    b = 1 if fmt == "thd" else 3
    s, h = 4, 2
    g = torch.Generator().manual_seed(FORMATS.index(fmt))
    atol, rtol = TOL[dtype]
    for old, new, old2, new2 in _per_token_or_sequence(fmt, b, s, g):
        x0 = torch.randn(b, s, h, 20, generator=g).to(dtype)
        x = to_fmt(x0, fmt).clone().requires_grad_()
        y = rerotate(x, cfg, old, new, format=fmt, backend=backend)
        assert y.dtype == dtype and y.shape == x.shape
        want = oracle(x0, new2 - old2, cfg)  # rotation by (n - m)·θ
        torch.testing.assert_close(from_fmt(y, fmt).double(), want, atol=atol, rtol=rtol)
        assert torch.equal(from_fmt(y, fmt)[..., 12:], x0[..., 12:])  # pass-through dims untouched
        gy = torch.randn(b, s, h, 20, generator=g).to(dtype)
        (y * to_fmt(gy, fmt)).sum().backward()
        xr = x0.double().requires_grad_()
        (oracle(xr, new2 - old2, cfg) * gy.double()).sum().backward()
        torch.testing.assert_close(from_fmt(x.grad, fmt).double(), xr.grad, atol=2 * atol, rtol=2 * rtol)
        # in place, and back again: the inverse shift restores the keys up to rounding
        z = to_fmt(x0, fmt).clone()
        rerotate(z, cfg, old, new, format=fmt, backend=backend, inplace=True)
        torch.testing.assert_close(z, y.detach(), atol=atol, rtol=rtol)
        back = rerotate(z, cfg, new, old, format=fmt, backend=backend)
        torch.testing.assert_close(from_fmt(back, fmt).double(), x0.double(), atol=2 * atol, rtol=2 * rtol)


def _keys(cfg, x64, pos, dtype):
    """Keys rotated at ``pos`` ([s]) the way a model caches them: dtype input, RoPE in dtype."""
    c, s = cos_sin(cfg, pos)
    return apply_rotary(x64.to(dtype), c[:, None], s[:, None])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_one_shift_by_1000_equals_rope_from_scratch(dtype):
    """A single rerotate is one rounding of the exact rotation of its input, and so equal to
    RoPE applied from scratch at the new positions up to the input's own rounding.

    Measured (this seed): the result differs from the exact float64 rotation of the cached
    keys by at most 0.50 ulp of the element (bf16, fp16); from scratch by at most 0.71 u·|row|
    (bf16), 0.41 (fp16), 0.79 (fp32), u the unit roundoff."""
    torch.manual_seed(0)
    cfg = RopeConfig(128)
    x = torch.randn(2, 64, 4, 128, dtype=torch.float64)
    p = torch.arange(64) * 37
    k = _keys(cfg, x, p, dtype)
    moved = rerotate(k, cfg, p, p + 1000)
    c, s = cos_sin(cfg, p + 1000)
    scratch = apply_rotary(x.to(dtype), c[:, None], s[:, None])
    u = U[dtype]
    c64, s64 = cos_sin(cfg, torch.full((64,), 1000), dtype=torch.float64)
    exact_of_k = apply_rotary(k.double(), c64[:, None], s64[:, None], backend="reference")
    row = exact_of_k.norm(dim=-1, keepdim=True)
    # one rounding to dtype (0.5 ulp = u·|y|, ulp taken at the element) + float32 math (~4·2^-24·|row|)
    err = (moved.double() - exact_of_k).abs()
    assert bool((err <= u * exact_of_k.abs() * 2 + 4 * 2.0**-24 * row).all()), err.max()
    # from scratch: the cached keys' rounding (carried through the rotation) + one rounding each
    assert ((moved.double() - scratch.double()).abs() / (u * row)).max() <= 1.5


def test_1000_shifts_by_1_in_bf16_drift_bound():
    """1000 shifts by 1 of a bfloat16 cache, each by rerotate, against the naive repeated
    rotation (the forward rotation by 1, attention-factor-free tables, a thousand times).

    Each shift is one rounding (see the test above), so stepwise rerotate and the naive loop
    are the same arithmetic here and give the same bits. What drifts is the bfloat16 storage
    between the shifts: a per-step turn of ``θ_i`` moves a pair by less than half a bf16 ulp
    for the slow frequencies (they stall) and the roundings of the fast ones compound.
    Measured (this seed, d = 128, base 1e4): max relative row error 0.867 (median 0.50)
    after 1000 shifts of 1; one rerotate by the total 1000 from the original positions:
    0.0038 (= 0.97 u). Bound asserted: stepwise <= 0.9 relative per row; one shot <= 2u.
    """
    torch.manual_seed(0)
    cfg = RopeConfig(128)
    x = torch.randn(2, 64, 4, 128, dtype=torch.float64)
    p = torch.arange(64) * 37
    k0 = _keys(cfg, x, p, torch.bfloat16)
    c1, s1 = cos_sin(cfg, torch.tensor([1]), attention_scaling=False)  # [1, r/2]
    k, naive = k0.clone(), k0.clone()
    for i in range(1000):
        k = rerotate(k, cfg, p + i, p + i + 1)
        naive = apply_rotary(naive, c1, s1)
    c, s = cos_sin(cfg, p + 1000, dtype=torch.float64)
    exact = apply_rotary(x, c[:, None], s[:, None], backend="reference")

    def rel(t):
        return ((t.double() - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()

    assert torch.equal(k, naive)
    assert rel(k) <= 0.9
    one = rerotate(k0, cfg, p, p + 1000)
    assert rel(one) <= 2 * U[torch.bfloat16]
    assert rel(k) > 50 * rel(one)  # the drift is the storage between shifts, not the shift


@pytest.mark.parametrize("backend", BACKENDS)
def test_yarn_keys_are_not_scaled_again(backend):
    """The module folds YaRN's attention factor f into cos/sin, so cached keys carry it once.
    rerotate is a pure rotation (norms preserved); reapplying the module's tables at the
    shift scales the keys by f again."""
    cfg = RopeConfig(64, scaling=YaRN(factor=8.0, original_max_position=256))
    f = cfg.attention_factor
    assert f > 1.2
    rope = RotaryEmbedding(cfg, backend=backend)
    torch.manual_seed(3)
    raw = torch.randn(2, 6, 2, 64)
    m = torch.tensor([[0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15]])
    n = m + 300
    k = rope.rotate(raw, positions=m)
    assert torch.allclose(k.norm(dim=-1), f * raw.norm(dim=-1), rtol=1e-5)
    moved = rerotate(k, cfg, m, n, backend=backend)
    torch.testing.assert_close(moved.norm(dim=-1), k.norm(dim=-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(moved, rope.rotate(raw, positions=n), atol=2e-5, rtol=2e-5)
    naive = rope.rotate(k, positions=n - m)  # the module's tables again: f twice
    torch.testing.assert_close(naive.norm(dim=-1), f * k.norm(dim=-1), rtol=1e-5, atol=0)
    assert not torch.allclose(naive, moved, atol=1e-2)


def test_rerotate_refusals():
    x = torch.randn(1, 4, 2, 16)
    m, n = torch.arange(4), torch.arange(4) + 3
    for sc, word in (
        (DynamicNTK(factor=2.0, max_position=64), "DynamicNTK"),
        (LongRoPE([1.0] * 8, [4.0] * 8, original_max_position=64, factor=4.0), "LongRoPE"),
    ):
        with pytest.raises(RopeError, match=f"expected a config whose positions combine additively.*{word}.*length.*Fix:"):
            rerotate(x, RopeConfig(16, scaling=sc), m, n)
    xp = ropekit.variants.xpos_cos_sin(RopeConfig(16), torch.arange(4))
    with pytest.raises(RopeError, match="xPos.*not a rotation"):
        rerotate(x, xp, m, n)
    cfg = RopeConfig(16)
    for bad in (
        dict(old_positions=torch.arange(4.0)),  # float
        dict(old_positions=torch.arange(5)),  # wrong length
        dict(old_positions=torch.tensor([0, -1, 2, 3])),  # negative
        dict(new_positions=torch.zeros(2, 4, dtype=torch.long)),  # [2, s] with b = 1
        dict(format="thd"),  # x has 4 dims
        dict(layout="neox"),
    ):
        kw = dict(old_positions=m, new_positions=n)
        kw.update(bad)
        with pytest.raises(RopeError, match="expected .*got .*Fix:"):
            rerotate(x, cfg, kw.pop("old_positions"), kw.pop("new_positions"), **kw)
    with pytest.raises(RopeError, match="RopeConfig"):
        rerotate(x, {"head_dim": 16}, m, n)
    with pytest.raises(RopeError):  # thd takes per-token positions only
        rerotate(torch.randn(4, 2, 16), cfg, torch.tensor([1]), torch.tensor([2]), format="thd")


def test_rerotate_per_token_wins_when_b_equals_s():
    cfg = RopeConfig(8)
    x = torch.randn(3, 3, 1, 8, dtype=torch.float64)
    m, n = torch.zeros(3, dtype=torch.long), torch.tensor([1, 2, 3])
    y = rerotate(x, cfg, m, n)
    torch.testing.assert_close(y, oracle(x, n.expand(3, 3), cfg))  # [s]: per token, shared by the batch


# ----------------------------------------------------------------------------- RotaryEmbedding.rotate / thd offsets
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_rotate_equals_the_q_of_forward_and_the_oracle(backend, fmt):
    cfg = RopeConfig(24, rotary_dim=16)
    rope = RotaryEmbedding(cfg, backend=backend)
    b = 1 if fmt == "thd" else 2
    kw, pos2d = _case(fmt, b, 6, 4 + FORMATS.index(fmt))
    torch.manual_seed(5)
    q0, k0 = torch.randn(b, 6, 3, 24), torch.randn(b, 6, 1, 24)
    q = to_fmt(q0, fmt).clone().requires_grad_()
    y = rope.rotate(q, format=fmt, **kw)
    qf, kf = rope(to_fmt(q0, fmt), to_fmt(k0, fmt), format=fmt, **kw)
    assert torch.equal(y, qf)
    torch.testing.assert_close(from_fmt(y, fmt).double(), oracle(q0, pos2d, cfg), atol=3e-6, rtol=3e-6)
    torch.testing.assert_close(from_fmt(kf, fmt).double(), oracle(k0, pos2d, cfg), atol=3e-6, rtol=3e-6)
    g = torch.randn(b, 6, 3, 24)
    (y * to_fmt(g, fmt)).sum().backward()
    qr = q0.double().requires_grad_()
    (oracle(qr, pos2d, cfg) * g.double()).sum().backward()
    torch.testing.assert_close(from_fmt(q.grad, fmt).double(), qr.grad, atol=6e-6, rtol=6e-6)
    z = to_fmt(q0, fmt).clone()
    assert rope.rotate(z, format=fmt, inplace=True, **kw) is z and torch.equal(z, qf)


def test_rotate_bad_input():
    rope = RotaryEmbedding(RopeConfig(8))
    with pytest.raises(RopeError, match="expected x a real floating tensor"):
        rope.rotate(torch.zeros(1, 2, 1, 8, dtype=torch.long))
    with pytest.raises(RopeError, match="expected x with 3 dims"):
        rope.rotate(torch.zeros(1, 2, 1, 8), format="thd", cu_seqlens=torch.tensor([0, 2]))
    with pytest.raises(RopeError, match="len\\(cu_seqlens\\) - 1"):
        rope.rotate(torch.zeros(2, 1, 8), format="thd", cu_seqlens=torch.tensor([0, 2]), offsets=torch.tensor([1, 2]))


def test_thd_offsets_continue_each_sequence():
    """Chunked prefill: the second chunk of each packed sequence, rotated with offsets, equals
    the same tokens of the whole sequences rotated at once."""
    rope = RotaryEmbedding(RopeConfig(16))
    torch.manual_seed(2)
    lens = [5, 3, 7]
    full = [torch.randn(n, 2, 16) for n in lens]
    cu_full = torch.tensor([0, 5, 8, 15])
    whole = rope.rotate(torch.cat(full), cu_seqlens=cu_full, format="thd")
    cut = [2, 1, 4]  # first-chunk lengths: the second chunks start there
    second = torch.cat([t[c:] for t, c in zip(full, cut)])
    cu2 = torch.tensor([0, 3, 5, 8])
    got = rope.rotate(second, cu_seqlens=cu2, offsets=torch.tensor(cut), format="thd")
    want = torch.cat([w[c:] for w, c in zip(whole.split(lens), cut)])
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- M-RoPE from per-axis tables
def _qwen2vl_combine(cos_full, mrope_section):
    """Qwen2-VL's apply_multimodal_rotary_pos_emb (transformers 4.4x) on full-width [3, ..., d] tables."""
    mrope_section = list(mrope_section) * 2
    return torch.cat([m[i % 3] for i, m in enumerate(cos_full.split(mrope_section, dim=-1))], dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_mrope_tables_match_qwen2vl_and_multi_axis_cos_sin(interleaved):
    cfg = RopeConfig(32)
    sections = [8, 4, 4] if not interleaved else [6, 5, 5]
    pos = torch.randint(0, 300, (3, 2, 7))  # [3, b, s]
    c3, s3 = cos_sin(cfg, pos)  # [3, b, s, r/2]
    cos, sin = mrope_tables(c3, s3, sections, interleaved=interleaved)
    want_c, want_s = multi_axis_cos_sin(cfg, pos.movedim(0, -1), sections, interleaved=interleaved)
    assert torch.equal(cos, want_c) and torch.equal(sin, want_s)
    if not interleaved:
        full = ropekit.to_full_width(c3)
        assert torch.equal(ropekit.to_full_width(cos), _qwen2vl_combine(full, sections))
    # differentiable in the tables (learnable / precomputed upstream)
    c3r = c3.clone().requires_grad_()
    mrope_tables(c3r, s3, sections, interleaved=interleaved)[0].sum().backward()
    assert torch.equal(c3r.grad.sum(0), torch.ones_like(cos))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_apply_rotary_mrope_forward_backward(backend, fmt):
    cfg = RopeConfig(16, layout="interleaved")
    sections = [2, 3, 3]
    b = 1 if fmt == "thd" else 2
    torch.manual_seed(7)
    pos = torch.randint(0, 50, (3, b, 5))
    c3, s3 = cos_sin(cfg, pos)
    if fmt == "thd":
        c3, s3 = c3[:, 0], s3[:, 0]  # [3, t, r/2]
    q0, k0 = torch.randn(b, 5, 4, 16), torch.randn(b, 5, 2, 16)
    q = to_fmt(q0, fmt).clone().requires_grad_()
    k = to_fmt(k0, fmt).clone()
    qo, ko = apply_rotary_mrope(q, k, c3, s3, sections, format=fmt, layout=cfg.layout, backend=backend)
    c64, s64 = multi_axis_cos_sin(cfg, pos.movedim(0, -1), sections, dtype=torch.float64)  # [b, s, r/2]
    want_q = apply_rotary(q0.double(), c64[:, :, None], s64[:, :, None], layout=cfg.layout, backend="reference")
    want_k = apply_rotary(k0.double(), c64[:, :, None], s64[:, :, None], layout=cfg.layout, backend="reference")
    torch.testing.assert_close(from_fmt(qo, fmt).double(), want_q, atol=3e-6, rtol=3e-6)
    torch.testing.assert_close(from_fmt(ko, fmt).double(), want_k, atol=3e-6, rtol=3e-6)
    g = torch.randn(b, 5, 4, 16)
    (qo * to_fmt(g, fmt)).sum().backward()
    qr = q0.double().requires_grad_()
    (apply_rotary(qr, c64[:, :, None], s64[:, :, None], layout=cfg.layout, backend="reference") * g.double()).sum().backward()
    torch.testing.assert_close(from_fmt(q.grad, fmt).double(), qr.grad, atol=6e-6, rtol=6e-6)


def test_mrope_bad_tables():
    cfg = RopeConfig(16)
    c3, s3 = cos_sin(cfg, torch.randint(0, 9, (3, 5)))  # [3, s, r/2]
    q, k = torch.randn(1, 5, 2, 16), torch.randn(1, 5, 1, 16)
    with pytest.raises(RopeError, match="full-width"):
        mrope_tables(ropekit.to_full_width(c3), ropekit.to_full_width(s3), [2, 3, 3])
    with pytest.raises(RopeError, match="n_axes = len\\(sections\\) = 3"):
        mrope_tables(c3[:2], s3[:2], [2, 3, 3])
    with pytest.raises(RopeError, match="sections"):
        mrope_tables(c3, s3, [2, 3, -3])
    with pytest.raises(RopeError, match="same shape|one shape"):
        mrope_tables(c3, s3[:, :4], [2, 3, 3])
    with pytest.raises(RopeError, match="expected per-axis tables of shape"):
        apply_rotary_mrope(q, k, c3[:, :4], s3[:, :4], [2, 3, 3])


def test_mrope_matches_liger_kernel():
    """Liger's M-RoPE (Triton, here under the interpreter) on the same per-axis tables."""
    liger = pytest.importorskip("liger_kernel.transformers.qwen2vl_mrope")
    if "triton" not in BACKENDS:
        pytest.skip("triton not runnable here")
    cfg = RopeConfig(16)
    sections = [2, 3, 3]
    torch.manual_seed(8)
    pos = torch.randint(0, 50, (3, 2, 5))
    c3, s3 = cos_sin(cfg, pos)  # [3, b, s, r/2]
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)  # bhsd, Liger's layout
    hq, hk = liger.liger_multimodal_rotary_pos_emb(
        q.clone(), k.clone(), ropekit.to_full_width(c3), ropekit.to_full_width(s3), sections
    )
    gq, gk = apply_rotary_mrope(q, k, c3, s3, sections, format="bhsd")
    torch.testing.assert_close(gq, hq, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(gk, hk, atol=2e-6, rtol=2e-6)
