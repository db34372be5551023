"""Hypothesis property tests of the RoPE claims (RoFormer section 3.4)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ropekit
from ropekit import RopeConfig, apply_rotary, cos_sin
from ropekit.reference import rotation_matrix

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)

cfgs = st.builds(
    lambda half, frac, base, layout: RopeConfig(
        2 * half, base=base, rotary_dim=2 * max(1, (half * frac) // 4), layout=layout
    ),
    half=st.integers(1, 40),
    frac=st.sampled_from([4, 2, 3]),
    base=st.sampled_from([100.0, 10000.0, 500000.0]),
    layout=st.sampled_from(ropekit.LAYOUTS),
)
positions = st.integers(0, 1 << 20)


def _rot(cfg, x, m, backend="eager"):
    c, s = cos_sin(cfg, torch.tensor([m]), dtype=torch.float64)
    return apply_rotary(x, c[0], s[0], layout=cfg.layout, backend=backend)


@SETTINGS
@given(cfg=cfgs, m=positions, n=positions, c=st.integers(0, 1 << 20), seed=st.integers(0, 1000))
def test_score_depends_only_on_relative_position(cfg, m, n, c, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(cfg.head_dim, dtype=torch.float64, generator=g)
    k = torch.randn(cfg.head_dim, dtype=torch.float64, generator=g)
    a = _rot(cfg, q, m) @ _rot(cfg, k, n)
    b = _rot(cfg, q, m + c) @ _rot(cfg, k, n + c)
    # float64 angles up to 2^21 rad: each rotation exact to ~1e-15 relative
    assert abs(float(a - b)) <= 1e-9 * (1 + float(q.norm() * k.norm()))


@SETTINGS
@given(cfg=cfgs, m=positions, seed=st.integers(0, 1000), backend=st.sampled_from(["eager", "complex", "reference"]))
def test_norm_preserved_and_inverse(cfg, m, seed, backend):
    x = torch.randn(3, cfg.head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y = _rot(cfg, x, m, backend)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=1e-12)
    c, s = cos_sin(cfg, torch.tensor([m]), dtype=torch.float64)
    back = apply_rotary(y, c[0], s[0], layout=cfg.layout, backend=backend, conjugate=True)
    torch.testing.assert_close(back, x, atol=1e-12, rtol=1e-12)
    # rotating by -m: (R_m)^T = R_{-m}; same via the matrix
    R = rotation_matrix(cfg, m)
    torch.testing.assert_close(R.T @ y[0, : cfg.rotary_dim], x[0, : cfg.rotary_dim], atol=1e-12, rtol=1e-12)


@SETTINGS
@given(cfg=cfgs, m=positions, n=positions)
def test_reference_matrix_orthogonal_and_relative(cfg, m, n):
    Rm = rotation_matrix(cfg, m)
    eye = torch.eye(cfg.rotary_dim, dtype=torch.float64)
    torch.testing.assert_close(Rm.T @ Rm, eye, atol=1e-12, rtol=0)
    # (R_m q)^T (R_n k) = q^T R_{n-m} k  (RoFormer eq. 16), for n >= m
    lo, hi = min(m, n), max(m, n)
    Rlo, Rhi = rotation_matrix(cfg, lo), rotation_matrix(cfg, hi)
    torch.testing.assert_close(Rlo.T @ Rhi, rotation_matrix(cfg, hi - lo), atol=1e-9, rtol=0)
