"""RoPE linear attention (RoFormer eq. 19) against the quadratic formula built from dense
rotation matrices (ropekit.reference.block_matrix, float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ropekit
from ropekit import RopeConfig, RopeError
from ropekit.attention import linear_attention
from ropekit.reference import block_matrix


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _quadratic(q, k, v, cfg, positions, causal, phi=lambda x: F.elu(x) + 1):
    """out_m = Σ_n (R_m φq_m)ᵀ(R_n φk_n) v_n / Σ_n φq_mᵀ φk_n, with explicit [s, s] matrices."""
    r = cfg.rotary_dim
    c, s_ = ropekit.cos_sin(cfg, positions, dtype=torch.float64)
    R = block_matrix(c, s_, cfg.layout)  # [s, r, r]
    fq, fk = phi(q.double()), phi(k.double())  # [b, s, h, d]

    def rot(f):
        y = f.clone()
        y[..., :r] = torch.einsum("sij,bshj->bshi", R, f[..., :r])
        return y

    a = torch.einsum("bmhd,bnhd->bhmn", rot(fq), rot(fk))  # [b, h, s, s]
    den = torch.einsum("bmhd,bnhd->bhmn", fq, fk)
    if causal:
        mask = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()
        a, den = a * mask, den * mask
    num = torch.einsum("bhmn,bnhe->bmhe", a, v.double())
    return num / den.sum(-1).transpose(1, 2).unsqueeze(-1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout,d,r,s,chunk", [("half", 16, 16, 13, 4), ("interleaved", 12, 8, 9, 64), ("half", 10, 6, 1, 3)])
def test_matches_quadratic_formula(causal, layout, d, r, s, chunk):
    cfg = RopeConfig(d, rotary_dim=r, layout=layout, base=100.0)
    pos = torch.arange(s) * 3 + 2
    q, k, v = _rand(2, s, 3, d, seed=1), _rand(2, s, 3, d, seed=2), _rand(2, s, 3, 5, seed=3)
    c, sn = ropekit.cos_sin(cfg, pos, dtype=torch.float64)
    got = linear_attention(q, k, v, c[:, None], sn[:, None], layout=layout, causal=causal, chunk_size=chunk)
    want = _quadratic(q, k, v, cfg, pos, causal)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_chunk_sizes_agree_and_float32():
    cfg = RopeConfig(32)
    s = 50
    q, k, v = (_rand(1, s, 2, 32, seed=i, dtype=torch.float32) for i in (4, 5, 6))
    c, sn = ropekit.cos_sin(cfg, torch.arange(s))
    want = _quadratic(q, k, v, cfg, torch.arange(s), True)
    for chunk in (1, 7, 16, 50, 128):
        got = linear_attention(q, k, v, c[:, None], sn[:, None], causal=True, chunk_size=chunk)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    # bf16 inputs: float32 inside, one rounding to bf16 at the end
    got = linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), c[:, None], sn[:, None], causal=True)
    ref = _quadratic(q.bfloat16(), k.bfloat16(), v.bfloat16(), cfg, torch.arange(s), True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), ref, atol=2e-2, rtol=1e-2)


def test_relative_position_property():
    # the numerator depends on positions only through m - n: shifting all positions is a no-op
    cfg = RopeConfig(16)
    q, k, v = _rand(1, 8, 2, 16, seed=7), _rand(1, 8, 2, 16, seed=8), _rand(1, 8, 2, 4, seed=9)
    outs = []
    for off in (0, 1000):
        c, sn = ropekit.cos_sin(cfg, torch.arange(8) + off, dtype=torch.float64)
        outs.append(linear_attention(q, k, v, c[:, None], sn[:, None], causal=True))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-9, rtol=1e-9)
    # and RoPE does matter: without rotation (angle 0) the result differs
    one, zero = torch.ones(8, 1, 8, dtype=torch.float64), torch.zeros(8, 1, 8, dtype=torch.float64)
    assert (linear_attention(q, k, v, one, zero, causal=True) - outs[0]).abs().max() > 1e-3


def test_gradients_match_quadratic():
    cfg = RopeConfig(8)
    pos = torch.arange(6)
    c, sn = ropekit.cos_sin(cfg, pos, dtype=torch.float64)
    ins = [_rand(1, 6, 2, 8, seed=i).requires_grad_() for i in (1, 2)] + [_rand(1, 6, 2, 3, seed=3).requires_grad_()]
    w = _rand(1, 6, 2, 3, seed=4)
    (linear_attention(*ins, c[:, None], sn[:, None], causal=True, chunk_size=4) * w).sum().backward()
    g1 = [t.grad.clone() for t in ins]
    for t in ins:
        t.grad = None
    (_quadratic(*ins, cfg, pos, True) * w).sum().backward()
    for a, b in zip(g1, (t.grad for t in ins)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_custom_feature_map_and_errors():
    cfg = RopeConfig(8)
    c, sn = ropekit.cos_sin(cfg, torch.arange(5), dtype=torch.float64)
    q, k, v = _rand(1, 5, 1, 8, seed=1), _rand(1, 5, 1, 8, seed=2), _rand(1, 5, 1, 2, seed=3)
    phi = lambda x: F.relu(x) + 0.1  # noqa: E731
    got = linear_attention(q, k, v, c[:, None], sn[:, None], feature_map=phi)
    torch.testing.assert_close(got, _quadratic(q, k, v, cfg, torch.arange(5), False, phi), atol=1e-12, rtol=1e-10)
    with pytest.raises(RopeError, match="feature_map"):
        linear_attention(q, k, v, c[:, None], sn[:, None], feature_map="softmax")
    with pytest.raises(RopeError, match="one shape"):
        linear_attention(q, k[:, :4], v, c[:, None], sn[:, None])
    with pytest.raises(RopeError, match="v of shape"):
        linear_attention(q, k, v[:, :4], c[:, None], sn[:, None])
    with pytest.raises(RopeError, match="chunk_size"):
        linear_attention(q, k, v, c[:, None], sn[:, None], causal=True, chunk_size=0)
    with pytest.raises(RopeError, match=r"\[b, s, h, d\]"):
        linear_attention(q[0], k[0], v[0], c, sn)


def test_no_quadratic_intermediate():
    # O(s) memory: record the largest tensor any op produces; with s = 1024 an [s, s]
    # score matrix (1M elements per head) would dominate, the chunked scan stays far below
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    s, d = 1024, 16
    cfg = RopeConfig(d)
    c, sn = ropekit.cos_sin(cfg, torch.arange(s))
    q, k, v = (_rand(1, s, 1, d, seed=i, dtype=torch.float32) for i in (1, 2, 3))
    for causal in (True, False):
        Largest.biggest = 0
        with Largest():
            linear_attention(q, k, v, c[:, None], sn[:, None], causal=causal, chunk_size=64)
        assert Largest.biggest <= s * d, (causal, Largest.biggest)  # inputs/outputs size, not s*s
