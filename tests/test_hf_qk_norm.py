"""``patch(model, fuse_qk_norm=True)``: the per-head q/k RMSNorm of Qwen3, Qwen3-MoE, Gemma 3
(and the families that share their code shape) folded into ``ropekit.apply_qk_norm_rotary``,
on tiny random models built from configs (no weights, no hub access).

Expected values come from the unpatched model. Tolerances (float32 models): logits within
``rtol 1e-5, atol 1e-5`` and gradients within ``1e-5 · max|grad|`` of the unpatched model —
float32 rounding: the fused op normalises and rotates with its own order of float32 roundings
(one per op in the composition; fewer in a fused kernel), and two tiny layers amplify a
difference of a few ulps by at most ~10. Greedy tokens must be identical.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) != 5:
    pytest.skip(f"needs transformers 5.x, found {transformers.__version__}", allow_module_level=True)

from ropekit import RopeError  # noqa: E402
from ropekit.integrations import _qk_norm as qn  # noqa: E402
from ropekit.integrations import hf_sweep as hs  # noqa: E402
from ropekit.integrations import transformers as rt  # noqa: E402

T = transformers
SMALL = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def _config(family: str):
    if family == "qwen3":
        return T.Qwen3Config(**SMALL, head_dim=8, rms_norm_eps=1e-5)
    if family == "qwen3_moe":
        return T.Qwen3MoeConfig(**SMALL, head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    if family == "gemma3":
        return T.Gemma3TextConfig(
            **SMALL, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
        )
    if family == "llama":
        return T.LlamaConfig(**SMALL)
    if family == "olmo2":
        return T.Olmo2Config(**SMALL)
    if family == "gemma3n_kv_shared":  # 4 layers, the last 2 reuse the keys of the first 2 (no k_norm)
        d = hs.tiny_config("gemma3n_text").to_dict()
        d = {k: v for k, v in d.items() if k not in ("model_type", "transformers_version", "kv_sharing_modes")}
        inter = d["intermediate_size"]
        d.update(num_hidden_layers=4, num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"] * 2,
                 intermediate_size=[inter[0]] * 4 if isinstance(inter, list) else inter,
                 activation_sparsity_pattern=None)  # fmt: skip
        return T.Gemma3nTextConfig(**d)
    cfg = hs.tiny_config(family)  # the sweep's tiny config: hidden 64, 4 heads of 16, 2 layers
    if family == "glm4_moe":
        cfg.use_qk_norm = True  # off by default; partial rotary (the first half of each head rotates)
    return cfg


def _build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = T.AutoModelForCausalLM.from_config(_config(family)).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # trained-looking norm weights: init (ones / Gemma's zeros) hides an offset error
        for n, p in model.named_parameters():
            if "q_norm" in n or "k_norm" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 0.5)
    return model


def _ids(b: int = 2, s: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 58, (b, s), generator=g)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a shared machine
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _clean():
    yield
    assert not rt._INSTALLED, f"dispatchers left installed: {sorted(rt._INSTALLED)}"


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts apply_qk_norm_rotary calls made by the integration during model forwards."""
    calls = {"n": 0}
    real = qn.apply_qk_norm_rotary

    def spy(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(qn, "apply_qk_norm_rotary", spy)
    return calls


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


#: Gemma 3n: RoPE as (x, cos, sin), called once for q and once for k; its kv-shared layers
#: have no k_norm. GLM-4-MoE: partial rotary (the norm covers the head, RoPE the first half).
FUSED = ["qwen3", "qwen3_moe", "gemma3", "gemma3n_text", "gemma3n_kv_shared", "glm4_moe"]


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("family", FUSED)
def test_logits_within_float32_rounding(family, fused_calls):
    model = _build(family)
    ids = _ids()
    ref = _logits(model, ids)
    for tables in ("transformers", "exact"):
        report = rt.patch(model, tables=tables, fuse_qk_norm=True)
        try:
            deferred = [n for n, m in model.named_modules() if getattr(vars(m).get("forward"), "_ropekit_deferred", 0)]
            names = dict(model.named_modules())
            norms = [f"{a}.{x}" for a in report.fused for x in ("q_norm", "k_norm") if f"{a}.{x}" in names]
            assert deferred == norms and len(norms) >= 4, (deferred, norms)  # every q/k norm of a fused layer defers
            n = fused_calls["n"]
            got = _logits(model, ids)
            assert fused_calls["n"] - n >= len(report.fused)  # one call per layer (Gemma 3n: one per q and k)
        finally:
            rt.unpatch(model)
        assert report.fuse_qk_norm and report.fused == report.attention and len(report.fused) >= 2
        assert any("q_norm" in line for line in report.norms) and any("k_norm" in line for line in report.norms)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"{family}, tables={tables}")


