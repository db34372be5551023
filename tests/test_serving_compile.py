"""ropekit.serving under torch.compile (default and fullgraph=True): every bad input is the
eager call's RopeError (the same message, nothing written), valid calls have the eager bits,
and ``rerotate_cache`` traces as one graph (no graph break, no host read of a tensor). Also the
refusals of the adversarial pass (eager): uint64 slots past 2**63, ``cache_rows``'s arguments,
the torch composition for devices without a kernel, positions and slots on another device."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ropekit import RopeConfig, RopeError, cos_sin, ops, serving
from ropekit.scaling import DynamicNTK, YaRN

pytestmark = pytest.mark.skipif(not ops.LOADED, reason="the ops need ropekit._C")

MODES = ["default", "fullgraph"]
HOUSE = r"^expected .*, got .*\. Fix: "


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(fn, mode, **kw):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=mode == "fullgraph", dynamic=False, **kw)


def _same_refusal(fn, make_args, mode, written=()):
    """``fn(*make_args())`` is refused eagerly with a RopeError in the house format; compiled, twice
    (the first call compiles, the second runs the cached graph), with the same RopeError; the
    tensors at the indices ``written`` are not written by any of the calls (fresh arguments for
    each: their strides and aliasing as made)."""
    cf = _compile(fn, mode)
    msgs = []
    for i, f in enumerate((fn, cf, cf)):
        args = make_args()
        before = [args[j].clone() for j in written]
        with pytest.raises(Exception) as got:
            f(*args)
        assert type(got.value) is RopeError, f"call {i}: {type(got.value).__name__}: {got.value}"
        msgs.append(str(got.value))
        assert all(torch.equal(args[j], b) for j, b in zip(written, before)), f"call {i} wrote before refusing"
    assert re.match(HOUSE, msgs[0]), msgs[0]
    assert msgs[1] == msgs[0] and msgs[2] == msgs[0], msgs
    return msgs[0]


# --------------------------------------------------------------------------------------
# apply_rotary_cache
# --------------------------------------------------------------------------------------

CT, ST = cos_sin(RopeConfig(16), torch.arange(10))


def _cache_args(**change):
    g = torch.Generator().manual_seed(3)
    a = dict(q=torch.randn(3, 2, 16, generator=g), k=torch.randn(3, 1, 16, generator=g),
             positions=torch.tensor([1, 2, 3]), k_cache=torch.zeros(2, 4, 1, 16), slots=torch.tensor([0, 1, 2]),
             v=torch.randn(3, 1, 16, generator=g), v_cache=torch.zeros(2, 4, 1, 16))
    a.update(change)
    return a


def _args(a):
    return [a[n] for n in ("q", "k", "positions", "k_cache", "slots", "v", "v_cache")]


def _cache_call(kw):
    def fn(q, k, positions, k_cache, slots, v, v_cache):
        return serving.apply_rotary_cache(q, k, CT, ST, positions, k_cache, slots=slots, v=v, v_cache=v_cache, **kw)
    return fn


CACHE_BAD = {  # name -> (changed arguments (a function: fresh tensors for every call), keyword arguments)
    "position past the table": (lambda: dict(positions=torch.tensor([0, 10, 1])), {}),
    "negative position": (lambda: dict(positions=torch.tensor([0, -1, 1])), {}),
    "slot past the cache": (lambda: dict(slots=torch.tensor([0, 8, 1])), {}),
    "slot twice": (lambda: dict(slots=torch.tensor([4, 1, 4])), {}),
    "uint64 slot of 2**63": (lambda: dict(slots=torch.tensor([2**63 + 1, 1, 2], dtype=torch.uint64)), {}),
    "float slots": (lambda: dict(slots=torch.tensor([0.0, 1.0, 2.0])), {}),
    "float positions": (lambda: dict(positions=torch.tensor([0.0, 1.0, 2.0])), {}),
    "slots shape": (lambda: dict(slots=torch.tensor([0, 1])), {}),
    "positions shape": (lambda: dict(positions=torch.tensor([[0, 1, 2]])), {}),
    "cache dtype": (lambda: dict(k_cache=torch.zeros(2, 4, 1, 16, dtype=torch.bfloat16)), {}),
    "cache heads": (lambda: dict(k_cache=torch.zeros(2, 4, 3, 16)), {}),
    "cache of 3 dims": (lambda: dict(k_cache=torch.zeros(8, 1, 16)), {}),
    "cache last stride": (lambda: dict(k_cache=torch.zeros(2, 4, 1, 32)[..., ::2]), {}),
    "v_cache blocks": (lambda: dict(v_cache=torch.zeros(3, 4, 1, 16)), {}),
    "v without v_cache": (lambda: dict(v_cache=None), {}),
    "v_cache is k_cache": (lambda: (lambda c: dict(k_cache=c, v_cache=c))(torch.zeros(2, 4, 1, 16)), {}),
    "q is a view of the cache": (lambda: (lambda b: dict(q=b[:96].view(3, 2, 16), k_cache=b[:128].view(2, 4, 1, 16)))(
        torch.zeros(128)), {}),
    "k requires grad": (lambda: dict(k=torch.randn(3, 1, 16, requires_grad=True)), {}),
    "layout": (lambda: {}, dict(layout="neox")),
    "cache_layout": (lambda: {}, dict(cache_layout="nchw")),
    "layout not a str": (lambda: {}, dict(layout=1)),
    "flag not a bool": (lambda: {}, dict(inplace="false")),
    "positions a list": (lambda: dict(positions=[1, 2, 3]), {}),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CACHE_BAD))
def test_apply_rotary_cache_compiled_refuses_as_eager(case, mode):
    change, kw = CACHE_BAD[case]
    written = (0, 3) if case == "v without v_cache" else (0, 3, 6)
    _same_refusal(_cache_call(kw), lambda: _args(_cache_args(**change())), mode, written)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["return_k", "out of place"])
def test_apply_rotary_cache_compiled_refusals_with_other_results(variant, mode):
    kw = dict(return_k=True) if variant == "return_k" else dict(inplace=False)
    _same_refusal(_cache_call(kw), lambda: _args(_cache_args(slots=torch.tensor([1, 1, 2]))), mode, (0, 3, 6))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [("float32", "nhd", "half", False), ("bfloat16", "hnd", "interleaved", True),
                                  ("float16", "bshd", "half", True), ("float64", "nhd", "interleaved", False)])
def test_apply_rotary_cache_compiled_has_the_eager_bits(case, mode):
    dt, cl, layout, packed = getattr(torch, case[0]), *case[1:]
    g = torch.Generator().manual_seed(5)
    d, bs, r = 16, 3, 10  # an odd block size, partial rotary
    ct, st = cos_sin(RopeConfig(d, rotary_dim=r), torch.arange(40), dtype=torch.float64 if dt == torch.float64
                     else torch.float32)
    qkv = torch.randn(5, 4 + 2 * 2, d, generator=g).to(dt)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]  # strided views of a fused projection
    pos, slots = torch.tensor([0, 39, 5, 7, 11]), torch.tensor([0, 7, -1, 2, 11])

    def caches():
        shape = (4, 2, bs, d) if cl == "hnd" else (4, bs, 2, d)
        if packed:  # K and V halves of one buffer
            kv = torch.zeros(*shape[:-1], 2, d, dtype=dt)
            return kv[..., 0, :], kv[..., 1, :]
        return torch.zeros(shape, dtype=dt), torch.zeros(shape, dtype=dt)

    def fn(q, k, v, pos, slots, kc, vc):
        return serving.apply_rotary_cache(q, k, ct, st, pos, kc, slots=slots, v=v, v_cache=vc, cache_layout=cl,
                                          layout=layout, inplace=False, return_k=True)

    outs = []
    for f in (fn, _compile(fn, mode)):
        kc, vc = caches()
        outs.append((*f(q, k, v, pos, slots, kc, vc), kc, vc))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_uint64_slot_past_two_to_the_63_is_refused_not_skipped():
    """Converted to int64 it reads as a negative slot (skipped): the key was silently not written."""
    a = _cache_args(slots=torch.tensor([2**63 + 1, 1, 2], dtype=torch.uint64), v=None, v_cache=None)
    with pytest.raises(RopeError, match=r"slots below .*got a uint64 slot of 2\*\*63 or more"):
        serving.apply_rotary_cache(a["q"], a["k"], CT, ST, a["positions"], a["k_cache"], slots=a["slots"])
    assert not a["k_cache"].any()
    ok = torch.tensor([0, 1, 2], dtype=torch.uint64)  # uint64 slots below 2**63 are slots
    serving.apply_rotary_cache(a["q"], a["k"], CT, ST, a["positions"], a["k_cache"], slots=ok)
    assert a["k_cache"].view(8, 16)[:3].any(-1).all()


def _no_kernel(monkeypatch):
    monkeypatch.setattr(serving, "_op_device", lambda t: False)


@pytest.mark.parametrize("case", ["slot twice", "slot past the cache", "position past the table", "cache heads",
                                  "v_cache is k_cache"])
def test_torch_composition_refuses_as_the_kernel(case, monkeypatch):
    """Devices without a ropekit kernel run the op in torch: the same RopeErrors as the kernel
    (it had no validator and no value checks: a slot twice was written twice, a slot past the
    cache an IndexError, a cache of other heads a broadcast error)."""
    change, kw = CACHE_BAD[case]
    with pytest.raises(RopeError) as kernel:
        _cache_call(kw)(*_args(_cache_args(**change())))
    _no_kernel(monkeypatch)
    got = _args(_cache_args(**change()))
    before = [got[i].clone() for i in (0, 3, 6)]
    with pytest.raises(RopeError) as composed:
        _cache_call(kw)(*got)
    assert str(composed.value) == str(kernel.value)
    assert all(torch.equal(got[i], b) for i, b in zip((0, 3, 6), before))


@pytest.mark.parametrize("mode", MODES)
def test_torch_composition_compiled_refuses_as_eager(mode, monkeypatch):
    _no_kernel(monkeypatch)
    _same_refusal(_cache_call({}), lambda: _args(_cache_args(slots=torch.tensor([4, 1, 4]))), mode, (0, 3, 6))


# --------------------------------------------------------------------------------------
# rerotate_cache
# --------------------------------------------------------------------------------------

CFG = RopeConfig(16)


def _rerotate(kw=None):
    def fn(k_cache, slots, old, new):
        return serving.rerotate_cache(k_cache, slots, old, new, CFG, **(kw or {}))
    return fn


RR_BAD = {  # name -> (slots, old, new, keyword arguments)
    "negative old position": ([0, 1, 2], [-1, 4, 5], [0, 1, 2], {}),
    "new position past 2**53": ([0, 1, 2], [3, 4, 5], [2**53 + 1, 1, 2], {}),
    "slot past the cache": ([0, 8, 2], [3, 4, 5], [0, 1, 2], {}),
    "slot twice": ([1, 1, 2], [3, 4, 5], [0, 1, 2], {}),
    "positions shape": ([0, 1, 2], [3, 4], [0, 1], {}),
    "cache_layout": ([0, 1, 2], [3, 4, 5], [0, 1, 2], dict(cache_layout="x")),
    "head_stride on hnd": ([0, 1, 2], [3, 4, 5], [0, 1, 2], dict(head_stride=16, cache_layout="hnd")),
    "mrope_section sum": ([0, 1, 2], [[3, 4, 5]] * 2, [[0, 1, 2]] * 2, dict(mrope_section=[1, 2])),
    "new_cfg of another layout": ([0, 1, 2], [3, 4, 5], [0, 1, 2], dict(new_cfg=RopeConfig(16, layout="interleaved"))),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(RR_BAD))
def test_rerotate_cache_compiled_refuses_as_eager(case, mode):
    slots, old, new, kw = RR_BAD[case]
    _same_refusal(_rerotate(kw), lambda: [torch.randn(2, 4, 1, 16), torch.tensor(slots), torch.tensor(old),
                                          torch.tensor(new)], mode, (0,))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["float positions", "float slots", "uint64 slot of 2**63", "uint64 position of 2**63",
                                  "integer cache"])
def test_rerotate_cache_compiled_refuses_bad_dtypes_as_eager(case, mode):
    def make():
        cache, slots, old, new = torch.randn(2, 4, 1, 16), torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), \
            torch.tensor([0, 1, 2])
        if case == "float positions":
            old = old.float()
        elif case == "float slots":
            slots = slots.float()
        elif case == "uint64 slot of 2**63":
            slots = torch.tensor([2**63 + 1, 1, 2], dtype=torch.uint64)
        elif case == "uint64 position of 2**63":
            new = torch.tensor([2**63 + 1, 1, 2], dtype=torch.uint64)
        else:
            cache = torch.zeros(2, 4, 1, 16, dtype=torch.int32)
        return [cache, slots, old, new]

    _same_refusal(_rerotate(), make, mode, (0,))


def test_rerotate_cache_positions_and_slots_on_another_device():
    cache, s = torch.randn(2, 4, 1, 16), torch.tensor([0, 1, 2])
    with pytest.raises(RopeError, match=r"old_positions on k_cache's device cpu \(or the CPU\), got old_positions on "
                                        r"meta"):
        serving.rerotate_cache(cache, s, s.to("meta"), s, CFG)  # (was NotImplementedError: no data)
    with pytest.raises(RopeError, match=r"slots on k_cache's device meta, got slots on cpu"):
        serving.rerotate_cache(cache.to("meta"), s, s, s, CFG)  # (was: "slots on q's device", no q here)
    serving.rerotate_cache(cache.to("meta"), s.to("meta"), s, s, CFG)  # CPU positions serve any cache


def test_rerotate_cache_uint64_slots_eager():
    cache = torch.randn(2, 4, 1, 16)
    before = cache.clone()
    with pytest.raises(RopeError, match=r"slots below N \* B = 8 .*got a uint64 slot of 2\*\*63 or more"):
        serving.rerotate_cache(cache, torch.tensor([2**63 + 1, 1], dtype=torch.uint64), torch.tensor([3, 4]),
                               torch.tensor([0, 1]), CFG)  # (was NotImplementedError: "max_all" for UInt64)
    with pytest.raises(RopeError, match=r"slots below N \* B = 8 .*got a slot of 9"):
        serving.rerotate_cache(cache, torch.tensor([9, 1], dtype=torch.uint64), torch.tensor([3, 4]),
                               torch.tensor([0, 1]), CFG)
    assert torch.equal(cache, before)
    want = cache.clone()
    serving.rerotate_cache(want, torch.tensor([2, 1]), torch.tensor([3, 4]), torch.tensor([0, 1]), CFG)
    serving.rerotate_cache(cache, torch.tensor([2, 1], dtype=torch.uint64), torch.tensor([3, 4]), torch.tensor([0, 1]),
                           CFG)
    assert torch.equal(cache, want)


def _phi():
    return RopeConfig.from_hf(json.loads((Path(__file__).parent / "data" / "phi-3.5-mini-instruct.json").read_text()))


RR_OK = {  # name -> (cfg, keyword arguments, cache dtype, cache form)
    "one config": (lambda: RopeConfig(32), {}, torch.float32, "nhd"),
    "an equal config (another object)": (lambda: RopeConfig(32), dict(new_cfg=RopeConfig(32)), torch.bfloat16, "hnd"),
    "another base": (lambda: RopeConfig(32), dict(new_cfg=RopeConfig(32, base=500000.0)), torch.float16, "nhd"),
    "direction -1 to 1": (lambda: RopeConfig(32, direction=-1), dict(new_cfg=RopeConfig(32)), torch.float64, "nhd"),
    "YaRN to none (attention factor)": (lambda: RopeConfig(32, scaling=YaRN(factor=4.0, original_max_position=64)),
                                        dict(new_cfg=RopeConfig(32)), torch.float32, "packed"),
    "dynamic NTK lengths": (lambda: RopeConfig(32, scaling=DynamicNTK(factor=2.0, max_position=64)),
                            dict(old_seq_len=10, new_seq_len=300), torch.bfloat16, "nhd"),
    "LongRoPE short to long": (_phi, dict(old_seq_len=100, new_seq_len=9000), torch.bfloat16, "nhd"),
    "M-RoPE interleaved": (lambda: RopeConfig(32), dict(mrope_section=[6, 5, 5], mrope_interleaved=True),
                           torch.float32, "hnd"),
    "MLA offset": (lambda: RopeConfig(32, rotary_dim=16, rotary_offset=16), {}, torch.float32, "nhd"),
    "head_stride": (lambda: RopeConfig(32, layout="interleaved"), dict(head_stride=64), torch.float16, "stride"),
}


@pytest.mark.parametrize("case", list(RR_OK))
def test_rerotate_cache_is_one_graph_with_the_eager_bits(case):
    """One graph: no graph break (there were breaks at the host read ``int(slots.max())`` and at
    ``Tensor.equal`` of the old and new frequencies, 3 in ``torch._dynamo`` counters), and the
    compiled call has the eager call's bits."""
    make, kw, dt, form = RR_OK[case]
    cfg = make()
    d = cfg.head_dim
    g = torch.Generator().manual_seed(11)
    bs, nb, h = 5, 3, 2  # an odd block size
    if form == "stride":
        buf = torch.randn(nb, bs, h * kw["head_stride"], generator=g).to(dt)
    elif form == "hnd":
        buf = torch.randn(nb, h, bs, d, generator=g).to(dt)
    else:
        buf = torch.randn(nb, bs, h, *((2,) if form == "packed" else ()), d, generator=g).to(dt)
    slots = torch.tensor([3, 0, -1, 14, 7, 9])
    shp = (3, 6) if "mrope_section" in kw else (6,)
    old, new = torch.randint(0, 5000, shp, generator=g), torch.randint(0, 5000, shp, generator=g)

    def fn(buf, slots, old, new):
        cache = buf[..., 0, :] if form == "packed" else buf
        serving.rerotate_cache(cache, slots, old, new, cfg, cache_layout="hnd" if form == "hnd" else "nhd", **kw)
        return buf

    explained = torch._dynamo.explain(fn)(buf.clone(), slots, old, new)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, [b.reason for b in explained.break_reasons]
    want = fn(buf.clone(), slots, old, new)
    assert not torch.equal(want, buf)
    got = _compile(fn, "fullgraph")(buf.clone(), slots, old, new)
    assert torch.equal(got, want)


