"""ropekit.serving: the rotation fused with the KV-cache write (``rotary_cache_``), exact
re-rotation inside caches, per-sequence scaling profiles — against a float64 oracle, the
refusals (public API and direct op calls), opcheck, and the Triton kernel under the
interpreter (bit-equal to the CPU op)."""

from __future__ import annotations

import math
import re

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, cos_sin, ops, serving
from ropekit.scaling import DynamicNTK, LongRoPE, YaRN

pytestmark = pytest.mark.skipif(not ops.LOADED, reason="the ops need ropekit._C")
OP = torch.ops.ropekit.rotary_cache_
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _oracle(x: torch.Tensor, pos: torch.Tensor, r: int, layout: str, base: float = 10000.0) -> torch.Tensor:
    """``x [t, h, d]`` rotated at ``pos [t]`` in float64 (angles from RoFormer's formula)."""
    inv = torch.tensor([base ** (-2.0 * i / r) for i in range(r // 2)], dtype=torch.float64)
    ang = pos.double()[:, None, None] * inv  # [t, 1, r/2]
    c, s = torch.cos(ang), torch.sin(ang)
    x = x.double()
    y = x.clone()
    i1 = torch.arange(r // 2) if layout == "half" else torch.arange(0, r, 2)
    i2 = i1 + r // 2 if layout == "half" else i1 + 1
    y[..., i1] = x[..., i1] * c - x[..., i2] * s
    y[..., i2] = x[..., i1] * s + x[..., i2] * c
    return y


def _pair_norm(x: torch.Tensor, r: int, layout: str) -> torch.Tensor:
    """Per element, the norm of its rotary pair (the element itself past r)."""
    i1 = torch.arange(r // 2) if layout == "half" else torch.arange(0, r, 2)
    i2 = i1 + r // 2 if layout == "half" else i1 + 1
    n = x.abs().clone()
    pn = torch.sqrt(x[..., i1] ** 2 + x[..., i2] ** 2)
    n[..., i1], n[..., i2] = pn, pn
    return n


def _one_rounding(got: torch.Tensor, want64: torch.Tensor) -> None:
    """``got`` within one rounding of the dtype (plus float32 compute error) of the float64 value."""
    eps = torch.finfo(got.dtype).eps
    err = (got.double() - want64).abs()
    bound = eps * want64.abs() + 4e-7 * (1 + want64.abs())
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def _cache(cl: str, nb: int, bs: int, h: int, d: int, dt) -> torch.Tensor:
    return torch.zeros(nb, h, bs, d, dtype=dt) if cl == "hnd" else torch.zeros(nb, bs, h, d, dtype=dt)


def _row(cache, slot: int, cl: str):
    bs = cache.shape[2 if cl == "hnd" else 1]
    return cache[slot // bs, :, slot % bs] if cl == "hnd" else cache[slot // bs, slot % bs]


@pytest.mark.parametrize("cl", ["nhd", "hnd", "bshd"])
@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("r", [64, 40])
def test_cache_write_against_the_oracle(cl, dt, layout, r):
    g = torch.Generator().manual_seed(hash((cl, str(dt), layout, r)) % 2**31)
    d, hq, hk, t = 64, 4, 2, 6  # GQA
    cfg = RopeConfig(d, rotary_dim=r)
    ct, st = cos_sin(cfg, torch.arange(300))
    q, k, v = (torch.randn(t, h, d, generator=g).to(dt) for h in (hq, hk, hk))
    pos = torch.tensor([0, 1, 299, 17, 128, 5])
    slots = torch.tensor([3, -1, 40, 0, 21, 63])  # -1: padding, never written
    kc, vc = _cache(cl, 4, 16, hk, d, dt), _cache(cl, 4, 16, hk, d, dt)
    q0 = q.clone()
    q2, k_rot = serving.apply_rotary_cache(q, k, ct, st, pos, kc, slots=slots, v=v, v_cache=vc, cache_layout=cl,
                                           layout=layout, return_k=True)
    assert q2 is q
    _one_rounding(q, _oracle(q0, pos, r, layout))
    _one_rounding(k_rot, _oracle(k, pos, r, layout))
    # the same bits as ropekit.apply_rotary of the same rows
    qr, kr = ropekit.apply_rotary_gather(q0, k, ct, st, positions=pos, format="thd", layout=layout)
    assert torch.equal(q, qr) and torch.equal(k_rot, kr)
    written = torch.zeros(64, dtype=torch.bool)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            written[s] = True
            assert torch.equal(_row(kc, s, cl), kr[i]) and torch.equal(_row(vc, s, cl), v[i])
            assert torch.equal(_row(kc, s, cl)[:, r:], k[i, :, r:])  # nope dims copied
    for s in (~written).nonzero()[:, 0].tolist():
        assert not _row(kc, s, cl).any() and not _row(vc, s, cl).any()


def test_dense_bshd_cache_with_batched_tokens_and_out_of_place():
    g = torch.Generator().manual_seed(1)
    b, s, h, d, smax = 3, 2, 2, 32, 10
    ct, st = cos_sin(RopeConfig(d), torch.arange(smax))
    q, k, v = (torch.randn(b, s, h, d, generator=g) for _ in range(3))
    off = torch.tensor([0, 4, 8])
    pos = off[:, None] + torch.arange(s)  # [b, s]
    slots = torch.arange(b)[:, None] * smax + pos  # dense: row i, position p
    kc, vc = torch.zeros(b, smax, h, d), torch.zeros(b, smax, h, d)
    q0 = q.clone()
    qr = serving.apply_rotary_cache(q, k, ct, st, pos, kc, slots=slots, v=v, v_cache=vc, cache_layout="bshd",
                                    inplace=False)
    assert torch.equal(q, q0) and qr is not q
    want_q, want_k = ropekit.apply_rotary_gather(q0, k, ct, st, positions=pos)
    assert torch.equal(qr, want_q)
    for i in range(b):
        assert torch.equal(kc[i, off[i]:off[i] + s], want_k[i]) and torch.equal(vc[i, off[i]:off[i] + s], v[i])


def test_packed_kv_cache_views_and_strided_inputs():
    """K and V halves of one buffer [N, B, h, 2, d] (views), q/k/v strided views of a fused qkv."""
    g = torch.Generator().manual_seed(2)
    t, hq, hk, d = 5, 4, 2, 16
    qkv = torch.randn(t, hq + 2 * hk, d, generator=g)
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hk], qkv[:, hq + hk:]
    kv = torch.zeros(3, 4, hk, 2, d)
    kc, vc = kv[:, :, :, 0], kv[:, :, :, 1]
    ct, st = cos_sin(RopeConfig(d), torch.arange(8))
    pos, slots = torch.arange(t), torch.tensor([0, 5, 6, 11, 2])
    want_q, want_k = ropekit.apply_rotary_gather(q.clone(), k.clone(), ct, st, positions=pos, format="thd")
    k0, v0 = k.clone(), v.clone()
    serving.apply_rotary_cache(q, k, ct, st, pos, kc, slots=slots, v=v, v_cache=vc)
    assert torch.equal(q, want_q) and torch.equal(qkv[:, hq:], torch.cat([k0, v0], 1))  # only q written
    for i, s in enumerate(slots.tolist()):
        assert torch.equal(kv[s // 4, s % 4, :, 0], want_k[i]) and torch.equal(kv[s // 4, s % 4, :, 1], v0[i])


def _case():
    g = torch.Generator().manual_seed(3)
    ct, st = cos_sin(RopeConfig(16), torch.arange(10))
    return dict(q=torch.randn(3, 2, 16, generator=g), k=torch.randn(3, 1, 16, generator=g), cos_table=ct, sin_table=st,
                positions=torch.tensor([1, 2, 3]), k_cache=torch.zeros(2, 4, 1, 16), slots=torch.tensor([0, 1, 2]),
                v=torch.randn(3, 1, 16, generator=g), v_cache=torch.zeros(2, 4, 1, 16))


def _bad(name):
    c = _case()
    if name == "duplicate slot":
        c["slots"] = torch.tensor([4, 1, 4])
    elif name == "slot past the cache":
        c["slots"] = torch.tensor([0, 8, 1])
    elif name == "position past the table":
        c["positions"] = torch.tensor([0, 10, 1])
    elif name == "k_cache overlaps k":
        c["k_cache"] = torch.zeros(2, 4, 1, 16)
        c["k"] = c["k_cache"][0, :3]
    elif name == "k_cache overlaps q":
        c["k_cache"] = torch.zeros(2, 4, 2, 16)
        c["q"] = c["k_cache"].view(8, 2, 16)[:3]
        c["k"] = torch.randn(3, 2, 16)
        c["v"], c["v_cache"] = None, None
    elif name == "v_cache is k_cache":
        c["v_cache"] = c["k_cache"]
    elif name == "v_cache overlaps the tables":
        buf = torch.zeros(200)
        c["cos_table"] = buf[:80].view(10, 8)
        c["v_cache"] = buf[64:192].view(2, 4, 1, 16)
    elif name == "v without v_cache":
        c["v_cache"] = None
    elif name == "cache dtype":
        c["k_cache"] = c["k_cache"].bfloat16()
    elif name == "cache heads":
        c["k_cache"] = torch.zeros(2, 4, 3, 16)
    elif name == "float slots":
        c["slots"] = c["slots"].float()
    elif name == "slots shape":
        c["slots"] = c["slots"][:2]
    elif name == "meta positions":
        c["positions"] = c["positions"].to("meta")
    elif name == "layout":
        c["layout"] = "neox"
    elif name == "cache_layout":
        c["cache_layout"] = "nchw"
    return c


BAD = ["duplicate slot", "slot past the cache", "position past the table", "k_cache overlaps k", "k_cache overlaps q",
       "v_cache is k_cache", "v_cache overlaps the tables", "v without v_cache", "cache dtype", "cache heads",
       "float slots", "slots shape", "meta positions", "layout", "cache_layout"]


@pytest.mark.parametrize("name", BAD)
def test_refusals_public_and_direct(name):
    c = _bad(name)
    snap = {k: v.clone() for k, v in c.items() if isinstance(v, torch.Tensor) and v.device.type == "cpu"}
    args = [c.pop(n) for n in ("q", "k", "cos_table", "sin_table", "positions", "k_cache")]
    kw = {k: v for k, v in c.items()}
    with pytest.raises(RopeError, match=r"^expected .*, got .*Fix: "):
        serving.apply_rotary_cache(*args, **kw)
    if name in ("layout", "cache_layout"):
        with pytest.raises(ValueError, match="^ropekit: expected"):
            OP(*args, kw["slots"], kw.get("v"), kw.get("v_cache"), None, kw.get("cache_layout", "nhd"),
               kw.get("layout", "half"))
        return
    with pytest.raises(ValueError, match="^(ropekit: )?expected"):  # a meta argument: the fake kernel's RopeError
        OP(*args, kw["slots"], kw.get("v"), kw.get("v_cache"))
    for nm, t in zip(("q", "k", "k_cache"), (args[0], args[1], args[5])):  # nothing was written
        if nm in snap:
            assert torch.equal(t, snap[nm]), nm


def test_requires_grad_is_refused_with_the_reason():
    c = _case()
    q = c["q"].requires_grad_()
    with pytest.raises(RopeError, match="not differentiable|inference step"):
        serving.apply_rotary_cache(q * 1, c["k"], c["cos_table"], c["sin_table"], c["positions"], c["k_cache"],
                                   slots=c["slots"])
    with torch.no_grad():
        serving.apply_rotary_cache(q * 1, c["k"], c["cos_table"], c["sin_table"], c["positions"], c["k_cache"],
                                   slots=c["slots"])


def test_flags_are_bools():
    c = _case()
    with pytest.raises(RopeError, match="True or False"):
        serving.apply_rotary_cache(c["q"], c["k"], c["cos_table"], c["sin_table"], c["positions"], c["k_cache"],
                                   slots=c["slots"], inplace="false")


@pytest.mark.parametrize("variant", ["kv", "k only", "k_out hnd bf16", "strided packed"])
def test_opcheck(variant):
    c = _case()
    args = [c["q"], c["k"], c["cos_table"], c["sin_table"], c["positions"], c["k_cache"], c["slots"]]
    if variant == "kv":
        args += [c["v"], c["v_cache"], None, "nhd", "interleaved"]
    elif variant == "k_out hnd bf16":
        args = [a.bfloat16() if a.dtype == torch.float32 and a.dim() == 3 else a for a in args]
        args[5] = torch.zeros(2, 1, 4, 16, dtype=torch.bfloat16)
        args += [None, None, torch.empty_like(args[1]), "hnd", "half"]
    elif variant == "strided packed":
        kv = torch.zeros(2, 4, 1, 2, 16)
        args[5] = kv[..., 0, :]
        args += [c["v"], kv[..., 1, :], None, "nhd", "half"]
    torch.library.opcheck(OP.default, tuple(args))


# --- re-rotation ---------------------------------------------------------------------------


def _store(cfg, k, pos, cache, slots, cl="nhd", seq_len=None, layout=None):
    """Write ``k`` rotated at ``pos`` (the config's tables, attention factor included) into the cache."""
    ct, st = cos_sin(cfg, torch.arange(int(pos.max()) + 1), seq_len=seq_len)
    serving.apply_rotary_cache(k.new_empty(k.shape[0], 0, k.shape[-1]), k, ct, st, pos, cache, slots=slots,
                               cache_layout=cl, layout=layout or cfg.layout)


@pytest.mark.parametrize("cl", ["nhd", "hnd"])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rerotate_cache_moves_keys_exactly(cl, dt, layout):
    g = torch.Generator().manual_seed(4)
    cfg = RopeConfig(64, rotary_dim=48, layout=layout)
    k = torch.randn(6, 2, 64, generator=g).to(dt)
    slots = torch.tensor([1, 2, 9, 17, 30, 31])
    old, new = torch.tensor([4, 5, 6, 7, 1000, 2000]), torch.tensor([0, 1, 2, 3, 3, 4096])
    cache, ref = _cache(cl, 2, 16, 2, 64, dt), _cache(cl, 2, 16, 2, 64, dt)
    _store(cfg, k, old, cache, slots, cl)
    assert serving.rerotate_cache(cache, slots, old, new, cfg, cache_layout=cl) is cache
    _store(cfg, k, new, ref, slots, cl)
    got = torch.stack([_row(cache, s, cl) for s in slots.tolist()])
    want = _oracle(k, new, 48, layout)
    if dt == torch.float32:
        _one_rounding(got, want)
    else:  # the stored key was rounded once (an error the rotation spreads over its pair), then once more
        err = (got.double() - want).abs()
        assert bool((err <= torch.finfo(dt).eps * (want.abs() + _pair_norm(want, 48, layout)) / 2 + 1e-6).all())


def test_rerotate_cache_packed_head_stride_and_skip():
    g = torch.Generator().manual_seed(5)
    cfg = RopeConfig(32)
    kv = torch.zeros(2, 4, 3 * 64)  # [N, B, h * (K d | V d)]: K and V interleaved per head
    k = torch.randn(3, 3, 32, generator=g)
    view = kv.unflatten(-1, (3, 64))[..., :32]
    slots, pos = torch.tensor([0, 5, 7]), torch.tensor([10, 11, 12])
    _store(cfg, k, pos, view, slots)
    vals = kv.unflatten(-1, (3, 64))[..., 32:]
    vals.copy_(torch.randn(vals.shape, generator=g))
    v0 = vals.clone()
    before = view[1, 1].clone()  # slot 5
    serving.rerotate_cache(kv, torch.tensor([0, -1, 7]), pos, pos - 10, cfg, head_stride=64)
    assert torch.equal(vals, v0) and torch.equal(view[1, 1], before)  # values and skipped slot untouched
    _one_rounding(torch.stack([view[0, 0], view[1, 3]]), _oracle(k[[0, 2]], torch.tensor([0, 2]), 32, "half"))


def test_rerotate_cache_mrope():
    g = torch.Generator().manual_seed(6)
    cfg, sec = RopeConfig(32), [4, 6, 6]
    k = torch.randn(4, 1, 32, generator=g)
    old = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 1], [0, 1, 0, 1]])  # [3, n] (t, h, w)
    new = old + torch.tensor([[50], [0], [0]])  # e.g. a video segment reused later in time
    cache, ref = torch.zeros(1, 8, 1, 32), torch.zeros(1, 8, 1, 32)
    slots = torch.tensor([0, 1, 2, 3])

    def store(p, c):
        c3, s3 = cos_sin(cfg, p.T[None])  # [1, n, 3, r/2] per axis
        cm, sm = ropekit.mrope_tables(c3[0].permute(1, 0, 2), s3[0].permute(1, 0, 2), sec)  # [n, r/2]
        serving.apply_rotary_cache(k.new_empty(4, 0, 32), k, cm, sm, torch.arange(4), c, slots=slots)

    store(old, cache)
    serving.rerotate_cache(cache, slots, old, new, cfg, mrope_section=sec)
    store(new, ref)
    assert (cache - ref).abs().max() < 2e-6


def _longrope(r=32, orig=64):
    short = [1.0 + 0.05 * i for i in range(r // 2)]
    long = [1.0 + 0.5 * i for i in range(r // 2)]
    return RopeConfig(r, scaling=LongRoPE(short, long, orig, factor=4.0))


def test_rerotate_cache_across_the_longrope_switch():
    g = torch.Generator().manual_seed(7)
    cfg = _longrope()
    k = torch.randn(5, 2, 32, generator=g)
    pos, slots = torch.tensor([0, 10, 20, 40, 63]), torch.tensor([0, 1, 2, 3, 4])
    cache, ref = torch.zeros(1, 8, 2, 32), torch.zeros(1, 8, 2, 32)
    _store(cfg, k, pos, cache, slots, seq_len=64)  # short factors
    serving.rerotate_cache(cache, slots, pos, pos, cfg, old_seq_len=64, new_seq_len=65)
    _store(cfg, k, pos, ref, slots, seq_len=65)  # long factors from scratch
    assert (cache - ref).abs().max() < 4e-6
    a = cfg.attention_factor
    assert a > 1 and torch.allclose(cache.norm(dim=-1)[0, :5], a * k.norm(dim=-1), rtol=1e-5)


# --- per-sequence profiles -----------------------------------------------------------------


def test_profiles_one_gather_call_same_bits_as_each_profile_alone():
    g = torch.Generator().manual_seed(8)
    cfgs = [RopeConfig(32), RopeConfig(32, scaling=YaRN(4.0, 16)), RopeConfig(32, scaling=YaRN(8.0, 16))]
    cos, sin, idx = serving.profile_tables(cfgs, 40)
    assert cos.shape == (3, 40, 16) and idx is None
    b, s = 4, 3
    q, k = torch.randn(b, s, 4, 32, generator=g), torch.randn(b, s, 2, 32, generator=g)
    prof = torch.tensor([2, 0, 1, 2])
    pos = torch.tensor([[0, 1, 2], [5, 6, 7], [37, 38, 39], [10, 11, 12]])
    qr, kr = serving.apply_rotary_profiles(q, k, cos, sin, prof, positions=pos)
    for i in range(b):
        ct, st = cos_sin(cfgs[int(prof[i])], torch.arange(40))
        wq, wk = ropekit.apply_rotary_gather(q[i:i + 1], k[i:i + 1], ct, st, positions=pos[i:i + 1])
        assert torch.equal(qr[i:i + 1], wq) and torch.equal(kr[i:i + 1], wk)
    with pytest.raises(RopeError, match="profile indices"):
        serving.apply_rotary_profiles(q, k, cos, sin, torch.tensor([0, 1, 3, 0]), positions=pos)


def test_longrope_and_dynamic_ntk_profiles_by_length():
    cfg = _longrope()
    cos, sin, idx = serving.profile_tables(cfg, 100, seq_lens=[30, 64, 65, 200])
    assert cos.shape[0] == 2 and idx.tolist() == [0, 0, 1, 1]
    assert [serving.longrope_profile(cfg, n) for n in (64, 65)] == [0, 1]
    assert torch.equal(cos[1], cos_sin(cfg, torch.arange(100), seq_len=65)[0])
    ntk = RopeConfig(32, scaling=DynamicNTK(2.0, 64))
    cos, sin, idx = serving.profile_tables(ntk, 100, seq_lens=[10, 64, 80, 80, 100])
    assert cos.shape[0] == 3 and idx.tolist() == [0, 0, 1, 1, 2]
    # decode: one token per sequence ([b] positions), thd packed
    q, k = torch.randn(4, 1, 2, 32), torch.randn(4, 1, 1, 32)
    qr, _ = serving.apply_rotary_profiles(q, k, cos, sin, idx[1:], positions=torch.tensor([63, 79, 79, 99]))
    ct, st = cos_sin(ntk, torch.arange(100), seq_len=100)
    assert torch.equal(qr[3], ropekit.apply_rotary_gather(q[3:], k[3:], ct, st, positions=torch.tensor([[99]]))[0][0])


# --- the Triton kernel under the interpreter: bit-equal to the CPU op ------------------------


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout,cl,r", [("half", "nhd", 24), ("interleaved", "hnd", 32)])
def test_triton_kernel_bit_equal_to_the_cpu_op(dt, layout, cl, r):
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernel on CPU tensors under TRITON_INTERPRET=1")
    from ropekit.backends import _triton_cache as TC

    g = torch.Generator().manual_seed(9)
    t, hq, hk, d = 5, 3, 2, 32  # odd heads: masked rows
    ct, st = cos_sin(RopeConfig(d, rotary_dim=r), torch.arange(50))
    q, k, v = (torch.randn(t, h, d, generator=g).to(dt) for h in (hq, hk, hk))
    q[0, 0, 0] = float("nan")
    pos, slots = torch.tensor([3, 7, 49, 0, 20]), torch.tensor([5, -1, 17, 2, 30])
    outs = []
    for fn in (OP, TC.rotary_cache_):
        qq, kc, vc = q.clone(), _cache(cl, 4, 8, hk, d, dt), _cache(cl, 4, 8, hk, d, dt)
        ko = torch.empty_like(k)
        fn(qq, k, ct, st, pos, kc, slots, v, vc, ko, cl, layout)
        outs.append([x.view(torch.int16 if x.element_size() == 2 else torch.int32) for x in (qq, kc, vc, ko)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    with pytest.raises(RopeError, match="twice"):
        TC.rotary_cache_(q.clone(), k, ct, st, pos, _cache(cl, 4, 8, hk, d, dt), torch.tensor([1, 2, 3, 2, 0]), None, None,
                         None, cl, layout)


def test_docs_decode_loop_matches_recomputing_every_key():
    """docs/serving.md: the decode loop (paged cache, sink eviction, the LongRoPE switch) runs and
    its asserts hold (keys and attention outputs within one bf16 rounding of a from-scratch run)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "serving.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    exec(compile("\n".join(blocks), "docs/serving.md", "exec"), {"__name__": "docs_serving"})


def test_torch_composition_for_devices_without_a_kernel(monkeypatch):
    """Where no ropekit kernel runs (another device, or no compiled ops) the same call is torch code."""
    c = _case()
    q1, q2 = c["q"].clone(), c["q"].clone()
    kc1, vc1, kc2, vc2 = (torch.zeros(2, 1, 4, 16) for _ in range(4))
    slots = torch.tensor([0, -1, 6])
    q1, k1 = serving.apply_rotary_cache(q1, c["k"], c["cos_table"], c["sin_table"], c["positions"], kc1, slots=slots,
                                        v=c["v"], v_cache=vc1, cache_layout="hnd", return_k=True)
    monkeypatch.setattr(serving, "_op_device", lambda t: False)
    q2, k2 = serving.apply_rotary_cache(q2, c["k"], c["cos_table"], c["sin_table"], c["positions"], kc2, slots=slots,
                                        v=c["v"], v_cache=vc2, cache_layout="hnd", return_k=True)
    for a, b in ((q1, q2), (k1, k2), (kc1, kc2), (vc1, vc2)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_triton_kernel_without_q_mixed_dtypes_and_strided_q():
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernel on CPU tensors under TRITON_INTERPRET=1")
    from ropekit.backends import _triton_cache as TC

    g = torch.Generator().manual_seed(10)
    ct, st = cos_sin(RopeConfig(32), torch.arange(20))
    k, pos, slots = torch.randn(4, 2, 32, generator=g), torch.arange(4), torch.tensor([3, 0, -1, 7])
    qs = [torch.empty(4, 0, 32), torch.randn(4, 3, 32, generator=g, dtype=torch.float64),
          torch.randn(4, 32, 3, generator=g).transpose(1, 2)]  # no q (re-rotation), q in float64, q strided
    for q in qs:
        outs = []
        for fn in (OP, TC.rotary_cache_):
            qq, kc = q.clone(memory_format=torch.preserve_format), torch.zeros(2, 4, 2, 32)
            fn(qq, k, ct, st, pos, kc, slots)
            outs.append((qq, kc))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# --------------------------------------------------------------------------------------
# RotaryEmbedding(..., seq_lens=): one profile per sequence in one call


def _longrope_cfg():
    import json
    from pathlib import Path

    return ropekit.RopeConfig.from_hf(json.loads((Path(__file__).parent / "data" / "phi-3.5-mini-instruct.json").read_text()))


@pytest.mark.parametrize("which", ["longrope", "dynamic_ntk"])
@pytest.mark.parametrize("fmt", ["bshd", "bhsd", "sbhd"])
def test_module_seq_lens_equals_one_call_per_sequence(which, fmt):
    if which == "longrope":
        cfg = _longrope_cfg()
        lens = [100, 9000, 200000]  # short factors, long factors, long factors
    else:
        cfg = ropekit.RopeConfig(32, scaling=ropekit.scaling.DynamicNTK(factor=2.0, max_position=64))
        lens = [10, 300, 64]
    rope = ropekit.RotaryEmbedding(cfg)
    b, s, d = 3, 4, cfg.head_dim
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(b, s, 4, d, generator=g), torch.randn(b, s, 2, d, generator=g)
    off = torch.tensor([10, 50, 7])
    perm = {"bshd": (0, 1, 2, 3), "bhsd": (0, 2, 1, 3), "sbhd": (1, 0, 2, 3)}[fmt]
    qo, ko = rope(q.permute(perm), k.permute(perm), offsets=off, seq_lens=lens, format=fmt)
    qo, ko = qo.permute(perm), ko.permute(perm)  # back to bshd (the permutations are involutions)
    for i in range(b):
        qi, ki = rope(q[i:i + 1], k[i:i + 1], offsets=int(off[i]), seq_len=lens[i])
        assert torch.equal(qi, qo[i:i + 1]) and torch.equal(ki, ko[i:i + 1]), i


def test_module_seq_lens_refusals():
    rope = ropekit.RotaryEmbedding(_longrope_cfg())
    d = rope.cfg.head_dim
    q, k = torch.randn(2, 3, 2, d), torch.randn(2, 3, 1, d)
    with pytest.raises(ropekit.RopeError, match="one planned length per sequence"):
        rope(q, k, seq_lens=[100])
    with pytest.raises(ropekit.RopeError, match="seq_lens"):
        rope(q, k, seq_lens=[100, 0])
    with pytest.raises(ropekit.RopeError, match="4-D format"):
        rope(q[0], k[0], format="thd", cu_seqlens=torch.tensor([0, 3]), seq_lens=[100])
