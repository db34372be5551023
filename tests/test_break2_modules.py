"""Adversarial pass over cli / convert / variants / analysis: each test pins a defect that
gave a silent wrong result or an unclean error, with expected values from an independent
computation written out here."""

from __future__ import annotations

import math

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError
from ropekit.analysis import bands, classify_pairs
from ropekit.cli import main
from ropekit.convert import convert_layout
from ropekit.scaling import YaRN
from ropekit.variants import RopeMixed


# ----------------------------------------------------------------------------- analysis.bands
def _yarn_classes_reference(r: int, base: float, L: int, beta_fast: float, beta_slow: float, truncate: bool):
    """transformers' _compute_yarn_parameters, written out: find_correction_range then
    linear_ramp_factor; ramp 0 keeps θ_i, 1 divides it by the factor."""

    def corr(turns: float) -> float:
        return (r * math.log(L / (turns * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr(beta_fast), corr(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, r - 1)
    if low == high:
        high += 0.001
    out = []
    for i in range(r // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append("unchanged" if ramp == 0 else "interpolated" if ramp == 1 else "in between")
    return out


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_bands_when_the_ramp_edges_cross(truncate):
    # base 10, L = 32768: low (pair turning 32 times in L) lands past r - 1 while high is
    # clamped to r - 1, so low > high and the ramp is 1 everywhere: every pair interpolated.
    # bands() said "unchanged" for every pair (i <= low), contradicting the frequencies.
    cfg = RopeConfig(128, base=10.0, scaling=YaRN(factor=4.0, original_max_position=32768, truncate=truncate))
    want = _yarn_classes_reference(128, 10.0, 32768, 32.0, 1.0, truncate)
    assert set(want) == {"interpolated"}
    assert bands(cfg)["classes"] == want
    assert classify_pairs(cfg) == want  # the measured frequencies agree


# ----------------------------------------------------------------------------- RopeMixed
def test_rope_mixed_positions_for_one_token_do_not_broadcast_over_the_sequence():
    rope = RopeMixed(8, 2, generator=torch.Generator().manual_seed(0))
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RopeError, match=r"positions \[s, n_axes\].*s = 4.*got positions of shape \(1, 2\)"):
        rope(q, q, positions=torch.tensor([[1, 2]]))  # was: every token rotated to (1, 2)
    with pytest.raises(RopeError, match=r"h = num_heads = 2"):
        rope(q[:, :, :1], q[:, :, :1], positions=torch.zeros(4, 2, dtype=torch.long))  # was: tables broadcast over 1 head
    # [b, s, A] with b = 1 or b stays accepted, and equals rotating each token by Σ_a p_a θ^a
    pos = torch.tensor([[0, 1], [2, 3], [1, 1], [3, 0]])
    a, _ = rope(q, q, positions=pos[None])
    f = rope.freqs.detach().double()
    phi = (pos.double()[:, :, None, None] * f[None]).sum(1)  # [s, h, r/2]
    x = torch.complex(q[..., :4].double(), q[..., 4:].double()) * torch.polar(torch.ones_like(phi), phi)
    torch.testing.assert_close(a.double(), torch.cat((x.real, x.imag), -1), atol=1e-5, rtol=0)


def test_rope_mixed_non_finite_float_positions_are_refused():
    rope = RopeMixed(8, 2)
    q = torch.randn(1, 2, 2, 8)
    with pytest.raises(RopeError, match="finite positions"):
        rope(q, q, positions=torch.tensor([[0.0, 0.5], [float("nan"), 1.0]]))  # was: NaN q and k


def test_rope_mixed_axial_init_with_more_axes_than_pairs():
    # refused (an axis with no pair would start out blind to its positions), with a fix
    # that RopeMixed can take: the message used to advise AxialRope's sections=
    with pytest.raises(RopeError, match=r"n_axes=6, rotary_dim=8 \(4 pairs\).*rotary_dim >= 12") as e:
        RopeMixed(8, 2, n_axes=6, init="axial")
    assert "sections" not in str(e.value)
    RopeMixed(8, 2, n_axes=4, init="axial")  # one pair per axis is fine


# ----------------------------------------------------------------------------- convert_layout
def _hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.permute (interleaved -> half)."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def test_convert_layout_head_dim_catches_query_heads_passed_for_a_gqa_k_proj():
    torch.manual_seed(0)
    w_k = torch.randn(2 * 16, 8)  # 2 KV heads of size 16
    torch.testing.assert_close(convert_layout(w_k, 2, "interleaved", "half", head_dim=16), _hf_permute(w_k, 2), rtol=0, atol=0)
    # 8 query heads: 32 % 8 == 0, so heads of size 4 were assumed and the rows shuffled wrongly
    assert not torch.equal(convert_layout(w_k, 8, "interleaved", "half"), _hf_permute(w_k, 2))
    with pytest.raises(RopeError, match=r"n_heads \* head_dim = 8 \* 16.*num_key_value_heads"):
        convert_layout(w_k, 8, "interleaved", "half", head_dim=16)


# ----------------------------------------------------------------------------- cli demo --out
def test_demo_out_that_is_a_file_fails_cleanly_before_the_checks(tmp_path, capsys):
    f = tmp_path / "report"
    f.write_text("x")
    assert main(["demo", "--model", "head_dim=16,base=1e4", "--out", str(f)]) == 2
    out, err = capsys.readouterr()
    assert "verify:" not in out  # no checks run (they used to, then "[Errno 17] File exists")
    assert err.startswith("ropekit: error: expected --out a folder") and "an existing file" in err
    assert main(["demo", "--model", "head_dim=16,base=1e4", "--out", str(f / "sub")]) == 2
    assert "expected --out a folder" in capsys.readouterr().err
