"""Parity with the implementations users know: transformers (half layout) and Meta llama (interleaved)."""

from __future__ import annotations

import pytest
import torch

import ropekit
from ropekit import RopeConfig, apply_rotary_qk, convert_layout, cos_sin, from_full_width, to_full_width

BACKENDS = [b for b in ropekit.backends.available() if b != "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_apply_rotary_pos_emb(backend, dtype):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    torch.manual_seed(0)
    b, h, s, d = 2, 4, 9, 64
    cfg = RopeConfig(d, base=10000.0)
    q, k = torch.randn(b, h, s, d, dtype=dtype), torch.randn(b, h, s, d, dtype=dtype)
    cos, sin = cos_sin(cfg, torch.arange(s))  # [s, r/2] float32
    # transformers' form: full width [b, s, d], unsqueezed at dim 1; computed in float32 here
    cf, sf = to_full_width(cos)[None].expand(b, s, d), to_full_width(sin)[None].expand(b, s, d)
    hq, hk = llama.apply_rotary_pos_emb(q.float(), k.float(), cf, sf)
    # bhsd: tables [s, r/2] broadcast over b and h
    q2, k2 = apply_rotary_qk(q, k, cos, sin, backend=backend)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=0, rtol=0)
    # ropekit computes in float32 and rounds once, exactly like transformers run in float32 then cast
    torch.testing.assert_close(q2, hq.to(dtype), **tol)
    torch.testing.assert_close(k2, hk.to(dtype), **tol)
    assert torch.equal(from_full_width(cf[0]), cos)


def _meta_precompute_freqs_cis(dim, end, theta=10000.0):
    # Meta llama's model.py, written here from its published description (float32, complex64)
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)  # [s, d/2] complex64


def _meta_apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    fc = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])  # reshape_for_broadcast
    xq_out = torch.view_as_real(xq_ * fc).flatten(3)
    xk_out = torch.view_as_real(xk_ * fc).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_llama_complex_form(backend):
    torch.manual_seed(1)
    b, s, h, d = 2, 12, 3, 32
    xq, xk = torch.randn(b, s, h, d), torch.randn(b, s, h, d)
    mq, mk = _meta_apply_rotary_emb(xq, xk, _meta_precompute_freqs_cis(d, s))
    cfg = RopeConfig(d, layout="interleaved")
    cos, sin = cos_sin(cfg, torch.arange(s))
    q2, k2 = apply_rotary_qk(xq, xk, cos[:, None], sin[:, None], layout="interleaved", backend=backend)
    # Meta's angles are float32 products t*θ (rounded), ours float64: differ by ~|mθ|·2^-24
    torch.testing.assert_close(q2, mq, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(k2, mk, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("rotary_dim", [None, 8])
def test_convert_layout_keeps_scores(rotary_dim):
    torch.manual_seed(2)
    n_heads, d, hidden, s = 2, 16, 24, 7
    wq, wk = torch.randn(n_heads * d, hidden, dtype=torch.float64), torch.randn(n_heads * d, hidden, dtype=torch.float64)
    x = torch.randn(s, hidden, dtype=torch.float64)

    def scores(wq, wk, layout):
        cfg = RopeConfig(d, rotary_dim=rotary_dim, layout=layout)
        cos, sin = cos_sin(cfg, torch.arange(s), dtype=torch.float64)
        q = (x @ wq.T).view(s, n_heads, d)
        k = (x @ wk.T).view(s, n_heads, d)
        q, k = apply_rotary_qk(q, k, cos[:, None], sin[:, None], layout=layout)
        return torch.einsum("shd,thd->hst", q, k)

    meta = scores(wq, wk, "interleaved")
    hf = scores(
        convert_layout(wq, n_heads, "interleaved", "half", rotary_dim=rotary_dim),
        convert_layout(wk, n_heads, "interleaved", "half", rotary_dim=rotary_dim),
        "half",
    )
    torch.testing.assert_close(hf, meta, atol=1e-10, rtol=1e-10)
    # the same scores with the unconverted weights in the wrong layout differ: the test can fail
    assert not torch.allclose(scores(wq, wk, "half"), meta, atol=1e-3)
    # round trip, and biases
    back = convert_layout(convert_layout(wq, n_heads, "interleaved", "half", rotary_dim=rotary_dim), n_heads, "half", "interleaved", rotary_dim=rotary_dim)
    assert torch.equal(back, wq)
    bias = torch.arange(n_heads * d, dtype=torch.float64)
    assert torch.equal(convert_layout(bias, n_heads, "half", "half"), bias)


def test_convert_layout_matches_transformers_permute():
    # transformers' convert_llama_weights_to_hf permute(w, n_heads, dim1, dim2):
    #   w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)
    n_heads, d, hidden = 3, 8, 5
    w = torch.randn(n_heads * d, hidden)
    hf = w.view(n_heads, d // 2, 2, hidden).transpose(1, 2).reshape(n_heads * d, hidden)
    assert torch.equal(convert_layout(w, n_heads, "interleaved", "half"), hf)
