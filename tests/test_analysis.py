"""ropekit.analysis: each quantity against an independent computation (NumPy / Python
math / the module's own apply path at other positions), and the checks able to fail."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import ropekit.analysis as an
from ropekit import RopeConfig, apply_rotary, cos_sin
from ropekit.analysis import Model
from ropekit.analysis.checks import backend_checks, property_checks
from ropekit.scaling import NTK, Linear, Llama3, Proportional, YaRN


def np_theta(r: int, base: float) -> np.ndarray:
    """θ_k = base^(-2k/r) (RoFormer eq. 15), NumPy float64."""
    return base ** (-2.0 * np.arange(r // 2) / r)


def np_decay_bound(theta: np.ndarray, dist: float) -> float:
    """(1/(r/2)) Σ_{j=1}^{r/2} |Σ_{k<j} e^{i dist θ_k}| with an explicit double loop."""
    total = 0.0
    for j in range(1, len(theta) + 1):
        s = np.sum(np.exp(1j * dist * theta[:j]))
        total += abs(s)
    return total / len(theta)


LLAMA31 = RopeConfig(
    head_dim=128, base=500000.0, scaling=Llama3(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
)


# ------------------------------------------------------------------------------ decay bound
def test_decay_bound_at_zero_is_mean_of_1_to_half():
    for r in (2, 8, 64, 128):
        b = an.decay_bound(RopeConfig(head_dim=r), [0])
        assert b.dtype == torch.float64
        assert float(b[0]) == pytest.approx((r // 2 + 1) / 2, abs=1e-12)  # (1/n) Σ_{j=1}^{n} j


@pytest.mark.parametrize(
    "cfg,theta",
    [
        (RopeConfig(head_dim=128), np_theta(128, 1e4)),
        (RopeConfig(head_dim=96, base=5e5, rotary_dim=32), np_theta(32, 5e5)),
        (RopeConfig(head_dim=64, base=1e6, scaling=Linear(factor=4.0)), np_theta(64, 1e6) / 4.0),
    ],
)
def test_decay_bound_matches_numpy(cfg, theta):
    dist = [0, 1, 2, 3, 7, 50, 333, 4096, 100_000]
    got = an.decay_bound(cfg, dist).numpy()
    want = np.array([np_decay_bound(theta, d) for d in dist])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-9)


def test_decay_bound_chunking_and_scaled_frequencies():
    dist = torch.arange(0, 3000, 7)
    a = an.decay_bound(LLAMA31, dist, chunk=5)
    b = an.decay_bound(LLAMA31, dist)
    assert torch.equal(a, b)
    theta = LLAMA31.inv_freq().numpy()
    np.testing.assert_allclose(b[[0, 10, 400]].numpy(), [np_decay_bound(theta, float(d)) for d in dist[[0, 10, 400]]], rtol=1e-10)


def test_decay_distances_cover_dense_then_log():
    d = an.decay_distances(100_000, dense=64, points=50)
    assert d[0] == 0 and d[-1] == 100_000 and torch.equal(d[:65], torch.arange(65))
    assert bool((d[1:] > d[:-1]).all())


# ------------------------------------------------------------------------------ wavelengths
def test_wavelengths_are_two_pi_over_theta():
    cfg = RopeConfig(head_dim=64, base=5e5, scaling=Linear(factor=2.0))
    before, after = an.wavelengths(cfg)
    np.testing.assert_allclose(before.numpy(), 2 * math.pi / np_theta(64, 5e5), rtol=1e-13)
    np.testing.assert_allclose(after.numpy(), 2 * 2 * math.pi / np_theta(64, 5e5), rtol=1e-13)


def test_classes_linear_ntk_plain_proportional():
    assert set(an.classify_pairs(RopeConfig(64))) == {"unchanged"}
    assert set(an.classify_pairs(RopeConfig(64, scaling=Linear(factor=4.0)))) == {"interpolated"}
    ntk = an.classify_pairs(RopeConfig(64, scaling=NTK(factor=4.0)))
    # base' = base·s^(r/(r-2)): θ_0 = 1 for any base, the last pair is divided by exactly s
    assert ntk[0] == "unchanged" and ntk[-1] == "interpolated" and set(ntk[1:-1]) == {"in between"}
    prop = an.classify_pairs(RopeConfig(16, scaling=Proportional(partial_rotary_factor=0.25)))
    assert prop[:2] == ["unchanged", "unchanged"] and set(prop[2:]) == {"not rotating"}


def _llama3_classes_by_hand(r, base, factor, lo, hi, L):
    """Meta's apply_scaling bands (Llama 3.1 reference code), written out per pair."""
    out = []
    for i in range(r // 2):
        lam = 2 * math.pi * base ** (2 * i / r)
        out.append("unchanged" if lam < L / hi else "interpolated" if lam > L / lo else "in between")
    return out


def test_llama3_bands_match_measured_classes_and_by_hand():
    b = an.bands(LLAMA31)
    assert b["kind"] == "llama3" and b["unchanged_below"] == 2048 and b["interpolated_above"] == 8192
    measured = an.classify_pairs(LLAMA31)
    assert b["classes"] == measured == _llama3_classes_by_hand(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    assert measured.count("in between") == 6  # λ in [2048, 8192]: pairs 29..34 for base 5e5


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("base,r,L,factor", [(1e6, 128, 32768, 4.0), (1e4, 64, 4096, 40.0), (150000.0, 64, 4096, 32.0)])
def test_yarn_bands_match_measured_classes(truncate, base, r, L, factor):
    cfg = RopeConfig(head_dim=r, base=base, scaling=YaRN(factor=factor, original_max_position=L, truncate=truncate))
    b = an.bands(cfg)
    assert b["kind"] == "yarn"
    assert b["classes"] == an.classify_pairs(cfg)
    # band edges: the pair turning beta_fast (32) / beta_slow (1) times within L, YaRN eq. 17-18
    low = r * math.log(L / (32 * 2 * math.pi)) / (2 * math.log(base))
    assert b["low"] == (max(math.floor(low), 0) if truncate else low)


def test_no_bands_without_band_scheme():
    assert an.bands(RopeConfig(64)) is None
    assert an.bands(RopeConfig(64, scaling=Linear(factor=2.0))) is None


def test_band_runs_and_pair_table_consistent():
    runs = an.band_runs(LLAMA31)
    assert [r["class"] for r in runs] == ["unchanged", "in between", "interpolated"]
    assert runs[0]["first"] == 0 and runs[-1]["last"] == 63
    assert runs[-1]["ratio"] == pytest.approx([8.0, 8.0])
    rows = an.pair_table(LLAMA31)
    assert len(rows) == 64 and rows[5]["ratio"] == pytest.approx(1.0)


def test_context_coverage_llama31_by_hand():
    cov = an.context_coverage(LLAMA31, 131072, 8192)
    lam = [2 * math.pi * 500000.0 ** (2 * i / 128) for i in range(64)]
    wrapped = [i for i in range(64) if lam[i] <= 8192]
    assert cov["wrapped_in_training"] == len(wrapped)
    # every unwrapped pair is divided by 8 while the context grows 16x: angles reach 2x
    assert cov["out_of_range"] == [i for i in range(64) if i not in wrapped]
    assert cov["max_angle_ratio"] == pytest.approx(2.0)
    assert an.context_coverage(LLAMA31, 65536, 8192)["out_of_range"] == []  # 8x context: exactly covered


# ------------------------------------------------------------------------------ relative position
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_relative_position_error_tiny_in_float64(layout):
    cfg = RopeConfig(head_dim=72, rotary_dim=48, base=5e5, layout=layout)
    assert an.relative_position_error(cfg) < 1e-12
    assert an.relative_position_error(LLAMA31, starts=(0, 3, 60000)) < 1e-12


def test_relative_position_error_detects_absolute_dependence(monkeypatch):
    cfg = RopeConfig(head_dim=32)
    real = an._rotate

    def leaky(cfg, x, positions, **kw):  # a "rotation" that also depends on the absolute position
        y = real(cfg, x, positions, **kw)
        return y * (1 + 1e-6 * positions.to(y.dtype)[:, None])

    monkeypatch.setattr(an, "_rotate", leaky)
    assert an.relative_position_error(cfg) > 1e-3


def test_relative_position_error_float32_is_measurably_larger():
    cfg = RopeConfig(head_dim=64)
    e32 = an.relative_position_error(cfg, dtype=torch.float32, backend="eager")
    e64 = an.relative_position_error(cfg)
    assert 1e-9 < e32 < 1e-5 and e64 < 1e-12


# ------------------------------------------------------------------------------ scores
def test_attention_scores_match_rotation_at_other_positions():
    cfg = RopeConfig(head_dim=40, rotary_dim=32, layout="interleaved", scaling=YaRN(factor=4.0, original_max_position=64))
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 40, generator=g, dtype=torch.float64)
    dist = torch.tensor([0, 1, 9, 200])
    got = an.attention_scores(cfg, dist, q, k, seq_len=512)
    # direct: rotate q at n + Δ and k at n = 11 with the dense reference, dot, / √d
    n = 11
    c, s = cos_sin(cfg, torch.cat([dist + n, torch.tensor([n])]), dtype=torch.float64, seq_len=512)
    qm = apply_rotary(q.expand(4, 40), c[:4], s[:4], layout="interleaved", backend="reference")
    kn = apply_rotary(k[None], c[4:], s[4:], layout="interleaved", backend="reference")
    want = (qm * kn).sum(-1) / math.sqrt(40)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_attention_scores_of_ones_is_cosine_sum():
    cfg = RopeConfig(head_dim=64, base=1e4)
    dist = np.array([0, 3, 100, 5000])
    ones = torch.ones(64, dtype=torch.float64)
    got = an.attention_scores(cfg, dist, ones, ones).numpy()
    want = np.array([2 * np.cos(d * np_theta(64, 1e4)).sum() / 8.0 for d in dist])  # √64 = 8
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_attention_scores_random_decays():
    s = an.attention_scores(RopeConfig(head_dim=128), [0, 20000], samples=32)
    assert s[0] > 5 * abs(float(s[1]))


# ------------------------------------------------------------------------------ summary / checks
def test_summary_is_json_and_round_trips():
    for cfg in (LLAMA31, RopeConfig(16, scaling=Proportional(partial_rotary_factor=0.25)), RopeConfig(8)):
        s = an.summary(Model("x", cfg, context=131072))
        text = json.dumps(s, allow_nan=False)
        back = json.loads(text)
        assert RopeConfig.from_dict(back["config"]) == cfg
        assert len(back["pairs"]) == cfg.n_pairs


def test_property_checks_pass_and_name_numbers():
    checks = property_checks(LLAMA31, context=131072)
    assert len(checks) == 6 and all(c.passed for c in checks)
    assert all(math.isfinite(c.value) and c.bound > 0 for c in checks)


def test_backend_checks_detect_a_wrong_layout(monkeypatch):
    cfg = RopeConfig(head_dim=32, layout="half")
    ok = backend_checks(cfg, ["eager"], context=64)
    assert len(ok) == 5 and all(c.passed for c in ok)
    from ropekit.backends import eager

    real = eager.functional  # the form every eager result comes from

    def wrong(x, cos, sin, layout, conjugate):  # pairs the wrong lanes
        return real(x, cos, sin, "interleaved" if layout == "half" else "half", conjugate)

    monkeypatch.setattr(eager, "functional", wrong)
    bad = backend_checks(cfg, ["eager"], context=64)
    assert not bad[0].passed and bad[0].value > 0.1
    qk = [c for c in bad if "qk-norm" in c.name]  # the fused norm + RoPE through the same rotation
    assert len(qk) == 2 and not any(c.passed for c in qk)


def test_bf16_ulp_is_the_spacing_of_bfloat16():
    from ropekit.analysis.checks import _bf16_ulp

    v = torch.tensor([1.0, 1.5, 2.296875, 0.75, -3.0, 100.0], dtype=torch.float64)  # all exact in bf16
    u = _bf16_ulp(v)
    for x, ulp in zip(v.tolist(), u.tolist()):
        step = math.copysign(ulp, x)
        assert float(torch.tensor(x + step).to(torch.bfloat16)) == x + step  # next number is representable
        assert float(torch.tensor(x + step / 4).to(torch.bfloat16)) == x  # nothing in between


def test_analysis_rejects_non_configs():
    with pytest.raises(ValueError, match="RopeConfig"):
        an.decay_bound({"head_dim": 64}, [0])
    with pytest.raises(ValueError, match="head dim"):
        an.attention_scores(RopeConfig(64), [0], torch.ones(32))
