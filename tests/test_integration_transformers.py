"""ropekit.integrations.transformers: drop-in apply and per-instance patching, proven on tiny
random models of every registered family (no weights, no hub access).

Expected values come from transformers itself (the unpatched model, its modeling
functions) or from independent float64 formulas written out here.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) != 5:
    pytest.skip(f"needs transformers 5.x, found {transformers.__version__}", allow_module_level=True)

import ropekit  # noqa: E402
from ropekit import RopeError  # noqa: E402
from ropekit.integrations import transformers as rt  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m_ds  # noqa: E402
from transformers.models.gpt_neox import modeling_gpt_neox as m_neox  # noqa: E402
from transformers.models.gptj import modeling_gptj as m_gptj  # noqa: E402
from transformers.models.llama import modeling_llama as m_llama  # noqa: E402

T = transformers
SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
)
TOK = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(family: str):
    if family == "llama":
        return T.LlamaConfig(**SMALL, **TOK)
    if family == "mistral":
        return T.MistralConfig(**SMALL, **TOK)
    if family == "qwen2":
        return T.Qwen2Config(**SMALL, **TOK)
    if family == "qwen3":
        return T.Qwen3Config(**SMALL, **TOK, head_dim=8)
    if family == "phi3":
        # LongRoPE with a short original context (16) so that prompt + 20 new tokens crosses
        # the short -> long factor switch during generation.
        rp = dict(
            rope_type="longrope",
            rope_theta=10000.0,
            short_factor=[1.0, 1.1, 1.2, 1.3],
            long_factor=[2.0, 2.5, 3.0, 3.5],
            original_max_position_embeddings=16,
        )
        return T.Phi3Config(**SMALL, **TOK, original_max_position_embeddings=16, rope_parameters=rp)
    if family == "gemma3":
        return T.Gemma3TextConfig(
            **SMALL, **TOK, head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"]
        )
    if family == "gpt_neox":
        kw = {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}
        return T.GPTNeoXConfig(**kw, **TOK, rotary_pct=0.5)
    if family == "gptj":
        return T.GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128, rotary_dim=4, **TOK)
    if family == "qwen2_vl":
        text = dict(**SMALL, **TOK, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2]))
        vision = dict(
            depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
            spatial_merge_size=1, temporal_patch_size=1, in_channels=3,
        )  # fmt: skip
        return T.Qwen2VLConfig(
            text_config=text, vision_config=vision, vision_start_token_id=60, image_token_id=61,
            video_token_id=62, **TOK,
        )  # fmt: skip
    if family == "deepseek_v3":
        yarn = dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
            beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0,
        )  # fmt: skip
        return T.DeepseekV3Config(
            **{**SMALL, "num_key_value_heads": 4}, **TOK, moe_intermediate_size=16, n_routed_experts=4,
            num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1,
            rope_interleave=True, rope_parameters=yarn,
        )  # fmt: skip
    raise AssertionError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "gpt_neox", "gptj", "qwen2_vl", "deepseek_v3"]


def _build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = _config(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family == "qwen2_vl":
            model = T.Qwen2VLForConditionalGeneration(cfg)
        else:
            model = T.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def _ids(b: int = 2, s: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 58, (b, s), generator=g)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The models are tiny: one intra-op thread is ~10x faster than two busy-waiting
    # threads on a shared machine. Restored for the rest of the session.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _clean():
    yield
    # every test unpatches what it patched: no dispatcher may stay behind
    assert not rt._INSTALLED, f"dispatchers left installed: {sorted(rt._INSTALLED)}"


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that reach ropekit's apply from the integration module."""
    calls = {"n": 0}
    qk, one = rt.apply_rotary_qk, rt.apply_rotary

    def qk_spy(*a, **k):
        calls["n"] += 1
        return qk(*a, **k)

    def one_spy(*a, **k):
        calls["n"] += 1
        return one(*a, **k)

    monkeypatch.setattr(rt, "apply_rotary_qk", qk_spy)
    monkeypatch.setattr(rt, "apply_rotary", one_spy)
    return calls