def test_report_reads_eps_and_offset_from_the_modules():
    q3, g3 = _build("qwen3"), _build("gemma3")
    with rt.patched(q3, tables="transformers", fuse_qk_norm=True) as rq:
        pass
    with rt.patched(g3, tables="transformers", fuse_qk_norm=True) as rg:
        pass
    # Qwen3RMSNorm: x̂·w, eps in .variance_epsilon (1e-5 from this config, not a default)
    assert all("Qwen3RMSNorm(eps=1e-05 from .variance_epsilon, weight_offset=0)" in x for x in rq.norms), rq.norms
    # Gemma3RMSNorm: x̂·(1 + w), eps in .eps
    assert all("Gemma3RMSNorm(eps=1e-06 from .eps, weight_offset=1)" in x for x in rg.norms), rg.norms
    assert all("proven: max |difference|" in x for x in rq.norms + rg.norms)


def test_partial_fusion_where_rope_is_off():
    """Exaone 4 applies RoPE only on sliding layers (`if self.sliding_window is None or
    self.is_sliding`): those are fused, the NoPE layer keeps its norm."""
    model = hs.tiny_config("exaone4")
    model = T.AutoModelForCausalLM.from_config(model).eval()
    ids = _ids()
    ref = _logits(model, ids)
    with rt.patched(model, tables="transformers", fuse_qk_norm=True) as r:
        got = _logits(model, ids)
        assert r.fused == ("model.layers.0.self_attn",) and len(r.attention) == 2
        assert "forward" not in vars(model.model.layers[1].self_attn.q_norm)  # NoPE layer: its own norm
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_torch_rmsnorm_is_read_too():
    """Nothing is keyed by class name: torch.nn.RMSNorm in place of Qwen3RMSNorm is read
    (eps from .eps) and fused."""
    model = _build("qwen3")
    g = torch.Generator().manual_seed(7)
    for layer in model.model.layers:
        for name in ("q_norm", "k_norm"):
            norm = torch.nn.RMSNorm(8, eps=1e-4)
            with torch.no_grad():
                norm.weight.copy_(torch.randn(8, generator=g))
            setattr(layer.self_attn, name, norm)
    ids = _ids()
    ref = _logits(model, ids)
    with rt.patched(model, tables="transformers", fuse_qk_norm=True) as r:
        got = _logits(model, ids)
    assert all("RMSNorm(eps=0.0001 from .eps, weight_offset=0)" in x for x in r.norms), r.norms
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- generation, training
@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "gemma3"])
def test_greedy_generation_identical(family, fused_calls):
    """16 new tokens with the KV cache, a left-padded batch (attention mask), Gemma 3's
    sliding window of 4 crossed."""
    model = _build(family)
    ids = _ids(2, 8, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        with rt.patched(model, fuse_qk_norm=True):
            n = fused_calls["n"]
            out = model.generate(ids, **kw)
            assert fused_calls["n"] - n >= 2 * 16  # every step of both layers fused
    assert torch.equal(out, ref), (out, ref)


@pytest.mark.parametrize(
    "family,checkpointing", [("qwen3", False), ("qwen3_moe", False), ("gemma3", False), ("qwen3", True)]
)
def test_gradients_match(family, checkpointing, fused_calls):
    model = _build(family).train()
    if checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    ids, labels = _ids(2, 10, seed=5), _ids(2, 10, seed=6)

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    with rt.patched(model, tables="transformers", fuse_qk_norm=True):
        n = fused_calls["n"]
        got = grads()
        assert fused_calls["n"] - n >= (4 if checkpointing else 2)  # recomputed in backward too
    names = [n for n in ref if "q_norm" in n or "k_norm" in n or "q_proj" in n or "k_proj" in n]
    assert len(names) == 8 and ref.keys() == got.keys()
    for name in ref:
        scale = ref[name].abs().max().item()
        assert scale > 0, name
        assert (got[name] - ref[name]).abs().max().item() <= 1e-5 * scale, name


# --------------------------------------------------------------------------- restore, isolation
def test_patched_restores_exactly_and_other_instances_unaffected():
    a, b = _build("qwen3", 0), _build("qwen3", 1)
    ids = _ids()
    ra, rb = _logits(a, ids), _logits(b, ids)
    norms = [m for n, m in a.named_modules() if n.endswith(("q_norm", "k_norm"))]
    mod = sys.modules[type(a.model.layers[0].self_attn).forward.__module__]
    original = mod.apply_rotary_pos_emb
    with rt.patched(a, tables="transformers", fuse_qk_norm=True) as r:
        assert all("forward" in vars(m) for m in norms) and len(r.fused) == 2
        assert torch.equal(_logits(b, ids), rb)  # the unpatched instance: transformers' norms and RoPE
        # a norm of the patched model called outside its attention normalises as usual
        x = torch.randn(3, 8)
        want = type(norms[0]).forward(norms[0], x)
        assert torch.equal(norms[0](x), want)
    assert not rt.is_patched(a) and mod.apply_rotary_pos_emb is original
    assert all("forward" not in vars(m) for m in norms)
    assert torch.equal(_logits(a, ids), ra)


def test_unfused_patch_is_unchanged():
    model = _build("qwen3")
    with rt.patched(model, tables="transformers") as r:
        assert not r.fuse_qk_norm and r.fused == () and r.norms == ()
        assert all("forward" not in vars(m) for n, m in model.named_modules() if n.endswith("_norm"))


def test_norm_output_that_misses_rope_is_an_error(monkeypatch):
    """The run-time check: a deferred norm whose output never reaches RoPE (here: someone
    replaced the modeling module's function after patch) is a RopeError, not a silently
    un-normalised q."""
    model = _build("qwen3")
    mod = sys.modules[type(model.model.layers[0].self_attn).forward.__module__]
    ids = _ids()
    rt.patch(model, tables="transformers", fuse_qk_norm=True)
    try:
        with monkeypatch.context() as mp:
            mp.setattr(mod, "apply_rotary_pos_emb", lambda q, k, cos, sin, *a, **kw: (q, k))
            with pytest.raises(RopeError, match="q_norm.*reach RoPE"):
                _logits(model, ids)
    finally:
        rt.unpatch(model)


# --------------------------------------------------------------------------- refusals
def _assert_unchanged(model):
    assert not rt.is_patched(model)
    assert all("forward" not in vars(m) for m in model.modules())


def test_refused_without_qk_norm_llama():
    model = _build("llama")
    match = r"per-head q/k RMSNorm right before RoPE.*llama \(LlamaAttention\): no q/k norm"
    with pytest.raises(RopeError, match=match):
        rt.patch(model, fuse_qk_norm=True)
    _assert_unchanged(model)
    rt.patch(model)  # the plain patch still works
    rt.unpatch(model)


def test_refused_norm_over_all_heads_olmo2():
    model = _build("olmo2")
    with pytest.raises(RopeError, match=r"olmo2.*normalises over all heads: weight \[32\] = 4 heads x head_dim 8"):
        rt.patch(model, fuse_qk_norm=True)
    _assert_unchanged(model)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: torch.nn.LayerNorm(8), "has a bias"),
        (lambda: torch.nn.LayerNorm(8, bias=False), r"is not x / sqrt\(mean\(x²\) \+ 1e-05\).*max \|difference\|"),
        (lambda: torch.nn.RMSNorm(8), "expected one float epsilon attribute"),  # eps=None: torch's finfo eps
        (lambda: torch.nn.RMSNorm(8, eps=1e-6, elementwise_affine=False), "has no weight"),
    ],
    ids=["layernorm", "layernorm-no-bias", "rmsnorm-no-eps", "rmsnorm-no-weight"],
)
def test_refused_norms_whose_math_differs(make, match):
    model = _build("qwen3")
    for layer in model.model.layers:
        layer.self_attn.q_norm = make()
    with pytest.raises(RopeError, match=match):
        rt.patch(model, fuse_qk_norm=True)
    _assert_unchanged(model)


