"""MultiAxisRotaryEmbedding: equals multi_axis_cos_sin + apply_rotary, and 1-D RoPE on text tokens."""

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RotaryEmbedding, apply_rotary_qk, multi_axis_cos_sin
from ropekit.multi_axis import MultiAxisRotaryEmbedding

BACKENDS = [b for b in ropekit.backends.available() if b not in ("reference", "triton")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ropekit.LAYOUTS)
def test_module_matches_functional_and_text_rope(backend, interleaved, layout):
    torch.manual_seed(0)
    cfg = RopeConfig(24, rotary_dim=20, layout=layout)
    sections = [4, 3, 3]
    rope = MultiAxisRotaryEmbedding(cfg, sections, interleaved=interleaved, backend=backend)
    q, k = torch.randn(2, 6, 4, 24), torch.randn(2, 6, 2, 24)
    pos = torch.randint(0, 50, (2, 6, 3))
    q2, k2 = rope(q, k, pos)
    c, s = multi_axis_cos_sin(cfg, pos, sections, interleaved=interleaved)
    q3, k3 = apply_rotary_qk(q, k, c[:, :, None], s[:, :, None], layout=layout, backend="reference")
    torch.testing.assert_close(q2, q3, atol=3e-6, rtol=3e-6)
    torch.testing.assert_close(k2, k3, atol=3e-6, rtol=3e-6)
    # text tokens: the same position on all axes is plain 1-D RoPE
    p1 = torch.arange(6)
    qt, kt = rope(q, k, p1[:, None].expand(6, 3))
    q1, k1 = RotaryEmbedding(cfg, backend=backend)(q, k, positions=p1)
    torch.testing.assert_close(qt, q1, atol=3e-6, rtol=3e-6)
    torch.testing.assert_close(kt, k1, atol=3e-6, rtol=3e-6)


def test_module_formats_and_errors():
    torch.manual_seed(1)
    cfg = RopeConfig(16)
    rope = MultiAxisRotaryEmbedding(cfg, [2, 3, 3])
    q, k = torch.randn(2, 5, 3, 16), torch.randn(2, 5, 1, 16)
    pos = torch.randint(0, 9, (2, 5, 3))
    want_q, _ = rope(q, k, pos)
    got_q, _ = rope(q.transpose(1, 2), k.transpose(1, 2), pos, format="bhsd")
    torch.testing.assert_close(got_q.transpose(1, 2), want_q)
    got_t, _ = rope(q[0], k[0], pos[0], format="thd")
    torch.testing.assert_close(got_t, want_q[0])
    with pytest.raises(ropekit.RopeError, match=r"positions of shape \[5, 3\] or \[2, 5, 3\]"):
        rope(q, k, pos.movedim(-1, 0))
    with pytest.raises(ropekit.RopeError, match="integer"):
        rope(q, k, pos.float())
    with pytest.raises(ropekit.RopeError):
        MultiAxisRotaryEmbedding(cfg, [2, 3, 2])  # sections do not sum to r/2
