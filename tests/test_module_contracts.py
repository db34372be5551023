"""RotaryEmbedding / TableCache / full-width table contracts, checked against a first-principles
float64 oracle (angle = position · inv_freq, scaled frequencies by the formulas documented in
``ropekit.scaling``; pairs (i, i + r/2) for ``"half"``).

- A table cached under ``cfg.table_key(seq_len)`` holds the frequencies of that key: for
  length-dependent scaling (dynamic NTK, LongRoPE) the key of ``seq_len=None`` is "within the
  original context", whatever the table's length (``rope_init``, ``tables(n)``, ``TableCache``).
- A dtype round trip of the module (``.half().float()``, ...) rebuilds the tables from the
  float64 angles instead of keeping values rounded through the narrow dtype.
- Per-sample ``[b]`` offsets with ``s == 1`` (decode) are ``[b, 1]`` positions in every path:
  forward with positions past the table limit, ``cos_sin_for`` in every format.
- ``from_full_width`` inverts ``to_full_width`` for tables holding NaN, and takes meta tensors.
"""

from __future__ import annotations

import math

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, RotaryEmbedding
from ropekit.scaling import DynamicNTK, LongRoPE
from ropekit.tables import TableCache

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------
# oracle
# ------------------------------------------------------------------------------------------


def oracle_inv_freq(cfg: RopeConfig, seq_len) -> torch.Tensor:
    """θ_i (float64 [r/2]) from the documented formulas, with Python floats."""
    r, base, sc = cfg.rotary_dim, cfg.base, cfg.scaling
    plain = [base ** (-2.0 * i / r) for i in range(r // 2)]
    if sc is None:
        return torch.tensor(plain, dtype=torch.float64)
    if isinstance(sc, DynamicNTK):
        # L <= M: θ_i;  L > M: base' = base · (factor·L/M − (factor − 1))^(r/(r-2)),  θ_i' = base'^(-2i/r)
        if seq_len is None or seq_len <= sc.max_position:
            return torch.tensor(plain, dtype=torch.float64)
        nb = base * (sc.factor * seq_len / sc.max_position - (sc.factor - 1)) ** (r / (r - 2))
        return torch.tensor([nb ** (-2.0 * i / r) for i in range(r // 2)], dtype=torch.float64)
    if isinstance(sc, LongRoPE):
        # θ_i / ext_i, ext = long_factor when L > original_max_position, else short_factor
        ext = sc.long_factor if (seq_len is not None and seq_len > sc.original_max_position) else sc.short_factor
        return torch.tensor([t / e for t, e in zip(plain, ext)], dtype=torch.float64)
    raise AssertionError(sc)


def oracle_factor(cfg: RopeConfig) -> float:
    sc = cfg.scaling
    if isinstance(sc, LongRoPE) and sc.factor is not None and sc.factor > 1:
        return math.sqrt(1 + math.log(sc.factor) / math.log(sc.original_max_position))
    return 1.0


def oracle_cos_sin(cfg: RopeConfig, pos: torch.Tensor, seq_len):
    ang = pos.to(torch.float64)[..., None] * oracle_inv_freq(cfg, seq_len)
    f = oracle_factor(cfg)
    return torch.cos(ang) * f, torch.sin(ang) * f


def oracle_rope(x: torch.Tensor, pos: torch.Tensor, cfg: RopeConfig, seq_len=None) -> torch.Tensor:
    """``x [b, s, h, d]`` rotated at positions ``[b, s]`` (or ``[s]``), "half" pairs, float64."""
    x = x.double()
    b, s = x.shape[:2]
    pos = pos.expand(b, s) if pos.dim() == 1 else pos
    c, sn = oracle_cos_sin(cfg, pos, seq_len)
    c, sn = c[:, :, None], sn[:, :, None]  # [b, s, 1, r/2]
    h = cfg.rotary_dim // 2
    x1, x2 = x[..., :h], x[..., h: 2 * h]
    y = x.clone()
    y[..., :h] = x1 * c - x2 * sn
    y[..., h: 2 * h] = x2 * c + x1 * sn
    return y


def to_fmt(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """bshd -> fmt (a contiguous copy)."""
    if fmt == "bhsd":
        return x.transpose(1, 2).contiguous()
    if fmt == "sbhd":
        return x.transpose(0, 1).contiguous()
    return x


def from_fmt(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """fmt -> bshd."""
    if fmt == "bhsd":
        return x.transpose(1, 2)
    if fmt == "sbhd":
        return x.transpose(0, 1)
    return x


# ------------------------------------------------------------------------------------------
# 1. tables under the key of seq_len=None hold the seq_len=None frequencies
# ------------------------------------------------------------------------------------------

LENGTH_DEPENDENT = {
    "dynamic": RopeConfig(head_dim=8, scaling=DynamicNTK(factor=4.0, max_position=64)),
    "longrope": RopeConfig(
        head_dim=8, scaling=LongRoPE([1.0, 1.1, 1.2, 1.3], [2.0, 3.0, 4.0, 5.0], original_max_position=64, factor=2.0)
    ),
}


@pytest.mark.parametrize("name", sorted(LENGTH_DEPENDENT))
def test_short_input_same_bits_fresh_after_rope_init_and_after_long_table(name):
    cfg = LENGTH_DEPENDENT[name]
    torch.manual_seed(0)
    q, k = torch.randn(2, 10, 2, 8), torch.randn(2, 10, 1, 8)
    ql, kl = torch.randn(1, 100, 2, 8), torch.randn(1, 100, 1, 8)

    fresh = RotaryEmbedding(cfg, max_position=128)(q, k)

    after_init = RotaryEmbedding(cfg, max_position=128)
    after_init.rope_init("cpu")  # builds tables(max_position) under the key of seq_len=None

    with torch.device("meta"):
        meta = RotaryEmbedding(cfg, max_position=128)
    meta.rope_init("cpu")

    long_table = RotaryEmbedding(cfg)
    long_table.tables(100, device=CPU)  # a table past the original context, key of seq_len=None

    long_call = RotaryEmbedding(cfg, max_position=128)
    yl = long_call(ql, kl)  # seq_len 100 > 64: scaled frequencies
    want_long = oracle_rope(ql, torch.arange(100), cfg, seq_len=100)
    assert (yl[0].double() - want_long).abs().max() < 1e-5

    want = oracle_rope(q, torch.arange(10), cfg, seq_len=10)
    assert (fresh[0].double() - want).abs().max() < 1e-5
    for m in (after_init, meta, long_table, long_call):
        y = m(q, k)
        assert torch.equal(y[0], fresh[0]) and torch.equal(y[1], fresh[1])
        # and with an int offset that stays within the original context
        assert torch.equal(m(q, k, offsets=5)[0], RotaryEmbedding(cfg)(q, k, offsets=5)[0])


@pytest.mark.parametrize("name", sorted(LENGTH_DEPENDENT))
def test_cached_table_frequencies_match_their_key(name):
    cfg = LENGTH_DEPENDENT[name]
    want_c, want_s = oracle_cos_sin(cfg, torch.arange(128), None)  # seq_len=None: within the original context
    assert cfg.table_key(None) == cfg.table_key(10)

    m = RotaryEmbedding(cfg)
    c, s = m.tables(100, device=CPU)  # 128 rows, key table_key(None)
    assert c.shape[0] >= 100
    assert (c.double() - want_c[: c.shape[0]]).abs().max() < 1e-7
    assert (s.double() - want_s[: s.shape[0]]).abs().max() < 1e-7

    small = TableCache(cfg).get(10, device=CPU)
    big_first = TableCache(cfg)
    big = big_first.get(100, device=CPU)
    again = big_first.get(10, device=CPU)
    assert again[0] is big[0]  # one key, one table
    assert torch.equal(small[0], big[0][: small[0].shape[0]]) and torch.equal(small[1], big[1][: small[1].shape[0]])
    assert (big[0].double() - want_c[: big[0].shape[0]]).abs().max() < 1e-7
    assert (big[1].double() - want_s[: big[1].shape[0]]).abs().max() < 1e-7
    # a key past the original context holds its own (scaled) frequencies
    lc, _ = TableCache(cfg).get(100, device=CPU, seq_len=100)
    assert (lc.double() - oracle_cos_sin(cfg, torch.arange(lc.shape[0]), 100)[0]).abs().max() < 1e-7


@pytest.mark.parametrize("name", sorted(LENGTH_DEPENDENT))
def test_transformers_angles_rope_init_same_bits_as_fresh(name):
    cfg = LENGTH_DEPENDENT[name]
    torch.manual_seed(1)
    q, k = torch.randn(1, 10, 2, 8), torch.randn(1, 10, 1, 8)
    fresh = RotaryEmbedding(cfg, max_position=128, angles="transformers")(q, k)[0]
    m = RotaryEmbedding(cfg, max_position=128, angles="transformers")
    m.rope_init("cpu")
    assert torch.equal(m(q, k)[0], fresh)


def test_phi35_preset_meta_init_then_rope_init_short_prompt():
    cfg = ropekit.presets.get("phi-3.5-mini")  # LongRoPE, original context 4096
    torch.manual_seed(2)
    q, k = torch.randn(1, 10, 2, 96), torch.randn(1, 10, 1, 96)
    with torch.device("meta"):
        m = RotaryEmbedding(cfg, max_position=8192)  # sized past the original context
    m.rope_init("cpu")
    y = m(q, k)[0]
    assert torch.equal(y, RotaryEmbedding(cfg, max_position=8192)(q, k)[0])
    assert (y.double() - oracle_rope(q, torch.arange(10), cfg, seq_len=10)).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------
# 2. dtype round trips rebuild the tables from float64 angles
# ------------------------------------------------------------------------------------------

CONVERSIONS = {
    "half": lambda m: m.half(),
    "bfloat16": lambda m: m.bfloat16(),
    "to(float16)": lambda m: m.to(torch.float16),
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
    "double": lambda m: m.double(),
}


def test_dtype_round_trips_rebuild_tables():
    cfg = RopeConfig(head_dim=64)
    torch.manual_seed(0)
    q, k = torch.randn(2, 8, 2, 64), torch.randn(2, 8, 1, 64)
    offs = torch.tensor([100, 3])
    ref = RotaryEmbedding(cfg)(q, k, offsets=100)
    ref_t = RotaryEmbedding(cfg)(q, k, offsets=offs)
    assert (ref[0].double() - oracle_rope(q, torch.arange(8) + 100, cfg)).abs().max() < 1e-5
    bad = []
    for name, conv in CONVERSIONS.items():
        m = RotaryEmbedding(cfg)
        m(q, k, offsets=100)  # float32 tables
        m(q, k, offsets=offs)  # and the [b]-offsets fast path recorded on them
        conv(m).float()  # e.g. model.half() then model.float()
        y = m(q, k, offsets=100)
        yt = m(q, k, offsets=offs)
        n = m.cos_cached.shape[0]
        want_c, want_s = oracle_cos_sin(cfg, torch.arange(n), None)
        err = max((m.cos_cached.double() - want_c).abs().max().item(), (m.sin_cached.double() - want_s).abs().max().item())
        ok = (torch.equal(y[0], ref[0]) and torch.equal(y[1], ref[1]) and torch.equal(yt[0], ref_t[0])
              and m.cos_cached.dtype == torch.float32 and err < 1e-7)
        if not ok:
            bad.append((name, err))
    assert not bad, bad


def test_float64_tables_round_trip_through_half():
    cfg = RopeConfig(head_dim=16)
    torch.manual_seed(0)
    q, k = torch.randn(1, 5, 2, 16, dtype=torch.float64), torch.randn(1, 5, 1, 16, dtype=torch.float64)
    ref = RotaryEmbedding(cfg)(q, k, offsets=1000)[0]
    m = RotaryEmbedding(cfg)
    m(q, k, offsets=1000)  # float64 tables
    m.half().double()
    y = m(q, k, offsets=1000)[0]
    assert torch.equal(y, ref)
    assert (y - oracle_rope(q, torch.arange(5) + 1000, cfg)).abs().max() < 1e-12


# ------------------------------------------------------------------------------------------
# 3/4. per-sample [b] offsets with s == 1 are [b, 1] positions
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("big", [False, True], ids=["small", "past_2**20"])
@pytest.mark.parametrize("fmt", ["bshd", "bhsd", "sbhd"])
def test_per_sample_offsets_decode_every_format(fmt, big):
    cfg = RopeConfig(head_dim=16)
    offs = torch.tensor([5, 2**20 + 7, 40]) if big else torch.tensor([5, 17, 40])
    b = offs.shape[0]
    torch.manual_seed(3)
    for s in (1, 3):
        qb = torch.randn(b, s, 4, 16, dtype=torch.float64)
        kb = torch.randn(b, s, 1, 16, dtype=torch.float64)
        q, k = to_fmt(qb, fmt), to_fmt(kb, fmt)
        pos = offs[:, None] + torch.arange(s)  # [b, s]
        # the oracle's θ_i (Python pow) and ropekit's may differ by an ulp: an angle error ~ m·2^-53
        tol = 1e-12 + int(pos.max()) * 1e-15
        m = RotaryEmbedding(cfg)

        qy, ky = m(q, k, offsets=offs, format=fmt)
        assert (from_fmt(qy, fmt) - oracle_rope(qb, pos, cfg)).abs().max() < tol, (s, "q")
        assert (from_fmt(ky, fmt) - oracle_rope(kb, pos, cfg)).abs().max() < tol, (s, "k")
        qp, kp = RotaryEmbedding(cfg)(q, k, positions=pos, format=fmt)
        assert torch.equal(qy, qp) and torch.equal(ky, kp), s
        assert torch.equal(m.rotate(q, offsets=offs, format=fmt), qy), s

        c, sn = m.cos_sin_for(q, offsets=offs, format=fmt)
        target = tuple(q.shape[:-1]) + (8,)
        assert torch.broadcast_shapes(c.shape, target) == target, (s, tuple(c.shape), target)
        assert torch.broadcast_shapes(sn.shape, target) == target, (s, tuple(sn.shape), target)
        want_c, want_s = oracle_cos_sin(cfg, pos, None)  # [b, s, r/2]
        got_c = from_fmt(c.expand(target), fmt)[:, :, 0]  # [b, s, r/2]
        got_s = from_fmt(sn.expand(target), fmt)[:, :, 0]
        assert (got_c - want_c).abs().max() < tol and (got_s - want_s).abs().max() < tol, s
        # the tables rotate q as the module's own forward does
        y = ropekit.apply_rotary(q, c, sn, layout="half", backend="reference")
        assert (y - qy).abs().max() < 1e-12, s


def test_decode_offsets_past_table_limit_float32_matches_per_sample():
    cfg = RopeConfig(head_dim=16)
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 1, 16)
    offs = torch.tensor([5, 2**20 + 7])
    y = RotaryEmbedding(cfg)(q, k, offsets=offs)
    per = [RotaryEmbedding(cfg)(q[i: i + 1], k[i: i + 1], offsets=int(offs[i])) for i in range(2)]
    assert torch.equal(y[0], torch.cat([p[0] for p in per])) and torch.equal(y[1], torch.cat([p[1] for p in per]))
    assert (y[0].double() - oracle_rope(q, offs[:, None], cfg)).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------
# 5. from_full_width: inverse of to_full_width with NaN, meta tensors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_from_full_width_inverts_tables_with_nan(layout):
    c, _ = ropekit.cos_sin(RopeConfig(head_dim=8), torch.arange(3))
    c[1, 2] = float("nan")
    c[0, 1] = float("inf")
    back = ropekit.from_full_width(ropekit.to_full_width(c, layout), layout)
    assert torch.equal(back.isnan(), c.isnan())
    assert torch.equal(back.nan_to_num(7.0), c.nan_to_num(7.0))
    # a NaN in one copy only is still two different copies
    full = ropekit.to_full_width(c.nan_to_num(0.5), layout)
    full[0, 0] = float("nan")
    with pytest.raises(RopeError, match="copies that differ"):
        ropekit.from_full_width(full, layout)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_from_full_width_meta(layout):
    t = ropekit.to_full_width(torch.ones(2, 4, device="meta"), layout)
    back = ropekit.from_full_width(t, layout)
    assert back.shape == (2, 4) and back.device.type == "meta"
    assert ropekit.from_full_width(torch.ones(2, 8, device="meta"), layout, check=False).shape == (2, 4)


def test_from_full_width_check_flag_validated():
    with pytest.raises(RopeError):
        ropekit.from_full_width(torch.ones(4), check="no")  # a valid table: only the flag is wrong


@pytest.mark.parametrize("call", [dict(), dict(offsets=torch.tensor([3, 700])), dict(positions=torch.tensor([[1, 2, 3], [9, 8, 7]]))],
                         ids=["default", "offsets", "positions"])
@pytest.mark.parametrize("module", ["rotary", "multi_axis"])
def test_float64_k_beside_a_float32_q_keeps_float64_tables(call, module):
    """A float64 ``k`` beside a float32 ``q``: the tables follow the wider of the two, so each
    output is what the module gives that tensor alone (both of its dtype). Before, the tables
    followed q only: k was rotated in float64 with float32 tables (errors ~1e-8, not 1e-16)."""
    torch.manual_seed(0)
    q = torch.randn(2, 3, 4, 16)
    k = torch.randn(2, 3, 2, 16, dtype=torch.float64)
    if module == "rotary":
        m = RotaryEmbedding(RopeConfig(16))
        run = lambda a, b: m(a, b, **call)  # noqa: E731
    else:
        m = ropekit.MultiAxisRotaryEmbedding(RopeConfig(16), sections=(4, 2, 2))
        pos = torch.randint(0, 900, (2, 3, 3), generator=torch.Generator().manual_seed(1))
        run = lambda a, b: m(a, b, pos)  # noqa: E731
    qo, ko = run(q, k)
    assert qo.dtype == torch.float32 and ko.dtype == torch.float64
    assert torch.equal(ko, run(k, k)[1])
    assert torch.equal(qo, run(q, q)[0])