def test_fuse_qk_norm_must_be_bool():
    with pytest.raises(RopeError, match="fuse_qk_norm a bool"):
        rt.patch(_build("qwen3"), fuse_qk_norm="yes")


# --------------------------------------------------------------------------- 16-bit models
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "gemma3"])
def test_fused_accepted_on_a_model_cast_to_16_bits(family, dtype, fused_calls):
    """``model.to(bf16)`` rounds the rotary module's ``inv_freq`` buffer (2^-8 relative). The
    fused proof with exact tables compares against the float32 tables the exact ones are proven
    against — a fresh float32 rotary module, which the cast one must match within its buffers'
    rounding — exactly as the unfused patch does; with the cast module's own tables it refused
    (``q max |difference| 0.00174``). Expected: accepted in both table modes, every attention
    fused, and the logits no farther from the float32 model's than the unpatched 16-bit
    model's are (times 2: they differ from it by 16-bit rounding, docs/transformers.md)."""
    model = _build(family)
    ids = _ids()
    ref = _logits(model, ids)  # float32
    model.to(dtype)
    want = _logits(model, ids)
    freqs = [b for n, b in model.model.rotary_emb.named_buffers() if "inv_freq" in n]
    assert freqs and all(b.dtype == dtype for b in freqs)  # the cast rounded the frequencies
    err_theirs = (want.float() - ref).abs().max().item()
    for tables in ("exact", "transformers"):
        with rt.patched(model, tables=tables, fuse_qk_norm=True) as report:
            n = fused_calls["n"]
            got = _logits(model, ids)
            assert fused_calls["n"] - n >= len(report.fused)
        assert report.fused == report.attention and len(report.fused) == 2
        assert got.dtype == dtype
        err_ours = (got.float() - ref).abs().max().item()
        assert err_ours <= 2 * err_theirs, (tables, err_ours, err_theirs)
    assert torch.equal(_logits(model, ids), want)


def test_fused_16_bit_model_with_an_edited_inv_freq_is_refused():
    """The float32 reference is only used where the cast module matches a fresh one within its
    buffers' rounding: a hand-edited ``inv_freq`` is still refused, and nothing changes."""
    model = _build("qwen3").to(torch.bfloat16)
    with torch.no_grad():
        model.model.rotary_emb.inv_freq.mul_(1.25)
    with pytest.raises(RopeError, match="within the rounding of its torch.bfloat16 buffers"):
        rt.patch(model, fuse_qk_norm=True)
    _assert_unchanged(model)
