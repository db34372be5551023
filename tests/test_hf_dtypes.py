"""patch() on bfloat16/float16 models with default arguments: the proof is against the exact
rotation (a float64 oracle), so the replacement that rounds once is accepted.

Tiny random models built from configs (no weights). Expected values: a float64 run of the
same weights (the bf16/fp16 weights upcast, so both runs see identical parameters).
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ropekit import RopeError  # noqa: E402
from ropekit.integrations import transformers as rt  # noqa: E402

T = transformers
SMALL = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, intermediate_size=64, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip


def _model(family: str) -> torch.nn.Module:
    if family == "llama":
        cfg = T.LlamaConfig(**SMALL)
        cls = T.LlamaForCausalLM
    elif family == "qwen3":
        cfg, cls = T.Qwen3Config(**SMALL), T.Qwen3ForCausalLM
    elif family == "gemma3_text":
        cfg, cls = T.Gemma3TextConfig(**SMALL, sliding_window=4), T.Gemma3ForCausalLM
    elif family == "phi3":
        cfg, cls = T.Phi3Config(**SMALL, partial_rotary_factor=0.5), T.Phi3ForCausalLM
    else:  # pragma: no cover
        raise AssertionError(family)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    # Random init (std 0.02) makes attention almost uniform, so RoPE would hardly reach the
    # logits: sharpen it (q/k scaled 8x, Gemma's (1 + w) norms to 8) so that it does.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(8)
            elif n.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(7.0 if family.startswith("gemma") else 8.0)
    return model


FAMILIES = ["llama", "qwen3", "gemma3_text", "phi3"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", FAMILIES)
def test_default_patch_on_16_bit_models_is_closer_to_float64(family, dtype):
    """patch(model) with defaults succeeds, and the patched logits are at least as close to
    a float64 run of the same weights as the unpatched model's (RMS over 16x64 tokens: the
    replacement rounds once where transformers rounds the tables, each product and the sum)."""
    base = _model(family)
    low = copy.deepcopy(base).to(dtype)
    # The reference: the same (rounded) weights in float64, but the rotary buffers of the
    # float32 model: .to(dtype) also rounds inv_freq, a model error the reference must not share.
    ref_model = copy.deepcopy(base)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.copy_(p.to(dtype))
    ref_model.double()
    ids = torch.randint(3, 64, (16, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ref_model(ids).logits
        unpatched = low(ids).logits.double()
        report = rt.patch(low)
        try:
            patched = low(ids).logits
        finally:
            rt.unpatch(low)
    assert report.tables == "exact" and report.attention
    assert patched.dtype == dtype
    rms = lambda t: (t.double() - ref).pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(patched) <= rms(unpatched), (rms(patched), rms(unpatched))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_both_table_modes_patch_every_dtype(dtype):
    model = _model("qwen3").to(dtype)
    for tables in rt.TABLE_MODES:
        rt.patch(model, tables=tables)
        rt.unpatch(model)


def test_16_bit_rotary_module_edited_by_hand_is_refused():
    """A bf16 model's tables may differ from a fresh float32 module by its buffers' rounding,
    not more: a hand-edited inv_freq is refused instead of silently replaced."""
    model = _model("llama").to(torch.bfloat16)
    rot = model.model.rotary_emb
    with torch.no_grad():
        rot.inv_freq.mul_(1.5)
    with pytest.raises(RopeError, match="rounding of its torch.bfloat16 buffers"):
        rt.patch(model)
    assert not rt.is_patched(model)


def test_accuracy_proof_refuses_a_less_accurate_replacement(monkeypatch):
    """The oracle proof is not vacuous: exact tables rounded to bfloat16 before a float32
    rotation are less accurate than needed somewhere on the probes and must be refused."""
    model = _model("llama").to(torch.bfloat16)
    monkeypatch.setattr(rt, "_table_dtype", lambda dtype: dtype)  # tables in the activation dtype
    with pytest.raises(RopeError, match="no less accurate than the model's own code"):
        rt.patch(model)
    assert not rt.is_patched(model)
