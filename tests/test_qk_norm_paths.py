"""The fused norm + RoPE gives the same bits by every path: the C++ kernel, the torch composition
(the eager backend; the cpu backend's path for learnable tables, ``torch.func`` and forward-mode
AD), with or without grad, vmapped or not.

Before, the composition summed ``x²`` with ``mean`` (torch's order, times ``1/d``) and took
torch's CPU ``sqrt``, which is not correctly rounded: a float32 call whose tables required grad
differed from the same call under ``no_grad`` in 179 of 1008 elements.
"""

import itertools

import numpy as np
import pytest
import torch

import ropekit
from ropekit.backends._generic import sqrt_rn, sum_squares


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_composition_has_the_kernel_bits(dtype):
    torch.manual_seed(0)
    for d, layout, part, off in itertools.product([8, 24, 64, 80, 128], ["half", "interleaved"], [1.0, 0.5],
                                                  [0.0, 1.0]):
        r = int(d * part) // 2 * 2
        q, k = (torch.randn(2, 5, 3, d) * 3).to(dtype), torch.randn(2, 5, 2, d).to(dtype)
        wq, wk = torch.randn(d).to(dtype), torch.randn(d)
        c, s = ropekit.cos_sin(ropekit.RopeConfig(d, rotary_dim=r), torch.arange(5))
        c, s = c[:, None].to(torch.float64 if dtype == torch.float64 else torch.float32), s[:, None].to(c.dtype)
        s = s.to(c.dtype)
        kw = dict(weight_offset=off, layout=layout)
        want = ropekit.apply_qk_norm_rotary(q, k, wq, wk, c, s, backend="cpu", **kw)
        got = ropekit.apply_qk_norm_rotary(q, k, wq, wk, c, s, backend="eager", **kw)
        for a, b in zip(want, got):
            assert torch.equal(a, b), (d, layout, r, off)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_mode_learnable_tables_and_vmap_do_not_change_the_bits(dtype):
    torch.manual_seed(1)
    q, k = torch.randn(2, 7, 3, 24, dtype=dtype), torch.randn(2, 7, 1, 24, dtype=dtype)
    wq, wk = torch.randn(24, dtype=dtype), torch.randn(24, dtype=dtype)
    cos, sin = torch.rand(7, 1, 10, dtype=dtype), torch.rand(7, 1, 10, dtype=dtype)
    with torch.no_grad():
        want = ropekit.apply_qk_norm_rotary(q, k, wq, wk, cos, sin)
    learn = ropekit.apply_qk_norm_rotary(q, k, wq, wk, cos.clone().requires_grad_(), sin.clone().requires_grad_())
    vm = torch.func.vmap(lambda a, b: ropekit.apply_qk_norm_rotary(a, b, wq, wk, cos, sin))(q, k)
    for got in (learn, vm):
        assert torch.equal(got[0].detach(), want[0]) and torch.equal(got[1].detach(), want[1])


def test_sum_squares_is_the_kernels_lane_order():
    x = torch.randn(5, 40, dtype=torch.float64)
    lanes = torch.nn.functional.pad(x * x, (0, 8)).view(5, 3, 16)
    acc = lanes[:, 0] + lanes[:, 1] + lanes[:, 2]  # each lane in order
    for w in (8, 4, 2, 1):
        acc = acc[:, :w] + acc[:, w:2 * w]
    assert torch.equal(sum_squares(x), acc)


def test_sqrt_rn_is_correctly_rounded():
    # numpy's root is the hardware's IEEE root; torch's CPU root is not (the value below:
    # exact 3.111797213588722..., just above the midpoint of two float32s; torch rounded down)
    v = torch.tensor([9.683281898498535], dtype=torch.float32)
    assert sqrt_rn(v).item() == float(np.sqrt(v.numpy())[0]) == 3.111797332763672
    g = torch.Generator().manual_seed(2)
    b32 = torch.randint(0, 0x7F800000, (2_000_000,), dtype=torch.int32, generator=g).view(torch.float32)
    assert torch.equal(sqrt_rn(b32).view(torch.int32), torch.from_numpy(np.sqrt(b32.numpy())).view(torch.int32))
    b64 = torch.randint(0, 0x7FF0000000000000, (2_000_000,), dtype=torch.int64, generator=g).view(torch.float64)
    assert torch.equal(sqrt_rn(b64).view(torch.int64), torch.from_numpy(np.sqrt(b64.numpy())).view(torch.int64))
    special = torch.tensor([0.0, -0.0, float("inf"), 5e-324, 2.2250738585072014e-308], dtype=torch.float64)
    assert torch.equal(sqrt_rn(special), torch.from_numpy(np.sqrt(special.numpy())))
    assert sqrt_rn(torch.tensor([-1.0, float("nan")], dtype=torch.float64)).isnan().all()