def _modeling(model):
    attn = next(m for m in model.modules() if "Attention" in type(m).__name__ and "Vision" not in type(m).__name__)
    import sys

    return sys.modules[type(attn).forward.__module__]


# --------------------------------------------------------------------------- drop-in apply
def _full(ang: torch.Tensor):
    return torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)


def test_dropin_equals_transformers_llama_and_neox_partial():
    torch.manual_seed(0)
    b, s, d = 2, 7, 16
    q, k = torch.randn(b, 4, s, d), torch.randn(b, 2, s, d)  # [b, h, s, d], GQA
    ang = (torch.arange(s, dtype=torch.float32)[:, None] * 10000 ** (-torch.arange(0, d, 2) / d))[None].expand(b, -1, -1)
    cos, sin = _full(ang)  # [b, s, d]
    want = m_llama.apply_rotary_pos_emb(q, k, cos, sin)
    got = rt.apply_rotary_pos_emb(q, k, cos, sin)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    # partial rotary (GPT-NeoX, r = d/2): the pass-through dims are copied unchanged
    cos_p, sin_p = cos[..., : d // 4], sin[..., : d // 4]
    cos_p, sin_p = torch.cat([cos_p, cos_p], -1), torch.cat([sin_p, sin_p], -1)  # [b, s, r]
    want = m_neox.apply_rotary_pos_emb(q, k, cos_p, sin_p)
    got = rt.apply_rotary_pos_emb(q, k, cos_p, sin_p)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
        assert torch.equal(g[..., d // 2 :], w[..., d // 2 :])
    # bshd with unsqueeze_dim=2
    qs, ks = q.transpose(1, 2), k.transpose(1, 2)
    got = rt.apply_rotary_pos_emb(qs, ks, cos, sin, unsqueeze_dim=2)
    want = m_llama.apply_rotary_pos_emb(qs, ks, cos, sin, unsqueeze_dim=2)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)


def test_dropin_inputs_untouched_and_grads():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    k = torch.randn(1, 1, 5, 8, requires_grad=True)
    ang = torch.arange(5.0)[:, None] * torch.tensor([1.0, 0.3, 0.1, 0.01])
    cos, sin = _full(ang[None])
    q0, k0 = q.detach().clone(), k.detach().clone()
    qe, ke = rt.apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(q.detach(), q0) and torch.equal(k.detach(), k0)
    gq, gk = torch.randn_like(qe), torch.randn_like(ke)
    torch.autograd.backward((qe, ke), (gq, gk))
    q2, k2 = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    torch.autograd.backward(m_llama.apply_rotary_pos_emb(q2, k2, cos, sin), (gq, gk))
    torch.testing.assert_close(q.grad, q2.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(k.grad, k2.grad, rtol=0, atol=1e-6)


def test_dropin_bf16_is_closer_to_float64_than_transformers():
    # transformers multiplies in bf16 (two roundings + a bf16 add); ropekit computes in
    # float32 and rounds once, so its error against a float64 oracle is at most the other's.
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 64, 32), torch.randn(2, 4, 64, 32)
    ang = torch.arange(64, dtype=torch.float64)[:, None] * 10000 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    cos, sin = _full(ang[None])
    ref = m_llama.apply_rotary_pos_emb(q.double(), k.double(), cos, sin)[0]
    qb, kb, cb, sb = q.bfloat16(), k.bfloat16(), cos.bfloat16(), sin.bfloat16()
    ours = rt.apply_rotary_pos_emb(qb, kb, cb, sb)[0]
    theirs = m_llama.apply_rotary_pos_emb(qb, kb, cb, sb)[0]
    assert ours.dtype == torch.bfloat16
    ref_b = m_llama.apply_rotary_pos_emb(qb.double(), kb.double(), cb.double(), sb.double())[0]
    e_ours = (ours.double() - ref_b).abs().max().item()
    e_theirs = (theirs.double() - ref_b).abs().max().item()
    assert e_ours <= e_theirs
    assert e_ours <= (ref.abs().max().item() * 2**-8) * 1.01  # half a bf16 ulp of the largest value


def test_interleave_and_gptj_dropins_match_transformers():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 1, 6, 8)
    ang = torch.arange(6.0)[:, None] * torch.tensor([1.0, 0.2, 0.04, 0.008])
    cos, sin = _full(ang[None].expand(2, -1, -1))
    want = m_ds.apply_rotary_pos_emb_interleave(q, k, cos, sin)
    got = rt.apply_rotary_pos_emb_interleave(q, k, cos, sin)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    x = torch.randn(2, 6, 4, 8)  # GPT-J: [b, s, h, r], half-width tables [b, s, r/2]
    sin_h, cos_h = ang.sin()[None].expand(2, -1, -1), ang.cos()[None].expand(2, -1, -1)
    torch.testing.assert_close(rt._gptj_apply(x, sin_h, cos_h), m_gptj.apply_rotary_pos_emb(x, sin_h, cos_h), rtol=0, atol=1e-6)


def test_dropin_errors():
    q = torch.randn(1, 2, 3, 8)
    ang = torch.arange(3.0)[:, None] * torch.tensor([1.0, 0.1, 0.01, 0.001])
    cos, sin = _full(ang[None])
    inter = torch.repeat_interleave(ang.cos(), 2, -1)[None]  # GPT-J-style full-width table
    with pytest.raises(RopeError, match="two equal copies"):
        rt.apply_rotary_pos_emb(q, q, inter, inter)
    with pytest.raises(RopeError, match="unsqueeze_dim by keyword"):
        rt.apply_rotary_pos_emb(q, q, cos, sin, 2)
    with pytest.raises(RopeError, match="same shape|one shape"):
        rt.apply_rotary_pos_emb(q, q, cos, sin[..., :4])


# --------------------------------------------------------------------------- tables are cat(f, f)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gptj"])
def test_transformers_tables_first_half_is_lossless(family):
    """The half-width conversion (first half of cos/sin) loses nothing: transformers'
    tables of these families are two bit-identical copies."""
    model = _build(family)
    rot = next(m for m in model.modules() if rt._is_rotary(m))
    x = torch.zeros(1, dtype=torch.float32)
    pos = torch.arange(200)[None]
    args = (x, pos[None].expand(3, -1, -1)) if family == "qwen2_vl" else (x, pos)
    if family == "gemma3":
        outs = [rot(x, pos, lt) for lt in ("sliding_attention", "full_attention")]
    else:
        outs = [rot(*args)]
    for cos, sin in outs:
        h = cos.shape[-1] // 2
        assert torch.equal(cos[..., :h], cos[..., h:]) and torch.equal(sin[..., :h], sin[..., h:])


# --------------------------------------------------------------------------- per family
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_transformers_tables_then_unpatch_restores(family, spy):
    model = _build(family)
    modeling = _modeling(model)
    original = modeling.apply_rotary_pos_emb
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        report = rt.patch(model, tables="transformers")
        assert modeling.apply_rotary_pos_emb is not original
        out = model(ids).logits
        assert spy["n"] > 0  # the ropekit path really ran
        assert rt.is_patched(model) and report.tables == "transformers" and report.rotary == ()
        assert len(report.attention) == 2
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        rt.unpatch(model)
        assert modeling.apply_rotary_pos_emb is original
        assert all("forward" not in m.__dict__ for m in model.modules())
        n = spy["n"]
        back = model(ids).logits
        assert spy["n"] == n
    assert torch.equal(back, ref)


def _tables_of(model, family) -> float:
    """The tables the model builds for positions 0..63 (GPT-J: (sin, cos) half width)."""
    x = torch.zeros(1)
    pos = torch.arange(64)[None]
    rot = next(m for m in model.modules() if rt._is_rotary(m))
    if family == "gemma3":
        return [rot(x, pos, lt) for lt in ("sliding_attention", "full_attention")]
    return [rot(x, pos[None].expand(3, -1, -1) if family == "qwen2_vl" else pos)]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_exact_tables(family, spy):
    model = _build(family)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        theirs = _tables_of(model, family)
        with rt.patched(model, tables="exact") as report:
            ours = _tables_of(model, family)
            out = model(ids).logits
            assert report.tables == "exact" and report.rotary
        assert spy["n"] > 0
        gap = max((a - b).abs().max().item() for pa, pb in zip(theirs, ours) for a, b in zip(pa, pb))
        # tables differ (float32 vs float64 angles) but only by float32 rounding at
        # positions < 64: a few ulps of values <= ~1.2 (YaRN's attention factor).
        assert gap <= 4 * 2**-23
        # Logits move by that table gap times the network's gain; the 2-layer models have
        # O(1) weights (gain < 50), so 50 * gap + 1e-6 bounds it.
        torch.testing.assert_close(out, ref, rtol=0, atol=50 * gap + 1e-6)
        back = model(ids).logits
    assert torch.equal(back, ref)


def test_exact_tables_match_float64_oracle_llama():
    # independent oracle: cos/sin of m * 10000^(-2i/d) in float64, rounded once to float32
    model = _build("llama")
    d = SMALL["hidden_size"] // SMALL["num_attention_heads"]
    pos = torch.tensor([[0, 1, 5, 127, 5000, 70000]])
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[..., None].double() * inv
    with rt.patched(model, tables="exact"):
        cos, sin = model.model.rotary_emb(torch.zeros(1), pos)
    assert cos.dtype == torch.float32 and cos.shape == (1, 6, d)
    assert torch.equal(cos, torch.cat([ang.cos(), ang.cos()], -1).float())
    assert torch.equal(sin, torch.cat([ang.sin(), ang.sin()], -1).float())


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_position_ids_left_padding(family, spy):
    """Left padding with explicit ``position_ids = attention_mask.cumsum(-1) - 1`` puts -1 at
    the padded slots; transformers runs it (cos/sin of negative angles), so the patched model
    must too. Expected: the unpatched model's logits — bit for bit with its own tables,
    within the table gap of test_logits_exact_tables (4 float32 ulps, times a gain < 50)
    with exact ones."""
    model = _build(family)
    ids = _ids(2, 12, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    pos = mask.cumsum(-1) - 1  # row 1: [-1, -1, -1, 0, 1, ...]
    assert pos.min() == -1
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos)
    with torch.no_grad():
        ref = model(**kw).logits
        for tables in ("transformers", "exact"):
            n = spy["n"]
            with rt.patched(model, tables=tables):
                out = model(**kw).logits
            assert spy["n"] > n
            if tables == "transformers":
                assert torch.equal(out, ref)
            else:
                torch.testing.assert_close(out, ref, rtol=0, atol=50 * 4 * 2**-23 + 1e-6)


def test_exact_tables_negative_positions_llama():
    """Negative positions get the exact tables too: cos/sin of the float64 angle m·θ with
    m < 0 (θ(-m) = -θ(m) exactly), rounded once — the same independent float64 oracle as
    test_exact_tables_match_float64_oracle_llama; rows of non-negative positions keep the bits
    they have without negative positions in the call."""
    model = _build("llama")
    d = SMALL["hidden_size"] // SMALL["num_attention_heads"]
    pos = torch.tensor([[-70000, -5000, -127, -5, -1, 0, 1, 5, 127, 5000, 70000]])
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[..., None].double() * inv
    with rt.patched(model, tables="exact"):
        cos, sin = model.model.rotary_emb(torch.zeros(1), pos)
        cos_nn, sin_nn = model.model.rotary_emb(torch.zeros(1), pos[:, 5:])  # non-negative only
    assert cos.dtype == torch.float32 and cos.shape == (1, pos.shape[1], d)
    assert torch.equal(cos, torch.cat([ang.cos(), ang.cos()], -1).float())
    assert torch.equal(sin, torch.cat([ang.sin(), ang.sin()], -1).float())
    assert torch.equal(cos[:, 5:], cos_nn) and torch.equal(sin[:, 5:], sin_nn)
    assert torch.equal(cos[:, :5], cos[:, 6:].flip(1)) and torch.equal(sin[:, :5], -sin[:, 6:].flip(1))


def test_compile_fullgraph_exact_longrope_switch():
    """Phi-3's LongRoPE under torch.compile(fullgraph=True) with exact tables: the short/long
    frequency choice (seq_len = max(position_ids) + 1 > 16) is made in the graph. Expected:
    the eager patched model's logits bit for bit, below and above the switch, also with
    left padding and position_ids = cumsum - 1."""
    model = _build("phi3")
    torch._dynamo.reset()
    try:
        with rt.patched(model, tables="exact"), torch.no_grad():
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
            for s in (12, 20):  # short, long
                ids = _ids(2, s)
                mask = torch.ones_like(ids)
                mask[1, :3] = 0
                for kw in (dict(input_ids=ids), dict(input_ids=ids, attention_mask=mask, position_ids=mask.cumsum(-1) - 1)):
                    assert torch.equal(compiled(**kw).logits, model(**kw).logits), (s, sorted(kw))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_left_padded(family, spy):
    """Greedy generate() with the KV cache: 20 new tokens, a left-padded batch, both table modes."""
    model = _build(family)
    ids = _ids(2, 8, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding in row 1
    kw = dict(attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        assert ref.shape == (2, 8 + 20)
        for tables in ("transformers", "exact"):
            n = spy["n"]
            with rt.patched(model, tables=tables):
                out = model.generate(ids, **kw)
            assert spy["n"] - n >= 2 * 20  # every decode step of both layers went through ropekit
            assert torch.equal(out, ref), (tables, out, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match(family, spy):
    model = _build(family)
    ids = _ids(2, 10, seed=5)
    labels = _ids(2, 10, seed=6)

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    with rt.patched(model, tables="transformers"):
        got = grads()
    assert spy["n"] > 0
    assert ref.keys() == got.keys() and len(ref) > 5
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_llama(spy):
    model = _build("llama")
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    ids, labels = _ids(2, 10, seed=5), _ids(2, 10, seed=6)
    model(ids, labels=labels).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with rt.patched(model, tables="transformers"):
        model(ids, labels=labels).loss.backward()
    assert spy["n"] >= 4  # 2 layers forward + 2 recomputed in backward
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- per-instance, refcount
def test_other_instances_unaffected_and_refcount(spy):
    a, b = _build("llama", 0), _build("llama", 1)
    ids = _ids()
    original = m_llama.apply_rotary_pos_emb
    with torch.no_grad():
        rt.patch(a, tables="transformers")
        rt.patch(b, tables="exact")
        n = spy["n"]
        b_ref_patched = b(ids).logits
        assert spy["n"] > n
        rt.unpatch(a)
        assert m_llama.apply_rotary_pos_emb is not original  # b still needs the dispatcher
        n = spy["n"]
        a(ids)
        assert spy["n"] == n  # a is back on transformers' code
        assert torch.equal(b(ids).logits, b_ref_patched)
        rt.unpatch(b)
    assert m_llama.apply_rotary_pos_emb is original


def test_garbage_collected_model_releases_dispatcher():
    model = _build("qwen2")
    modeling = _modeling(model)
    original = modeling.apply_rotary_pos_emb
    rt.patch(model)
    assert modeling.apply_rotary_pos_emb is not original
    del model
    gc.collect()
    assert modeling.apply_rotary_pos_emb is original


def test_context_manager_unpatches_on_error():
    model = _build("llama")
    with pytest.raises(KeyError):
        with rt.patched(model):
            raise KeyError("boom")
    assert not rt.is_patched(model) and m_llama.apply_rotary_pos_emb.__name__ == "apply_rotary_pos_emb"
    assert not hasattr(m_llama.apply_rotary_pos_emb, "_ropekit_original")


def test_report_and_registry():
    assert set(FAMILIES) <= set(rt.supported_model_types())
    model = _build("deepseek_v3")
    rep = rt.patch(model, tables="exact")
    try:
        assert rep.model_type == "deepseek_v3" and rep.backend in ropekit.backends.available()
        assert rep.rotary == ("model.rotary_emb",)
        assert rep.attention == ("model.layers.0.self_attn", "model.layers.1.self_attn")
        assert {f.rsplit(".", 1)[1] for f in rep.functions} == {"apply_rotary_pos_emb", "apply_rotary_pos_emb_interleave"}
    finally:
        rt.unpatch(model)


# --------------------------------------------------------------------------- errors
def test_errors():
    model = _build("llama")
    with pytest.raises(RopeError, match='tables in'):
        rt.patch(model, tables="float64")
    with pytest.raises(RopeError, match="not patched"):
        rt.unpatch(model)
    rt.patch(model)
    try:
        with pytest.raises(RopeError, match="already patched"):
            rt.patch(model)
    finally:
        rt.unpatch(model)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = T.AutoModelForCausalLM.from_config(T.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                               ffn_dim=32, num_attention_heads=2))  # fmt: skip
    with pytest.raises(RopeError, match="opt") as e:
        rt.patch(other)
    assert "no module calls one" in str(e.value)  # OPT has no RoPE: refused by what its code does
    with pytest.raises(RopeError, match="model_type"):
        rt.patch(torch.nn.Linear(2, 2))


def test_version_policy(monkeypatch):
    for bad in ("4.46.3", "4.56.2", "6.0.0", "nightly"):
        with pytest.raises(RopeError, match=r"transformers >= 4.57, < 6"):
            rt.check_transformers_version(bad)
    monkeypatch.setattr(rt, "_version_warned", False)
    with pytest.warns(rt.UntestedVersionWarning, match="5.99.0"):
        rt.check_transformers_version("5.99.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rt.check_transformers_version("5.99.1")  # once per process
        rt.check_transformers_version(rt.TESTED_VERSIONS[0] + ".0")
    import sys

    # transformers swaps its lazy module in sys.modules once models load: patch the live one
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.56.2")
    with pytest.raises(RopeError, match="4.56.2"):
        rt.patch(_build("llama"))


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_type="linear", factor=2.0),
        dict(rope_type="dynamic", factor=2.0),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8),
        dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=2.0, original_max_position_embeddings=8),
    ],
    ids=lambda p: p["rope_type"],
)
def test_llama_scaling_types_exact_tables(rope):
    """Exact tables of scaled Llama configs agree with transformers' up to float32 rounding,
    also past max_position_embeddings = 16 where dynamic NTK changes the base."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(**{**SMALL, "max_position_embeddings": 16}, **TOK, rope_parameters=dict(rope_theta=10000.0, **rope))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = T.AutoModelForCausalLM.from_config(cfg).eval()
    x, ids = torch.zeros(1), _ids(2, 40)
    pos = torch.arange(40)[None]
    with torch.no_grad():
        ref = model(ids).logits
        theirs = model.model.rotary_emb(x, pos)
        with rt.patched(model, tables="exact"):
            ours = model.model.rotary_emb(x, pos)
            out = model(ids).logits
        inv_tf = model.model.rotary_emb.inv_freq.double()  # transformers' float32 frequencies
    gap = max((a - b).abs().max().item() for a, b in zip(theirs, ours))
    # transformers rounds the (scaled) frequencies to float32: at position m <= 39 the angle
    # is off by m * |Δθ|, plus the float32 rounding of the angle m·θ (<= m·θ·2^-24) and of
    # cos/sin (a few ulps); both tables carry the same attention factor.
    inv64 = ropekit.RopeConfig.from_hf(cfg).inv_freq()
    af = model.model.rotary_emb.attention_scaling
    bound = af * (39 * (inv_tf - inv64).abs().max().item() + 39 * inv64.max().item() * 2**-24) + 4 * 2**-23
    assert gap <= bound
    torch.testing.assert_close(out, ref, rtol=0, atol=50 * gap + 1e-6)
