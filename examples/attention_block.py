"""A tiny causal self-attention block with RoPE, and three facts about it, checked.

1. Shifting every position by the same offset leaves the output unchanged: RoPE makes the
   attention logits depend on m - n only (RoFormer eq. 11).
2. Decoding one token with a KV cache (offsets = cache length) gives the same output as
   the full causal forward at that position.
3. Without RoPE the block cannot tell token order apart beyond the causal mask.

Run: python examples/attention_block.py   (CPU, ~1 s)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import ropekit


class Attention(nn.Module):
    """Grouped-query causal attention: ``hq`` query heads share ``hk`` key/value heads.

    Shapes: x ``[b, s, e]`` -> q ``[b, s, hq, d]``, k/v ``[b, s, hk, d]`` (bshd) -> ``[b, s, e]``.
    """

    def __init__(self, embed: int = 64, hq: int = 4, hk: int = 2, cfg: ropekit.RopeConfig | None = None) -> None:
        super().__init__()
        self.hq, self.hk, self.d = hq, hk, embed // hq
        self.wq = nn.Linear(embed, hq * self.d, bias=False)
        self.wk = nn.Linear(embed, hk * self.d, bias=False)
        self.wv = nn.Linear(embed, hk * self.d, bias=False)
        self.wo = nn.Linear(hq * self.d, embed, bias=False)
        # float64 tables: this demo runs in float64 to show the exact property (a model in
        # bf16/fp32 keeps the float32 default; tables are rounded once from float64 angles)
        cfg = cfg or ropekit.RopeConfig(head_dim=self.d, base=10000.0)
        self.rope = ropekit.RotaryEmbedding(cfg, table_dtype=torch.float64)

    def qkv(self, x: torch.Tensor, offsets=None, rope: bool = True):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.hq, self.d)  # [b, s, hq, d]
        k = self.wk(x).view(b, s, self.hk, self.d)  # [b, s, hk, d]
        v = self.wv(x).view(b, s, self.hk, self.d)  # [b, s, hk, d]
        if rope:
            q, k = self.rope(q, k, offsets=offsets)  # positions offsets + 0 .. s-1
        return q, k, v

    def attend(self, q, k, v, causal: bool) -> torch.Tensor:
        b, s = q.shape[:2]
        rep = self.hq // self.hk
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)  # [b, s_k, hq, d]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))  # [b, s, e]

    def forward(self, x: torch.Tensor, offsets=None, rope: bool = True) -> torch.Tensor:
        q, k, v = self.qkv(x, offsets, rope)
        return self.attend(q, k, v, causal=True)


def main() -> None:
    torch.manual_seed(0)
    block = Attention().double()  # float64 so the checks show RoPE's exactness, not rounding
    x = torch.randn(2, 12, 64, dtype=torch.float64)  # [b, s, e]

    y0 = block(x)
    y1 = block(x, offsets=1000)  # every position + 1000
    shift = (y0 - y1).abs().max().item()
    print(f"1. shift all positions by 1000: max |Δ output| = {shift:.2e}")
    assert shift < 1e-10

    # decode the last token against a cache of the first 11 keys/values
    q_all, k_all, v_all = block.qkv(x)  # positions 0..11
    q_new, k_new, v_new = block.qkv(x[:, -1:], offsets=torch.tensor([11, 11]))  # position 11
    y_dec = block.attend(q_new, torch.cat([k_all[:, :-1], k_new], 1), torch.cat([v_all[:, :-1], v_new], 1), causal=False)
    dec = (y_dec[:, 0] - y0[:, -1]).abs().max().item()
    print(f"2. KV-cache decode of token 11 vs full forward: max |Δ| = {dec:.2e}")
    assert dec < 1e-10

    # swap two earlier tokens: the output at the last position changes only with RoPE
    xs = x.clone()
    xs[:, [2, 5]] = x[:, [5, 2]]
    with_rope = (block(xs)[:, -1] - y0[:, -1]).abs().max().item()
    without = (block(xs, rope=False)[:, -1] - block(x, rope=False)[:, -1]).abs().max().item()
    print(f"3. swap tokens 2 and 5: last output moves by {with_rope:.2e} with RoPE, {without:.2e} without")
    assert with_rope > 1e-3 and without < 1e-10


if __name__ == "__main__":
    main()
