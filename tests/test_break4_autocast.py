"""patch() under torch.autocast (bf16 on CPU): q/k come out of the linear layers in bf16 while
the rotary module's tables stay float32. transformers' ``q * cos`` then promotes the rotated
q/k to float32; ropekit returns them in q's dtype (bf16, one rounding). The attention casts
them to bf16 anyway, so the model's logits are bit-identical to the unpatched model's and the
gradients are as close to a float32 run (documented in docs/transformers.md, caveats)."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) != 5:
    pytest.skip(f"needs transformers 5.x, found {transformers.__version__}", allow_module_level=True)

from ropekit.integrations import transformers as rt  # noqa: E402
from transformers.models.llama import modeling_llama as m_llama  # noqa: E402

T = transformers


def _llama(attn: str):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).train()


def test_dropin_under_autocast_keeps_q_dtype():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 8, generator=g).to(torch.bfloat16)
    k = torch.randn(2, 2, 10, 8, generator=g).to(torch.bfloat16)
    ang = torch.arange(10.0)[:, None] * (1e4 ** -(torch.arange(0, 8, 2) / 8))
    emb = torch.cat([ang, ang], -1)[None]
    cos, sin = emb.cos(), emb.sin()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = m_llama.apply_rotary_pos_emb(q, k, cos, sin)
        got = rt.apply_rotary_pos_emb(q, k, cos, sin)
    assert want[0].dtype == torch.float32 and got[0].dtype == torch.bfloat16  # the documented difference
    # ropekit's bf16 result is transformers' float32 result rounded once
    assert torch.equal(got[0], want[0].to(torch.bfloat16)) and torch.equal(got[1], want[1].to(torch.bfloat16))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_autocast_bf16_training_step_matches_unpatched(attn):
    ids = torch.randint(3, 58, (2, 10), generator=torch.Generator().manual_seed(1))
    runs = {}
    for mode in ("fp32", "hf", "ropekit"):
        m = _llama(attn)
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
        if mode == "ropekit":
            rt.patch(m, tables="transformers")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            out = m(ids, labels=ids)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in m.parameters() if p.grad is not None])
        runs[mode] = (out.logits.detach().float(), grads)
    assert torch.equal(runs["hf"][0], runs["ropekit"][0])
    ref = runs["fp32"][1]
    err = {k: float((runs[k][1] - ref).norm() / ref.norm()) for k in ("hf", "ropekit")}
    assert err["ropekit"] <= 1.1 * err["hf"], err
