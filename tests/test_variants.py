"""p-RoPE, xPos, RoPE-Mixed: each against a direct, slow implementation of its paper's
equation (float64, explicit 2x2 rotations or complex numbers), plus the relative-position
property each claims."""

from __future__ import annotations

import cmath
import math

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, apply_rotary
from ropekit.multi_axis import AxialRope, image_positions
from ropekit.variants import (
    RopeMixed,
    XPosTables,
    apply_xpos,
    p_rope_cos_sin,
    p_rope_inv_freq,
    xpos_cos_sin,
    xpos_zeta,
)


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _rotate_pairs_slow(x, angles, scales=None):
    """Half layout, pair i = (x[i], x[i + r/2]); y = s_i · R(angle_i) (x_i, x_{i+r/2}).
    x [r] float64, angles [r/2] python floats."""
    r = 2 * len(angles)
    y = x.clone()
    for i, a in enumerate(angles):
        s = 1.0 if scales is None else scales[i]
        x1, x2 = float(x[i]), float(x[i + r // 2])
        y[i] = s * (x1 * math.cos(a) - x2 * math.sin(a))
        y[i + r // 2] = s * (x1 * math.sin(a) + x2 * math.cos(a))
    return y


# --------------------------------------------------------------------------- p-RoPE
@pytest.mark.parametrize("p,r,expect_rotated", [(0.25, 16, 2), (0.75, 16, 6), (1.0, 12, 6), (0.0, 12, 0), (0.5, 10, 2)])
def test_p_rope_against_slow_equation(p, r, expect_rotated):
    base = 500.0
    cfg = RopeConfig(r + 4, base=base, rotary_dim=r)
    positions = torch.tensor([0, 3, 17, 250])
    cos, sin = p_rope_cos_sin(cfg, positions, p, dtype=torch.float64)
    x = _rand(4, r + 4)
    got = apply_rotary(x, cos, sin)
    n_rot = int(p * r // 2)  # the paper's rope_angles = int(p * d // 2)
    assert n_rot == expect_rotated
    for t, m in enumerate(positions.tolist()):
        # θ_i = base^(-2i/r) for the n_rot highest frequencies (i < n_rot), 0 for the rest
        ang = [m * base ** (-2 * i / r) if i < n_rot else 0.0 for i in range(r // 2)]
        want = torch.cat((_rotate_pairs_slow(x[t, :r], ang), x[t, r:]))
        torch.testing.assert_close(got[t], want, atol=1e-12, rtol=0)


def test_p_rope_limits_and_relative_property():
    cfg = RopeConfig(32, base=10000.0)
    pos = torch.arange(50)
    c1, s1 = ropekit.cos_sin(cfg, pos)
    c, s = p_rope_cos_sin(cfg, pos, 1.0)
    assert torch.equal(c, c1) and torch.equal(s, s1)  # p = 1: RoPE
    c0, s0 = p_rope_cos_sin(cfg, pos, 0.0)
    assert torch.equal(c0, torch.ones_like(c0)) and torch.equal(s0, torch.zeros_like(s0))  # p = 0: NoPE
    # unrotated pairs are the lowest frequencies (the tail of the spectrum)
    f = p_rope_inv_freq(cfg, 0.25)
    assert (f[:4] > 0).all() and (f[4:] == 0).all()
    # scores depend on m - n only
    q, k = _rand(50, 1, 32, seed=1), _rand(50, 1, 32, seed=2)

    def scores(offset):
        c, s = p_rope_cos_sin(cfg, pos + offset, 0.25, dtype=torch.float64)
        return apply_rotary(q, c[:, None], s[:, None])[:, 0] @ apply_rotary(k, c[:, None], s[:, None])[:, 0].T

    torch.testing.assert_close(scores(1000), scores(0), atol=1e-9, rtol=0)


def test_p_rope_errors():
    with pytest.raises(RopeError, match=r"in \[0, 1\]"):
        p_rope_inv_freq(RopeConfig(8), 1.5)
    with pytest.raises(RopeError, match="integer dtype"):
        p_rope_cos_sin(RopeConfig(8), torch.arange(3.0), 0.5)


# --------------------------------------------------------------------------- xPos
def test_xpos_zeta_matches_torchscale_form():
    # torchscale XPOS: scale = (arange(0, head_dim, 2) + 0.4 * head_dim) / (1.4 * head_dim)
    d = 64
    want = (torch.arange(0, d, 2, dtype=torch.float64) + 0.4 * d) / (1.4 * d)
    torch.testing.assert_close(xpos_zeta(RopeConfig(d)), want, atol=1e-15, rtol=0)


def test_xpos_against_slow_equation():
    d, B, gamma = 16, 512.0, 0.4
    cfg = RopeConfig(d)
    positions = torch.tensor([0, 5, 40, 700])
    q, k = _rand(4, d, seed=3), _rand(4, d, seed=4)
    for center in (0, 300):
        t = xpos_cos_sin(cfg, positions, center=center, dtype=torch.float64)
        gq, gk = apply_xpos(q, k, t)
        for j, m in enumerate(positions.tolist()):
            theta = [10000.0 ** (-2 * i / d) for i in range(d // 2)]
            zeta = [(2 * i / d + gamma) / (1 + gamma) for i in range(d // 2)]
            ang = [m * th for th in theta]
            wq = _rotate_pairs_slow(q[j], ang, [z ** ((m - center) / B) for z in zeta])
            wk = _rotate_pairs_slow(k[j], ang, [z ** (-(m - center) / B) for z in zeta])
            torch.testing.assert_close(gq[j], wq, atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(gk[j], wk, atol=1e-12, rtol=1e-12)
    # the score is the paper's Σ_i ζ_i^{(m-n)/B} · (pair-i part of the RoPE score)
    t = xpos_cos_sin(cfg, positions, dtype=torch.float64)
    gq, gk = apply_xpos(q, k, t)
    c, s = ropekit.cos_sin(cfg, positions, dtype=torch.float64)
    rq, rk = apply_rotary(q, c, s), apply_rotary(k, c, s)
    z = xpos_zeta(cfg)
    for m in range(4):
        for n in range(4):
            e = (positions[m] - positions[n]).item() / B
            pair = rq[m, : d // 2] * rk[n, : d // 2] + rq[m, d // 2 :] * rk[n, d // 2 :]  # [r/2]
            torch.testing.assert_close(gq[m] @ gk[n], (z**e * pair).sum(), atol=1e-12, rtol=1e-12)


def test_xpos_relative_and_center_free():
    cfg = RopeConfig(32)
    q, k = _rand(20, 2, 32, seed=5), _rand(20, 2, 32, seed=6)

    def scores(pos, **kw):
        t = xpos_cos_sin(cfg, pos, dtype=torch.float64, **kw)
        tq = XPosTables(*(x[:, None] for x in t))  # [s, 1, r/2] for [s, h, d]
        a, b = apply_xpos(q, k, tq)
        return torch.einsum("mhd,nhd->hmn", a, b)

    pos = torch.arange(20) * 3
    base = scores(pos)
    torch.testing.assert_close(scores(pos + 10_000), base, atol=1e-9, rtol=1e-9)  # shift (own center)
    torch.testing.assert_close(scores(pos, center=7), base, atol=1e-9, rtol=1e-9)  # center cancels
    # decay: far keys are damped relative to plain RoPE
    c, s = ropekit.cos_sin(cfg, pos, dtype=torch.float64)
    plain = torch.einsum("mhd,nhd->hmn", apply_rotary(q, c[:, None], s[:, None]), apply_rotary(k, c[:, None], s[:, None]))
    assert not torch.allclose(plain, base)


def test_xpos_long_sequence_stays_finite_in_float32():
    cfg = RopeConfig(64)
    pos = torch.arange(0, 70_000, 7)
    t = xpos_cos_sin(cfg, pos)  # centered: exponents within ±35 000 / 512
    for x in t:
        assert torch.isfinite(x).all()
    assert t.cos_q.abs().amax(-1).min() > 0 and t.cos_k.abs().amax(-1).min() > 0
    # the uncentered paper form does not fit float32 at this length: a RopeError, not inf/0
    with pytest.raises(RopeError, match=r"within 35694 of the center.*c=0, \|m - c\| up to 69993"):
        xpos_cos_sin(cfg, pos, center=0)
    # and the centered float32 scores still equal the float64 ones far from the center
    q, k = _rand(2, 64, seed=7, dtype=torch.float32), _rand(2, 64, seed=8, dtype=torch.float32)
    ends = torch.tensor([69_990, 69_993])
    c = int((pos.min() + pos.max()) // 2)
    t32 = xpos_cos_sin(cfg, ends, center=c)
    t64 = xpos_cos_sin(cfg, ends, center=c, dtype=torch.float64)
    a32, b32 = apply_xpos(q, k, t32)
    a64, b64 = apply_xpos(q.double(), k.double(), t64)
    torch.testing.assert_close((a32 @ b32.T).double(), a64 @ b64.T, atol=1e-4, rtol=1e-4)


def test_xpos_backends_agree():
    cfg = RopeConfig(24, rotary_dim=16)
    t = xpos_cos_sin(cfg, torch.arange(9))
    t = XPosTables(*(x[:, None] for x in t))
    q, k = _rand(2, 9, 3, 24, seed=1, dtype=torch.float32), _rand(2, 9, 1, 24, seed=2, dtype=torch.float32)
    rq, rk = apply_xpos(q.double(), k.double(), t, backend="reference")
    for be in ropekit.backends.available():
        aq, ak = apply_xpos(q, k, t, backend=be)
        torch.testing.assert_close(aq.double(), rq, atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(ak.double(), rk, atol=2e-6, rtol=1e-6)


def test_xpos_errors():
    with pytest.raises(RopeError, match="gamma"):
        xpos_zeta(RopeConfig(8), gamma=-1.0)
    with pytest.raises(RopeError, match="scale_base"):
        xpos_cos_sin(RopeConfig(8), torch.arange(3), scale_base=0)
    with pytest.raises(RopeError, match="xpos_cos_sin"):
        apply_xpos(torch.zeros(1, 8), torch.zeros(1, 8), (torch.ones(1, 4),) * 4)


# --------------------------------------------------------------------------- RoPE-Mixed
def test_rope_mixed_against_slow_complex_equation():
    torch.manual_seed(0)
    rope = RopeMixed(16, 3, layout="interleaved", generator=torch.Generator().manual_seed(4))
    pos = image_positions(3, 4)  # [12, 2]
    q = _rand(1, 12, 3, 16, seed=9, dtype=torch.float32)
    with torch.no_grad():
        got, _ = rope(q, q, positions=pos)
    f = rope.freqs.detach().double()  # [2, h, r/2]
    for t in range(12):
        px, py = pos[t].tolist()
        for h in range(3):
            for j in range(8):
                # eq. 11-12: pair j of head h is multiplied by exp(i (p_x θ^x_{h,j} + p_y θ^y_{h,j}))
                z = complex(float(q[0, t, h, 2 * j]), float(q[0, t, h, 2 * j + 1]))
                w = z * cmath.exp(1j * (px * float(f[0, h, j]) + py * float(f[1, h, j])))
                assert abs(float(got[0, t, h, 2 * j]) - w.real) < 2e-5
                assert abs(float(got[0, t, h, 2 * j + 1]) - w.imag) < 2e-5


def test_rope_mixed_init():
    r, theta = 32, 10.0
    rope = RopeMixed(r, 4, theta=theta, generator=torch.Generator().manual_seed(1))
    f = rope.freqs.detach().double()  # [2, h, r/2]
    mag = torch.hypot(f[0], f[1])  # [h, r/2]
    mu = torch.tensor([theta ** (-4 * j / r) for j in range(r // 4)], dtype=torch.float64)
    torch.testing.assert_close(mag, torch.cat((mu, mu)).expand(4, -1), atol=1e-6, rtol=1e-6)
    # pairs j and j + r/4 point in perpendicular directions; heads point in different ones
    dot = f[0, :, : r // 4] * f[0, :, r // 4 :] + f[1, :, : r // 4] * f[1, :, r // 4 :]
    assert dot.abs().max() < 1e-6
    ang = torch.atan2(f[1, :, 0], f[0, :, 0])
    assert (ang[:, None] - ang[None, :]).abs().sum() > 0.1
    # axial init is AxialRope with base = theta (RoPE-Axial is the special case)
    ax = RopeMixed(24, 2, theta=100.0, init="axial", n_axes=3)
    pos = torch.tensor([[0, 1, 2], [5, 3, 9], [7, 7, 0]])
    c, s = ax.cos_sin(pos)  # [3, h, r/2]
    ca, sa = AxialRope(24, n_axes=3, base=100.0).cos_sin(pos)
    torch.testing.assert_close(c, ca[:, None].expand(-1, 2, -1), atol=2e-6, rtol=0)
    torch.testing.assert_close(s, sa[:, None].expand(-1, 2, -1), atol=2e-6, rtol=0)


def test_rope_mixed_relative_2d():
    rope = RopeMixed(16, 2, generator=torch.Generator().manual_seed(2)).double()
    pos = image_positions(3, 3)
    q, k = _rand(1, 9, 2, 16, seed=1), _rand(1, 9, 2, 16, seed=2)

    def scores(p):
        a, b = rope(q, k, positions=p)
        return torch.einsum("bmhd,bnhd->bhmn", a, b)

    with torch.no_grad():
        base = scores(pos)
        torch.testing.assert_close(scores(pos + torch.tensor([4, 11])), base, atol=1e-10, rtol=0)
        moved = pos.clone()
        moved[0, 1] += 1
        assert (scores(moved) - base).abs().max() > 1e-3


def test_rope_mixed_gradients_flow_and_match_reference():
    rope = RopeMixed(16, 2, generator=torch.Generator().manual_seed(3))
    pos = image_positions(2, 3)
    q = _rand(2, 6, 2, 16, seed=4, dtype=torch.float32).requires_grad_()
    k = _rand(2, 6, 2, 16, seed=5, dtype=torch.float32)
    w = _rand(2, 6, 2, 16, seed=6, dtype=torch.float32)
    grads = {}
    for be in ("reference", *ropekit.backends.available()):
        rope.zero_grad()
        q.grad = None
        a, b = rope(q, k, positions=pos, backend=be)
        ((a * w).sum() + (b * w).square().sum()).backward()
        grads[be] = (rope.freqs.grad.clone(), q.grad.clone())
    assert grads["reference"][0].abs().max() > 1e-3  # gradients reach the frequencies
    for be, (gf, gq) in grads.items():
        torch.testing.assert_close(gf, grads["reference"][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gq, grads["reference"][1], atol=1e-5, rtol=1e-5)


def test_rope_mixed_gradcheck_float64():
    # numerical vs analytic gradients w.r.t. the frequencies and q, through the module itself
    rope = RopeMixed(8, 2, generator=torch.Generator().manual_seed(5)).double()
    pos = image_positions(2, 2)
    q = _rand(1, 4, 2, 8, seed=1).requires_grad_()
    f = rope.freqs.detach().clone().requires_grad_()

    def fn(freqs, x):
        a, _ = torch.func.functional_call(rope, {"freqs": freqs}, (x, x), {"positions": pos, "backend": "eager"})
        return a

    assert torch.autograd.gradcheck(fn, (f, q))


def test_rope_mixed_errors():
    with pytest.raises(RopeError, match="rotary_dim % 4"):
        RopeMixed(18, 2)
    with pytest.raises(RopeError, match="n_axes == 2"):
        RopeMixed(16, 2, n_axes=3)
    with pytest.raises(RopeError, match="init in"):
        RopeMixed(16, 2, init="random")
    rope = RopeMixed(16, 2)
    with pytest.raises(RopeError, match="n_axes=2"):
        rope.cos_sin(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(RopeError, match=">= 0"):
        rope.cos_sin(-torch.ones(4, 2, dtype=torch.long))
