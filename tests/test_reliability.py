"""Reliability: bad input -> RopeError (never a crash or garbage), NaN/inf stay local,
huge positions and 64-bit offsets, meta-device/to_empty init, caches under threads.

Complements tests/test_errors.py and tests/test_module.py (not repeated here).
"""

from __future__ import annotations

import copy
import os
import pickle
import threading

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, RotaryEmbedding, apply_rotary, apply_rotary_qk, cos_sin
from ropekit.tables import TableCache

from _oracle import rope_token

FAST = [b for b in ropekit.backends.available() if b not in ("reference",)]
META = torch.device("meta")
CFG = RopeConfig(16)
C4, S4 = cos_sin(CFG, torch.arange(4))
X = torch.randn(2, 4, 3, 16)
XT = X.reshape(8, 3, 16)


def _rope():
    return RotaryEmbedding(CFG)


BAD = [
    # (id, call, message fragment)
    ("apply_meta_x_cpu_tables", lambda: apply_rotary(X.to(META), C4[:, None], S4[:, None]), r"cos on x's device meta"),
    ("apply_cpu_x_meta_tables", lambda: apply_rotary(X, C4[:, None].to(META), S4[:, None].to(META)), r"cos on x's device cpu"),
    ("apply_meta_out", lambda: apply_rotary(X, C4[:, None], S4[:, None], out=torch.empty_like(X, device=META)), r"out of x's"),
    ("apply_x_list", lambda: apply_rotary([1.0], C4, S4), r"x a torch.Tensor"),
    ("apply_x_scalar", lambda: apply_rotary(torch.tensor(1.0), C4, S4), r"x \[\.\.\., d\]"),
    ("apply_table_scalar", lambda: apply_rotary(X, torch.tensor(1.0), torch.tensor(0.0)), r"r/2 >= 1"),
    ("apply_bool_x", lambda: apply_rotary(X.bool(), C4[:, None], S4[:, None]), r"real floating dtype"),
    ("apply_backend_none", lambda: apply_rotary(X, C4[:, None], S4[:, None], backend=None), r"backend in"),
    ("apply_layout_int", lambda: apply_rotary(X, C4[:, None], S4[:, None], layout=1), r"layout in"),
    # overlapping windows with non-zero strides (unfold/as_strided): torch's own
    # has_internal_overlap says "too hard" for these; writing them in place would be garbage
    ("inplace_unfold_window", lambda: apply_rotary(torch.randn(64).unfold(0, 16, 1)[:24].view(2, 4, 3, 16), C4[:, None], S4[:, None], inplace=True), r"overlapping memory"),
    ("out_unfold_window", lambda: apply_rotary(X, C4[:, None], S4[:, None], out=torch.randn(64).unfold(0, 16, 1)[:24].view(2, 4, 3, 16)), r"overlapping memory"),
    ("qk_meta_k", lambda: apply_rotary_qk(X, X.to(META), C4[:, None], S4[:, None]), r"device"),
    ("cos_sin_cfg_none", lambda: cos_sin(None, torch.arange(3)), r"cfg a ropekit.RopeConfig"),
    ("cos_sin_position_2_62", lambda: cos_sin(CFG, torch.tensor([0, 2**62])), r"<= 2\*\*53.*4611686018427387904"),
    ("angles_cfg_dict", lambda: ropekit.angles({"head_dim": 16}, torch.arange(3)), r"cfg a ropekit.RopeConfig"),
    ("to_full_width_list", lambda: ropekit.to_full_width([1.0, 2.0]), r"cos/sin table tensor"),
    ("from_full_width_scalar", lambda: ropekit.from_full_width(torch.tensor(1.0)), r"cos/sin table tensor"),
    ("module_q_list", lambda: _rope()([1.0], X), r"q a real floating tensor"),
    ("module_positions_2_60", lambda: _rope()(X, X, positions=torch.tensor([0, 1, 2, 2**60])), r"<= 2\*\*53"),
    ("module_offset_int_2_60", lambda: _rope()(X, X, offsets=2**60), r"<= 2\*\*53"),
    ("module_meta_cu_cpu_q", lambda: _rope()(XT, XT, cu_seqlens=torch.tensor([0, 4, 8], device=META), format="thd"), r"cu_seqlens on the meta device"),
    ("module_meta_positions", lambda: _rope()(X, X, positions=torch.arange(4, device=META)), r"positions on the meta device"),
    ("module_cu_short", lambda: _rope()(XT, XT, cu_seqlens=torch.tensor([0, 4, 7]), format="thd"), r"cu_seqlens\[-1\] == t == 8"),
    ("module_cu_long", lambda: _rope()(XT, XT, cu_seqlens=torch.tensor([0, 4, 9]), format="thd"), r"cu_seqlens\[-1\] == 9"),
    ("module_cu_not_from_zero", lambda: _rope()(XT, XT, cu_seqlens=torch.tensor([1, 4, 8]), format="thd"), r"starting at 0"),
    ("module_cu_2d", lambda: _rope()(XT, XT, cu_seqlens=torch.tensor([[0, 8]]), format="thd"), r"1-D integer"),
    ("module_cu_with_bshd", lambda: _rope()(X, X, cu_seqlens=torch.tensor([0, 4])), r"cu_seqlens only with format='thd'"),
    ("module_seq_len_str", lambda: _rope()(X, X, seq_len="4"), r"seq_len an int >= 0"),
    ("module_max_position_neg", lambda: RotaryEmbedding(CFG, max_position=-1), r"max_position an int in \[0, "),
    ("module_table_dtype_int", lambda: RotaryEmbedding(CFG, table_dtype=torch.int32)(X, X), r"dtype one of"),
    ("module_head_dim_too_small", lambda: _rope()(torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8)), r"4"),
]