def test_rerotate_cache_compiled_with_dynamic_shapes():
    cf = torch.compile(_rerotate(), fullgraph=True, dynamic=True)
    for n in (3, 5, 7):
        s = torch.randperm(8)[:n]
        old, new = torch.randint(0, 999, (n,)), torch.randint(0, 999, (n,))
        want = torch.randn(2, 4, 1, 16)
        got = want.clone()
        _rerotate()(want, s, old, new)
        cf(got, s, old, new)
        assert torch.equal(got, want)
        with pytest.raises(RopeError, match="old_positions >= 0"):
            cf(got, s, old - 1000, new)
        with pytest.raises(RopeError, match=r"slots below N \* B = 8"):
            cf(got, s + 8, old, new)


# --------------------------------------------------------------------------------------
# cache_rows
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,match", [
    ("float slots", "slots an integer tensor"),  # (was truncated: 1.7 read slot 1)
    ("bool slots", "slots an integer tensor"),  # (was read as slot 1)
    ("slot past the cache", r"slots below N \* B = 8"),  # (was an IndexError)
    ("cache of 3 dims", "cache of 4 dims"),  # (was read as [N, B, d] rows)
    ("slots a list", "slots a torch.Tensor"),  # (was an AttributeError)
])
def test_cache_rows_refusals(case, match):
    cache, slots = torch.randn(2, 4, 1, 16), torch.tensor([1])
    if case == "float slots":
        slots = torch.tensor([1.7])
    elif case == "bool slots":
        slots = torch.tensor([True])
    elif case == "slot past the cache":
        slots = torch.tensor([3, 8])
    elif case == "cache of 3 dims":
        cache = torch.randn(8, 1, 16)
    else:
        slots = [1]
    with pytest.raises(RopeError, match=match):
        serving.cache_rows(cache, slots)


