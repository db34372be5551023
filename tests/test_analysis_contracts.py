"""Contracts of ropekit.analysis: the scores follow the config's whole rotation (direction,
rotary offset), and every bad input is a RopeError in the house format (never another
exception type, never NaN or uninitialised memory).

Oracles are written from the definitions here (Python math / explicit float64 loops), and
cross-checked against :class:`ropekit.RotaryEmbedding`, which is how a model rotates."""

from __future__ import annotations

import math

import pytest
import torch

import ropekit
import ropekit.analysis as an
from ropekit import RopeConfig, RopeError
from ropekit.analysis import Model
from ropekit.analysis.checks import backend_checks, property_checks
from ropekit.scaling import YaRN

F64 = torch.float64


# ------------------------------------------------------------------------------ oracles
def theta(cfg: RopeConfig) -> list:
    """θ_i = base^(-2i/r) (RoFormer eq. 15) for an unscaled config, Python floats."""
    r = cfg.rotary_dim
    return [cfg.base ** (-2.0 * i / r) for i in range(r // 2)]


def pairs(cfg: RopeConfig) -> list:
    """Head indices (a, b) of each rotary pair: dims [o, o + r) rotate, by layout."""
    o, r = cfg.rotary_offset, cfg.rotary_dim
    if cfg.layout == "half":
        return [(o + i, o + i + r // 2) for i in range(r // 2)]
    return [(o + 2 * i, o + 2 * i + 1) for i in range(r // 2)]


def rotate_oracle(cfg: RopeConfig, x: list, m: int, th=None) -> list:
    """One head vector rotated at position m: pair (a, b) by direction·m·θ_i
    (a' = a cos - b sin, b' = a sin + b cos); the other dims unchanged. Python floats."""
    y = list(x)
    for (ia, ib), t in zip(pairs(cfg), th or theta(cfg)):
        ang = cfg.direction * m * t
        c, s = math.cos(ang), math.sin(ang)
        y[ia], y[ib] = x[ia] * c - x[ib] * s, x[ia] * s + x[ib] * c
    return y


def score_oracle(cfg: RopeConfig, q: torch.Tensor, k: torch.Tensor, dists, th=None) -> list:
    """mean over rows of <f(q, Δ), f(k, 0)> / sqrt(d)."""
    d = cfg.head_dim
    out = []
    for delta in dists:
        tot = 0.0
        for qi, ki in zip(q.tolist(), k.tolist()):
            qr, kr = rotate_oracle(cfg, qi, delta, th), rotate_oracle(cfg, ki, 0, th)
            tot += sum(a * b for a, b in zip(qr, kr))
        out.append(tot / q.shape[0] / math.sqrt(d))
    return out


def score_module(cfg: RopeConfig, q: torch.Tensor, k: torch.Tensor, dists) -> list:
    """The same logit from RotaryEmbedding(cfg).rotate in float64 (how a model rotates)."""
    rope = ropekit.RotaryEmbedding(cfg)
    out = []
    for delta in dists:
        qd = rope.rotate(q[None, None].clone(), positions=torch.tensor([delta]))[0, 0]  # [n, d]
        k0 = rope.rotate(k[None, None].clone(), positions=torch.tensor([0]))[0, 0]
        out.append(float((qd * k0).sum(-1).mean()) / math.sqrt(cfg.head_dim))
    return out


def assert_rope_error(fn, *words):
    """fn() raises exactly a RopeError in the house format, naming each of ``words``."""
    with pytest.raises(RopeError) as ei:
        fn()
    msg = str(ei.value)
    assert type(ei.value) is RopeError
    assert msg.startswith("expected ") and ", got " in msg and ". Fix: " in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


CONFIGS = [
    RopeConfig(64),
    RopeConfig(64, direction=-1),
    RopeConfig(64, rotary_dim=32, rotary_offset=32),
    RopeConfig(64, rotary_dim=32, rotary_offset=16, direction=-1),
    RopeConfig(64, rotary_dim=32, rotary_offset=8, layout="interleaved"),
    RopeConfig(64, rotary_dim=16, rotary_offset=40, layout="interleaved", direction=-1),
    RopeConfig(48, rotary_dim=32, rotary_offset=0, direction=-1),  # pass-through dims after the rotated ones
]
DISTS = [0, 1, 5, 100, 4097]


def _ids(cfg):
    return f"{cfg.layout}-d{cfg.head_dim}-r{cfg.rotary_dim}-o{cfg.rotary_offset}-dir{cfg.direction}"


# ------------------------------------------------------------------------------ bug 1: wrong numbers
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_attention_scores_follow_direction_and_offset(cfg):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, cfg.head_dim, generator=g, dtype=F64)
    k = torch.randn(3, cfg.head_dim, generator=g, dtype=F64)
    got = an.attention_scores(cfg, DISTS, q, k).tolist()
    want = score_oracle(cfg, q, k, DISTS)
    assert got == pytest.approx(want, abs=1e-12, rel=1e-10)
    assert got == pytest.approx(score_module(cfg, q, k, DISTS), abs=1e-12, rel=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS[1:4], ids=_ids)
def test_attention_scores_default_vectors_follow_config(cfg):
    """The default q = k samples: the seeded normal rows, scored by the oracle."""
    got = an.attention_scores(cfg, DISTS, samples=4, seed=7).tolist()
    q = torch.randn(4, cfg.head_dim, generator=torch.Generator().manual_seed(7), dtype=F64)
    assert got == pytest.approx(score_oracle(cfg, q, q, DISTS), abs=1e-12, rel=1e-10)


def test_attention_scores_direction_flips_the_sine():
    """q ≠ k: the direction-(-1) logit at Δ is the direction-(+1) logit at -Δ, i.e. a
    different number as soon as the sine term is nonzero."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 64, generator=g, dtype=F64)
    plus = an.attention_scores(RopeConfig(64), [1, 5, 100], q, k)
    minus = an.attention_scores(RopeConfig(64, direction=-1), [1, 5, 100], q, k)
    swapped = an.attention_scores(RopeConfig(64), [1, 5, 100], k, q)  # <R(-Δ)q, k> = <q, R(Δ)k>
    assert not torch.allclose(plus, minus)
    torch.testing.assert_close(minus, swapped, rtol=1e-12, atol=1e-12)


def test_attention_scores_scaled_config_matches_module():
    """A YaRN attention factor, an offset and direction -1 together, against the module."""
    cfg = RopeConfig(64, rotary_dim=32, rotary_offset=32, direction=-1,
                     scaling=YaRN(factor=4.0, original_max_position=256))
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 2, 64, generator=g, dtype=F64)
    got = an.attention_scores(cfg, DISTS, q, k).tolist()
    assert got == pytest.approx(score_module(cfg, q, k, DISTS), abs=1e-12, rel=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_relative_position_rotation_follows_config(cfg):
    """The rotation relative_position_error measures is the config's (direction, offset)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(cfg.head_dim, generator=g, dtype=F64)
    pos = torch.tensor([0, 3, 1000])
    got = an._rotate(cfg, x.expand(3, -1), pos, seq_len=1001, backend="reference", dtype=F64)
    want = torch.tensor([rotate_oracle(cfg, x.tolist(), int(m)) for m in pos], dtype=F64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert an.relative_position_error(cfg) < 1e-10


def test_attention_scores_one_row_against_many():
    """A single [d] k against [n, d] q is the mean of the row-by-row logits."""
    cfg = RopeConfig(64, rotary_dim=32, rotary_offset=16, direction=-1)
    g = torch.Generator().manual_seed(9)
    q, k = torch.randn(4, 64, generator=g, dtype=F64), torch.randn(64, generator=g, dtype=F64)
    got = an.attention_scores(cfg, DISTS, q, k).tolist()
    assert got == pytest.approx(score_oracle(cfg, q, k.expand(4, -1), DISTS), abs=1e-12, rel=1e-10)


def test_attention_scores_at_2_pow_53():
    """2**53 is within the documented limit: computed (seq_len default capped), not refused."""
    cfg = RopeConfig(64)
    q = torch.randn(1, 64, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = an.attention_scores(cfg, [2**53], q, q)
    assert got.shape == (1,) and bool(torch.isfinite(got).all())
    # at Δ = 2**53 one ulp of θ_0 moves the angle by ~1 rad: the oracle takes the config's
    # own float64 frequencies (the angle is then the same correctly rounded product)
    th = cfg.inv_freq().tolist()
    assert float(got[0]) == pytest.approx(score_oracle(cfg, q, q, [2**53], th)[0], abs=1e-9)
    for bad in ([2**53 + 1], torch.tensor([2**53 + 1]), [2.0**53 + 2], [-1], [1.5], [float("nan")]):
        msg = assert_rope_error(lambda: an.attention_scores(cfg, bad, q, q), "distances")
        assert "seq_len" not in msg


# ------------------------------------------------------------------------------ bug 2: decay_bound chunk
def decay_oracle(th: list, delta: float) -> float:
    total = 0.0
    for j in range(1, len(th) + 1):
        re = sum(math.cos(delta * t) for t in th[:j])
        im = sum(math.sin(delta * t) for t in th[:j])
        total += math.hypot(re, im)
    return total / len(th)


@pytest.mark.parametrize("chunk", [1, 2, 3, 4096])
def test_decay_bound_any_positive_chunk(chunk):
    cfg = RopeConfig(head_dim=32)
    ds = [0, 1, 10, 1000, 12345]
    got = an.decay_bound(cfg, ds, chunk=chunk).tolist()
    assert got == pytest.approx([decay_oracle(theta(cfg), d) for d in ds], rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("chunk", [-1, 0, 1.5, True, "8", None, float("inf")])
def test_decay_bound_bad_chunk(chunk):
    assert_rope_error(lambda: an.decay_bound(RopeConfig(64), [0, 1, 10], chunk=chunk), "chunk")


def test_decay_bound_distances_on_meta_or_bad():
    cfg = RopeConfig(64)
    assert_rope_error(lambda: an.decay_bound(cfg, torch.arange(3, device="meta")), "distances", "meta")
    assert_rope_error(lambda: an.decay_bound(cfg, "12"), "distances")
    assert_rope_error(lambda: an.decay_bound(cfg, [1, float("inf")]), "distances")


# ------------------------------------------------------------------------------ bug 3: bad inputs
CFG = RopeConfig(head_dim=64)


def test_decay_distances_dense():
    assert_rope_error(lambda: an.decay_distances(100, dense=0), "dense")
    assert_rope_error(lambda: an.decay_distances(100, dense=-3), "dense")
    d = an.decay_distances(1000, dense=1, points=20)
    assert d[:2].tolist() == [0, 1] and int(d[-1]) == 1000
    assert bool((d[1:] > d[:-1]).all())


@pytest.mark.parametrize("kwargs, words", [
    (dict(starts=()), ("start",)),
    (dict(distances=()), ("distance",)),
    (dict(q=torch.zeros(64), k=torch.zeros(64)), ("nonzero",)),
    (dict(q=torch.randn(64), k=torch.zeros(64)), ("nonzero",)),
    (dict(q=torch.full((64,), float("nan"))), ("q", "finite")),
    (dict(q=torch.randn(3, 64)), ("q", "single vector")),
    (dict(q=torch.randn(32)), ("q", "64")),
    (dict(q=torch.tensor(1.0)), ("q",)),
    (dict(q="abc"), ("q",)),
    (dict(distances=(-1, 2)), ("distances",)),
    (dict(starts=(0.5,)), ("starts",)),
    (dict(starts=(2**53,), distances=(1,)), ("2**53",)),
    (dict(seed="a"), ("seed",)),
    (dict(dtype="float32"), ("dtype",)),
    (dict(dtype=torch.int32), ("dtype",)),
])
def test_relative_position_error_bad_inputs(kwargs, words):
    assert_rope_error(lambda: an.relative_position_error(CFG, **kwargs), *words)


def test_relative_position_error_k_alone_is_used():
    """k given without q: the given k is scored, not a seeded one (q seeded)."""
    k = torch.zeros(64, dtype=F64)
    assert_rope_error(lambda: an.relative_position_error(CFG, k=k), "nonzero")
    assert an.relative_position_error(CFG, k=torch.ones(64)) < 1e-10


@pytest.mark.parametrize("kwargs, words", [
    (dict(q=torch.randn(3, 64), k=torch.randn(5, 64)), ("rows",)),
    (dict(samples=-1), ("samples",)),
    (dict(samples=0), ("samples",)),
    (dict(samples=1.5), ("samples",)),
    (dict(seed="a"), ("seed",)),
    (dict(seed=1.5), ("seed",)),
    (dict(q=torch.randn(2, 3, 64)), ("q",)),
    (dict(q=torch.randn(0, 64)), ("q",)),
    (dict(q=torch.randn(64), k=torch.randn(63)), ("k", "64")),
    (dict(q=torch.randn(64, dtype=torch.complex64)), ("q", "real")),
    (dict(q=torch.full((64,), float("inf"))), ("q", "finite")),
    (dict(q=torch.randn(64, device="meta")), ("q", "meta")),
    (dict(attention_scaling="yes"), ("attention_scaling",)),
    (dict(seq_len=-1), ("seq_len",)),
])
def test_attention_scores_bad_inputs(kwargs, words):
    assert_rope_error(lambda: an.attention_scores(CFG, [0, 1], **kwargs), *words)


def test_summary_needs_a_model():
    assert_rope_error(lambda: an.summary(CFG), "Model", "RopeConfig")
    assert_rope_error(lambda: an.summary(Model("x", "not a config")), "RopeConfig")
    assert_rope_error(lambda: an.summary(Model("x", CFG, context="4096")), "model.context")
    assert_rope_error(lambda: an.summary(Model("x", CFG, context=-5)), "model.context")
    assert an.summary(Model("x", CFG, context=4096))["n_pairs"] == 32


@pytest.mark.parametrize("shape", [(2, 8), (2, 8, 3, 1), (2, 0, 3), (2, 8, -1), (2, 8.5, 3), "abc", 5, None])
def test_backend_checks_bad_shape(shape):
    assert_rope_error(lambda: backend_checks(CFG, ["eager"], shape=shape), "shape")


@pytest.mark.parametrize("context", ["4096", -1, 0, 1.5, 2**60])
def test_checks_bad_context(context):
    assert_rope_error(lambda: property_checks(CFG, context=context), "context")
    assert_rope_error(lambda: backend_checks(CFG, ["eager"], context=context), "context")


def test_checks_bad_config_and_names():
    assert_rope_error(lambda: property_checks("cfg"), "RopeConfig")
    assert_rope_error(lambda: backend_checks(CFG, "eager"), "names")


def test_property_checks_pass_with_direction_and_offset():
    cfg = RopeConfig(64, rotary_dim=32, rotary_offset=16, direction=-1, layout="interleaved")
    checks = property_checks(cfg, context=2048)
    assert all(c.passed for c in checks), [c.to_dict() for c in checks if not c.passed]


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rotation_matrix_follows_the_config_direction(layout):
    # reference.rotation_matrix rotated by +m·θ for a direction -1 config too
    from ropekit.reference import rotation_matrix

    x = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for direction in (1, -1):
        cfg = ropekit.RopeConfig(8, layout=layout, direction=direction)
        want = ropekit.RotaryEmbedding(cfg).rotate(x[None, None, None], offsets=5)[0, 0, 0]
        assert torch.allclose(rotation_matrix(cfg, 5) @ x, want, rtol=0, atol=1e-15)