@pytest.mark.parametrize("call,match", [pytest.param(c, m, id=i) for i, c, m in BAD])
def test_bad_input_is_ropeerror(call, match):
    with pytest.raises(RopeError, match=match) as e:
        call()
    assert "expected" in str(e.value) and "Fix:" in str(e.value)


@pytest.mark.parametrize("backend", ropekit.backends.available())  # the dense reference too
@pytest.mark.parametrize("layout", ropekit.LAYOUTS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_stays_in_its_pair(backend, layout, bad):
    """A NaN/inf in x reaches only the two outputs of its pair (or itself past r)."""
    d, r = 12, 8
    cfg = RopeConfig(d, rotary_dim=r, layout=layout)
    shape = (2, 3, 2, d) if backend != "triton" else (1, 2, 2, d)
    cos, sin = cos_sin(cfg, torch.arange(shape[1]) + 1)  # position >= 1: sin != 0 in every pair
    for lane in (1, r // 2 + 1, r + 2):  # lane 1 and r/2+1: a pair in "half"; r+2: pass-through
        x = torch.randn(*shape)
        x[-1, -1, 0, lane] = bad
        y = apply_rotary(x, cos[:, None], sin[:, None], layout=layout, backend=backend)
        if lane >= r:
            partners = {lane}
        elif layout == "half":
            partners = {lane % (r // 2), lane % (r // 2) + r // 2}
        else:
            partners = {lane - lane % 2, lane - lane % 2 + 1}
        want = torch.zeros(shape, dtype=torch.bool)
        for p in partners:
            want[-1, -1, 0, p] = True
        assert torch.equal(~torch.isfinite(y), want), (lane, (~torch.isfinite(y)).nonzero().tolist())


def test_nonfinite_table_row_stays_in_its_token():
    cos, sin = cos_sin(CFG, torch.arange(4))
    cos[2, 3] = float("nan")
    y = apply_rotary(X, cos[:, None], sin[:, None], backend="eager")
    bad = ~torch.isfinite(y)
    assert bad[:, 2, :, 3].all() and bad[:, 2, :, 3 + 8].all() and int(bad.sum()) == 2 * 2 * 3


@pytest.mark.parametrize("backend", [b for b in FAST if b != "triton"])
def test_positions_past_2_31_exact(backend):
    """Position values past int32 (a KV cache past 2^31 tokens): exact float64 angles,
    and a sparse huge position never builds a 2^40-row table."""
    cfg = RopeConfig(8, layout="interleaved")
    rope = RotaryEmbedding(cfg, backend=backend)
    x = torch.randn(2, 3, 1, 8, dtype=torch.float64)
    for off in (2**31 - 1, 2**31 + 5, 2**40 + 3):
        y, _ = rope(x, x, offsets=torch.tensor([off, 7]))
        for bi, base in enumerate((off, 7)):
            for si in range(3):
                want = rope_token(x[bi, si, 0], base + si, 8, "interleaved")
                # float32 tables: cos/sin rounded once (|err| <= 6e-8), angles exact in float64
                torch.testing.assert_close(y[bi, si, 0], want, atol=5e-7, rtol=5e-7)
        assert rope.cos_cached is None or rope.cos_cached.shape[0] <= 1 << 21


def test_dense_positions_still_use_the_table():
    rope = RotaryEmbedding(CFG)
    rope(X, X, offsets=1000)
    assert rope.cos_cached.shape[0] == 1024  # next power of two above 1003


@pytest.mark.skipif(not os.environ.get("ROPEKIT_BIG_TESTS"), reason="allocates ~4.3 GB: set ROPEKIT_BIG_TESTS=1")
def test_more_than_2_31_elements_in_place():
    """x with 2^31 + 2^20 bf16 elements (4.3 GB), rotated in place by the default backend;
    rows past element 2^31 are checked against the per-pair oracle (32-bit offsets would
    wrap around and write the start of the tensor instead)."""
    d, h, s = 64, 8, 1024
    b = (2**31 + 2**17) // (s * h * d) + 1  # 4097 -> 2^31 + 2^19 elements
    x = torch.empty(b, s, h, d, dtype=torch.bfloat16)
    assert x.numel() > 2**31 and (b - 1) * s * h * d >= 2**31  # the last slab lies past 2^31
    g = torch.Generator().manual_seed(0)
    probe = [0, b // 2, b - 1]
    for bi in range(b):  # fill slab by slab (randn of the whole would need fp32 temporaries)
        if bi in probe:
            x[bi].normal_(generator=g)
        else:
            x[bi].fill_(0.5)
    keep = {bi: x[bi].clone() for bi in probe}
    cfg = RopeConfig(d)
    cos, sin = cos_sin(cfg, torch.arange(s))  # [s, r/2]
    y = apply_rotary(x, cos[:, None], sin[:, None], inplace=True)
    assert y is x
    for bi in probe:
        for si in (0, 1, s - 1):
            for hi in (0, h - 1):
                want = rope_token(keep[bi][si, hi].float(), si, d, "half")
                torch.testing.assert_close(x[bi, si, hi].double(), want, atol=2e-2, rtol=1.6e-2)
    # a filler slab just before the last one was rotated too (not skipped, not written twice)
    want = rope_token(torch.full((d,), 0.5), s - 1, d, "half")
    torch.testing.assert_close(x[b - 2, s - 1, h - 1].double(), want, atol=2e-2, rtol=1.6e-2)


def test_meta_init_then_to_empty_and_rope_init():
    """The FSDP/meta flow: build on meta, materialise with to_empty (garbage buffers), rope_init."""
    cfg = RopeConfig(32, rotary_dim=16, layout="interleaved")
    with torch.device("meta"):
        m = torch.nn.Sequential(torch.nn.Linear(4, 4), RotaryEmbedding(cfg, max_position=64))
    assert m[1].cos_cached is None or m[1].cos_cached.device.type == "meta"
    m.to_empty(device="cpu")
    m[1].rope_init()
    want = cos_sin(cfg, torch.arange(64))
    assert torch.equal(m[1].cos_cached, want[0]) and torch.equal(m[1].sin_cached, want[1])
    assert list(m.state_dict()) == ["0.weight", "0.bias"]  # tables never persisted


def test_to_dtype_keeps_angles_and_deepcopy_independent():
    cfg = RopeConfig(16)
    rope = RotaryEmbedding(cfg, max_position=16)
    q = torch.randn(1, 16, 2, 16)
    want = rope(q, q)[0]
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        rope.to(dt)
        got = rope(q.to(dt), q.to(dt))[0]
        # tables stay float32 for half-precision q/k whatever .to() asked (the result equals the
        # float32-table rotation rounded once to dt, not a rotation by rounded angles); float64
        # q/k get float64 tables (float64 stays float64)
        tdt = torch.float64 if dt == torch.float64 else torch.float32
        assert rope.cos_cached.dtype == tdt
        ref = apply_rotary(q.to(dt), *(t[:16, None] for t in cos_sin(cfg, torch.arange(16), dtype=tdt)), backend="eager")
        # float64: to float64 rounding (eager's addcmul_ fuses a multiply-add, the kernel does not)
        torch.testing.assert_close(got, ref, atol=1e-15, rtol=0) if dt == torch.float64 else torch.testing.assert_close(got, ref)
    rope.to(torch.float32)
    twin = copy.deepcopy(rope)
    twin(q, q, offsets=5000)  # grows only the copy's cache
    assert rope.cos_cached.shape[0] == 16 and twin.cos_cached.shape[0] > 5000
    torch.testing.assert_close(pickle.loads(pickle.dumps(twin))(q, q)[0], want, atol=0, rtol=0)


def test_table_cache_threads():
    """TableCache grown from 8 threads at once (each asks for a different length)."""
    cfg = RopeConfig(8)
    cache = TableCache(cfg)
    got, errors = {}, []
    barrier = threading.Barrier(8)

    def work(i):
        try:
            barrier.wait()
            for n in (i * 50 + 1, i * 300 + 7, 3):
                got[(i, n)] = cache.get(n, device=torch.device("cpu"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    full = cos_sin(cfg, torch.arange(4096))
    for (i, n), (c, s) in got.items():
        assert c.shape[0] >= n and torch.equal(c, full[0][: c.shape[0]]) and torch.equal(s, full[1][: s.shape[0]])


def test_module_threads_mixed_dtypes_and_lengths():
    """One module used from threads with float32 and float64 inputs and growing offsets."""
    rope = RotaryEmbedding(RopeConfig(16))
    fresh = RotaryEmbedding(RopeConfig(16))
    x = torch.randn(1, 3, 1, 16)
    out, errors = {}, []

    def work(i):
        try:
            xi = x.double() if i % 2 else x
            out[i] = (xi, rope(xi, xi, offsets=i * 97)[0])
        except Exception as e:  # pragma: no cover
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    for i, (xi, y) in out.items():
        assert torch.equal(y, fresh(xi, xi, offsets=i * 97)[0])
