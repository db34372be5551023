"""cos/sin tables: exact float64 angles rounded once; half/full width; attention factor."""

from __future__ import annotations

import math

import pytest
import torch

from ropekit import RopeConfig, angles, cos_sin, from_full_width, to_full_width
from ropekit.scaling import Linear

from _oracle import inv_freq64


def test_inv_freq_matches_roformer_formula():
    for r, base in ((128, 10000.0), (64, 500000.0), (40, 1e6)):
        cfg = RopeConfig(r + 8, base=base, rotary_dim=r)
        got = cfg.inv_freq()
        assert got.dtype == torch.float64 and got.shape == (r // 2,)
        torch.testing.assert_close(got, inv_freq64(r, base), atol=0, rtol=4e-16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_tables_rounded_once_at_large_positions(dtype):
    cfg = RopeConfig(128, base=500000.0)
    pos = torch.tensor([0, 1, 2**10, 2**16, 2**20 + 3, 2**24 - 1, 2**24])
    cos, sin = cos_sin(cfg, pos, dtype=dtype)
    # independent oracle: Python floats (double) per element
    inv = [500000.0 ** (-2.0 * i / 128) for i in range(64)]
    want_c = torch.tensor([[math.cos(p * f) for f in inv] for p in pos.tolist()], dtype=torch.float64)
    want_s = torch.tensor([[math.sin(p * f) for f in inv] for p in pos.tolist()], dtype=torch.float64)
    # correctly rounded: identical to rounding the float64 value once
    assert torch.equal(cos, want_c.to(dtype)) or (cos.double() - want_c).abs().max() <= 2e-9 + 0.5 * torch.finfo(dtype).eps
    if dtype == torch.float32:
        assert (cos.double() - want_c).abs().max() < 1e-6 and (sin.double() - want_s).abs().max() < 1e-6


def test_float32_angle_baseline_is_worse():
    # the failure mode exact angles avoid: angles formed in float32 (as transformers does)
    cfg = RopeConfig(128, base=500000.0)
    p = 2**24 - 1
    exact, _ = cos_sin(cfg, torch.tensor([p]), dtype=torch.float64)
    f32 = torch.cos(torch.tensor(float(p)) * cfg.inv_freq().float())
    assert (f32.double() - exact).abs().max() > 1e-3  # float32 angles lose ~1 rad·2^-24·p
    ours, _ = cos_sin(cfg, torch.tensor([p]))
    assert (ours.double() - exact).abs().max() < 1e-7


def test_shapes_inputs_and_device():
    cfg = RopeConfig(16, rotary_dim=8)
    for pos in (torch.arange(5), list(range(5)), range(5)):
        c, s = cos_sin(cfg, pos)
        assert c.shape == (5, 4) and s.dtype == torch.float32
    c, s = cos_sin(cfg, 7)
    assert c.shape == (4,)
    c, s = cos_sin(cfg, torch.zeros(2, 3, dtype=torch.int32), device="cpu")
    assert c.shape == (2, 3, 4) and torch.equal(c, torch.ones(2, 3, 4)) and torch.equal(s, torch.zeros(2, 3, 4))
    a = angles(cfg, torch.tensor([3]))
    torch.testing.assert_close(a[0], 3 * inv_freq64(8), atol=0, rtol=1e-15)


def test_full_width_round_trip():
    c, _ = cos_sin(RopeConfig(16), torch.arange(3))
    for layout in ("half", "interleaved"):
        f = to_full_width(c, layout)
        assert f.shape == (3, 16)
        assert torch.equal(from_full_width(f, layout), c)
    assert torch.equal(to_full_width(c, "half")[:, 8:], c)
    assert torch.equal(to_full_width(c, "interleaved")[:, 1::2], c)


class _Scaled(Linear):
    """Linear with a made-up attention factor, to test the fold-in without other schemes."""

    rope_type = "_test_scaled"

    def attention_factor(self, cfg):
        return 1.25


def test_attention_factor_folded_and_opt_out():
    cfg = RopeConfig(16, scaling=_Scaled(2.0))
    assert cfg.attention_factor == 1.25
    c, s = cos_sin(cfg, torch.arange(4), dtype=torch.float64)
    c0, s0 = cos_sin(cfg, torch.arange(4), dtype=torch.float64, attention_scaling=False)
    torch.testing.assert_close(c, 1.25 * c0, atol=0, rtol=1e-15)
    # Linear: positions divided by the factor
    plain = RopeConfig(16)
    c2, _ = cos_sin(plain, torch.tensor([1]), dtype=torch.float64)
    torch.testing.assert_close(c0[2], c2[0], atol=1e-15, rtol=0)


def test_config_round_trip():
    cfg = RopeConfig(64, base=1e6, rotary_dim=32, layout="interleaved", scaling=Linear(4.0))
    assert RopeConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(base=2e6).base == 2e6
    assert hash(cfg) == hash(RopeConfig.from_dict(cfg.to_dict()))


def test_subclass_does_not_hijack_registry():
    from ropekit.scaling import SCHEMES, Scaling

    class MyLinear(Linear):
        pass

    assert SCHEMES["linear"] is Linear
    assert type(Scaling.from_dict({"rope_type": "linear", "factor": 2.0})) is Linear


def test_transformers_angles_mode():
    # bit parity mode: same values as ropekit.hf.transformers_cos_sin, and it really is float32 angles
    from ropekit.hf import transformers_cos_sin

    cfg = RopeConfig(128, base=500000.0)
    pos = torch.tensor([0, 5, 2**20 + 1])
    c, s = cos_sin(cfg, pos, angles="transformers")
    c2, s2 = transformers_cos_sin(cfg, pos)
    assert torch.equal(c, c2) and torch.equal(s, s2)
    want = torch.cos(pos.float()[:, None] * (1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))))
    assert torch.equal(c, want)
    exact, _ = cos_sin(cfg, pos)
    assert not torch.equal(c, exact)
    with pytest.raises(ValueError, match="angles"):
        cos_sin(cfg, pos, angles="float32")


@pytest.mark.parametrize("dt", [torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32,
                                torch.uint64])
def test_every_integer_position_dtype_gives_the_int64_bits(dt):
    # torch has no aminmax (the range check) for uint16/32/64: they raised NotImplementedError
    cfg = RopeConfig(16)
    pos = torch.tensor([0, 3, 5, 100], dtype=dt)
    got, want = cos_sin(cfg, pos), cos_sin(cfg, pos.to(torch.int64))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
