"""Converting q/k projection weights between the two pair layouts."""

from __future__ import annotations

from typing import Optional

import torch

from ._errors import fail
from ._checks import integer
from .config import CPU, MAX_HEAD_DIM, check_layout

__all__ = ["convert_layout", "layout_permutation"]


def layout_permutation(head_dim: int, src: str, dst: str, rotary_dim: Optional[int] = None) -> torch.Tensor:
    """Index ``[d]`` such that ``x_dst = x_src[..., perm]`` for one head.

    The rotary pair ``j`` sits at ``(j, j + r/2)`` in ``"half"`` and ``(2j, 2j + 1)`` in
    ``"interleaved"``; dims past ``r`` keep their place.
    """
    check_layout(src)
    check_layout(dst)
    head_dim = integer("head_dim", head_dim, maximum=MAX_HEAD_DIM, fix="pass the size of one attention head")
    r = head_dim if rotary_dim is None else integer("rotary_dim", rotary_dim, minimum=0, fix="pass the model's rotary dim")
    if r % 2 or not 0 < r <= head_dim:
        raise fail(f"rotary_dim even and in [2, {head_dim}]", str(r), "pass the model's rotary dim")
    idx = torch.arange(head_dim, device=CPU)  # int64 [d] on CPU, explicitly (meta-context safe)
    if src == dst:
        return idx
    j = torch.arange(r // 2, device=CPU)
    half_to_inter = torch.stack((j, j + r // 2), dim=-1).reshape(r)  # interleaved slot -> half slot
    perm = idx.clone()
    if src == "half":  # dst interleaved
        perm[:r] = half_to_inter
    else:
        perm[:r] = torch.argsort(half_to_inter)
    return perm


def convert_layout(
    weight: torch.Tensor,
    n_heads: int,
    src: str,
    dst: str,
    *,
    rotary_dim: Optional[int] = None,
    head_dim: Optional[int] = None,
) -> torch.Tensor:
    """Permute a q or k projection between layouts so attention scores are unchanged.

    Args:
        weight: ``[n_heads * d, in_features]`` (a ``nn.Linear`` weight) or ``[n_heads * d]``
            (its bias). Rows of each head are permuted.
        n_heads: heads in this projection (the KV heads for ``k_proj``).
        src, dst: ``"half"`` or ``"interleaved"``. Meta llama checkpoints are
            ``"interleaved"``; transformers' Llama expects ``"half"`` (this is the
            permutation of transformers' ``convert_llama_weights_to_hf``).
        rotary_dim: ``r`` if only the first ``r`` dims of each head rotate.
        head_dim: optional check: the size of one head. The head size is
            ``weight.shape[0] // n_heads``, so the query head count passed for a GQA
            ``k_proj`` would give a wrong head size and a wrong permutation; with
            ``head_dim`` given that is a RopeError instead.

    Returns:
        A new tensor of ``weight``'s shape.

    Example:
        >>> w = torch.randn(2 * 8, 16)
        >>> back = convert_layout(convert_layout(w, 2, "interleaved", "half"), 2, "half", "interleaved")
        >>> torch.equal(back, w)
        True
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (1, 2):
        got = f"shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise fail("weight [n_heads * d, in] or bias [n_heads * d]", got, "pass the q_proj/k_proj weight")
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads <= 0 or weight.shape[0] % n_heads:
        raise fail(
            f"n_heads a positive int dividing weight.shape[0] = {weight.shape[0]}",
            repr(n_heads),
            "pass the number of heads of this projection (KV heads for k_proj)",
        )
    d = weight.shape[0] // n_heads
    if head_dim is not None:
        head_dim = integer("head_dim", head_dim, maximum=MAX_HEAD_DIM, fix="pass the size of one attention head")
        if head_dim != d:
            raise fail(
                f"weight.shape[0] = n_heads * head_dim = {n_heads} * {head_dim}",
                f"weight.shape[0] = {weight.shape[0]} (head size {d} with n_heads={n_heads})",
                "pass the heads of this projection: the KV heads (num_key_value_heads) for k_proj",
            )
    perm = layout_permutation(d, src, dst, rotary_dim).to(weight.device)
    w = weight.reshape(n_heads, d, *weight.shape[1:])  # [h, d, (in)]
    return w[:, perm].reshape(weight.shape)