@pytest.mark.parametrize("mode", MODES)
def test_cache_rows_compiled_refuses_as_eager(mode):
    _same_refusal(lambda c, s: serving.cache_rows(c, s), lambda: [torch.randn(2, 4, 1, 16), torch.tensor([3, 8])], mode)
    _same_refusal(lambda c, s: serving.cache_rows(c, s), lambda: [torch.randn(2, 4, 1, 16), torch.tensor([3.0])], mode)
    c, s = torch.randn(2, 1, 4, 16), torch.tensor([7, -1, 2])
    rows = _compile(lambda c, s: serving.cache_rows(c, s, "hnd"), mode)
    assert torch.equal(rows(c, s), serving.cache_rows(c, s, "hnd"))


# --------------------------------------------------------------------------------------
# per-sequence profiles
# --------------------------------------------------------------------------------------

P_COS, P_SIN, _ = serving.profile_tables([RopeConfig(16), RopeConfig(16, base=500.0)], 10)  # [2, 10, 8]


def _profiles(q, k, profile, positions):
    return serving.apply_rotary_profiles(q, k, P_COS, P_SIN, profile, positions=positions)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["position past the profile", "negative position", "profile past the stack",
                                  "negative profile", "float profile"])
def test_profiles_compiled_refuse_as_eager(case, mode):
    """Compiled, a position past ``n`` read the next profile's rows and a negative one the previous
    profile's (no check at all); a profile past ``P`` was refused as a flat row past ``P*n``."""
    prof, pos = torch.tensor([0, 1]), torch.tensor([0, 1, 2])
    if case == "position past the profile":
        prof, pos = torch.tensor([0, 0]), torch.tensor([0, 1, 10])
    elif case == "negative position":
        prof, pos = torch.tensor([1, 1]), torch.tensor([0, -1, 2])
    elif case == "profile past the stack":
        prof = torch.tensor([0, 2])
    elif case == "negative profile":
        prof = torch.tensor([-1, 0])
    else:
        prof = prof.float()
    _same_refusal(_profiles, lambda: [torch.randn(2, 3, 2, 16), torch.randn(2, 3, 1, 16), prof, pos], mode)


@pytest.mark.parametrize("mode", MODES)
def test_profiles_compiled_have_the_eager_bits(mode):
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 3, 2, 16, generator=g), torch.randn(2, 3, 1, 16, generator=g)
    prof, pos = torch.tensor([1, 0]), torch.tensor([7, 8, 9])
    want = _profiles(q, k, prof, pos)
    got = _compile(_profiles, mode)(q, k, prof, pos)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    rows = _compile(lambda p, f: serving.profile_positions(p, f, 2, 10), mode)
    assert rows(torch.tensor([3, 9]), torch.tensor([1, 0])).tolist() == [13, 9]


def test_profile_positions_refuses_counts_that_are_not_ints():
    with pytest.raises(RopeError, match="expected P an int >= 1"):  # (was a TypeError)
        serving.profile_positions(torch.arange(3), torch.tensor([0, 1, 0]), "2", 10)
    with pytest.raises(RopeError, match="expected n an int >= 1"):
        serving.profile_positions(torch.arange(3), torch.tensor([0, 1, 0]), 2, 10.5)
