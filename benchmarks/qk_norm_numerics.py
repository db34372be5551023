"""bfloat16 accuracy of the fused per-head RMSNorm + RoPE against transformers' Qwen3 sequence.

Both against a float64 oracle, in bfloat16 ulps at the oracle's magnitude:

    .venv/bin/python benchmarks/qk_norm_numerics.py

transformers' Qwen3 (``Qwen3RMSNorm`` + ``apply_rotary_pos_emb``): the norm in float32, ``x̂``
rounded to bfloat16, times the bfloat16 weight (rounded again), then RoPE in bfloat16 with
bfloat16 cos/sin (rounded per product and sum). ropekit rounds once.
"""

from __future__ import annotations

import torch

import ropekit


def main() -> None:
    g = torch.Generator().manual_seed(0)
    d, s = 128, 64
    q = torch.randn(4, s, 16, d, generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(d, generator=g)).bfloat16()
    cos, sin = ropekit.cos_sin(ropekit.RopeConfig(d, base=1e6), torch.arange(s))
    c, sn = cos[:, None], sin[:, None]
    h = d // 2
    x = q.double()
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    a, b = y[..., :h], y[..., h:]
    oracle = torch.cat([a * c.double() - b * sn.double(), b * c.double() + a * sn.double()], -1)
    ulp = 2.0 ** (torch.floor(torch.log2(oracle.abs().clamp_min(1e-30))) - 7)  # bfloat16: 8 significant bits

    fused, _ = ropekit.apply_qk_norm_rotary(q, q[:, :, :1], w, w, c, sn)
    hs = q.float()
    hs = hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + 1e-6)
    n = w * hs.to(torch.bfloat16)
    cf, sf = torch.cat([c, c], -1).bfloat16(), torch.cat([sn, sn], -1).bfloat16()
    hf = n * cf + torch.cat([-n[..., h:], n[..., :h]], -1) * sf
    print(f"{'':24}{'max ulp':>10}{'mean ulp':>10}{'> 0.5 ulp':>11}")
    for name, v in (("ropekit fused", fused), ("transformers Qwen3", hf)):
        u = (v.double() - oracle).abs() / ulp
        print(f"{name:24}{u.max().item():10.3g}{u.mean().item():10.3f}{(u > 0.5).double().mean().item():10.2%}")


if __name__ == "__main__":
    main()
