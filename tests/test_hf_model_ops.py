"""A patched transformers model still behaves like a model: deepcopy, pickle, torch.save /
torch.load, state_dict round trip, .to(dtype), generate() and torch.compile, each against the
unpatched model (tiny random Qwen3: q/k norms, so fuse_qk_norm is exercised; no weights).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ropekit.integrations import transformers as rt  # noqa: E402

CFG = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           head_dim=16, intermediate_size=64, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
           eos_token_id=2)  # fmt: skip
IDS = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**CFG)).eval()
    with torch.no_grad():  # norms that differ from 1, so that using the wrong ones shows
        for n, p in model.named_parameters():
            if n.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 2.0)
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(params=[False, True], ids=["plain", "fuse_qk_norm"])
def fuse(request):
    return request.param


def test_deepcopy_uses_the_copys_own_weights(fuse):
    model = _model()
    rt.patch(model, tables="transformers", fuse_qk_norm=fuse)
    twin = copy.deepcopy(model)
    with torch.no_grad():  # an EMA-style update of the copy only
        for n, p in twin.named_parameters():
            if "norm" in n or "proj" in n:
                p.mul_(0.9)
    want = _model()
    want.load_state_dict(twin.state_dict())
    assert torch.allclose(_logits(twin), _logits(want), atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(twin), _logits(model), atol=1e-3)
    assert rt.is_patched(model) and not rt.is_patched(twin)  # copies come out unpatched
    rt.patch(twin, tables="transformers", fuse_qk_norm=fuse)  # and can be patched again
    assert torch.allclose(_logits(twin), _logits(want), atol=1e-5, rtol=0)
    rt.unpatch(twin)
    rt.unpatch(model)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_and_torch_save_round_trip(how, fuse):
    model = _model()
    ref = _logits(model)
    rt.patch(model, fuse_qk_norm=fuse)
    patched = _logits(model)
    if how == "pickle":
        back = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
    assert torch.equal(_logits(back), ref)  # an unpatched model with the same weights
    rt.patch(back, fuse_qk_norm=fuse)
    assert torch.equal(_logits(back), patched)
    rt.unpatch(back)
    rt.unpatch(model)


def test_state_dict_round_trip_and_to_dtype():
    model = _model()
    ref = _logits(model)
    rt.patch(model)
    sd = model.state_dict()
    assert set(sd) == set(_model().state_dict())  # the patch adds no parameters or buffers
    fresh = _model(seed=1)
    rt.patch(fresh)
    fresh.load_state_dict(sd)
    assert torch.allclose(_logits(fresh), _logits(model), atol=0, rtol=0)
    assert torch.allclose(_logits(fresh), ref, atol=1e-5, rtol=0)
    fresh.to(torch.bfloat16)  # the exact tables follow the activations' dtype
    unpatched = _model()
    unpatched.load_state_dict(sd)
    unpatched.to(torch.bfloat16)
    got, want = _logits(fresh), _logits(unpatched)
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() <= 2 * (want.float() - ref).abs().max()
    rt.unpatch(fresh)
    rt.unpatch(model)


def test_generate_matches_the_unpatched_model(fuse):
    model = _model()
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(IDS, **kw)
        rt.patch(model, tables="transformers", fuse_qk_norm=fuse)
        got = model.generate(IDS, **kw)
    rt.unpatch(model)
    assert torch.equal(got, want)


def test_compile_fullgraph_matches_the_unpatched_model(monkeypatch):
    model = _model()
    ref = _logits(model)
    rt.patch(model, tables="transformers")
    traced = []
    inner = rt.apply_rotary
    monkeypatch.setattr(rt, "apply_rotary", lambda *a, **k: traced.append(1) or inner(*a, **k))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = compiled(IDS).logits
    rt.unpatch(model)
    torch._dynamo.reset()
    assert traced  # the graph holds ropekit's rotation, not transformers' function
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_of_a_fused_model_is_the_model_patched_without_fusion(dtype):
    """``torch.compile(fullgraph=True)`` of a model patched with ``fuse_qk_norm=True``: dynamo
    cannot trace the deferral of the norms (it raised the patch's "did not pass them to RoPE"
    RopeError), so a traced call runs the norms' own forwards and the plain RoPE replacement.
    Expected: the logits of the same model patched without fusion, eager, bit for bit
    (``aot_eager`` runs the same ops), and the eager fused model's within the dtype's rounding
    of the norm (transformers' norm rounds before its weight and after RoPE; the fused op once);
    eager calls after the compiled ones still fuse."""
    model = _model().to(dtype)
    kw = dict(input_ids=IDS)
    rt.patch(model)
    try:
        with torch.no_grad():
            plain = model(**kw).logits
    finally:
        rt.unpatch(model)
    report = rt.patch(model, fuse_qk_norm=True)
    assert report.fused
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            fused = model(**kw).logits
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
            got = compiled(**kw).logits
            again = model(**kw).logits
    finally:
        rt.unpatch(model)
        torch._dynamo.reset()
    assert torch.equal(got, plain), (got.float() - plain.float()).abs().max().item()
    assert torch.equal(again, fused)
    tol = 1e-5 if dtype == torch.float32 else 0.05
    assert (got.float() - fused.float()).abs().max().item() <= tol * fused.float().abs().max().item()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_exact_tables_is_the_eager_patched_model(backend, monkeypatch):
    """``tables="exact"`` (the default) under ``torch.compile(fullgraph=True)``: the eager path
    sizes a cached table by ``max(position_ids)``, a host read that dynamo cannot trace; while
    tracing, the rows are computed in the graph instead (float64 ``|m|·θ``, cos/sin, sine
    negated for m < 0, one rounding). Expected: the eager patched model's logits bit for bit
    (same ops, element for element), for plain ids, a left-padded batch with
    ``position_ids = cumsum - 1`` (-1 at the padded slots) and positions around 5000; and the
    unpatched model's within float32 rounding for the first two."""
    model = _model()
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0
    pos = mask.cumsum(-1) - 1
    calls = [dict(input_ids=IDS), dict(input_ids=IDS, attention_mask=mask, position_ids=pos),
             dict(input_ids=IDS, attention_mask=mask, position_ids=pos + 5000)]  # fmt: skip
    with torch.no_grad():
        ref = [model(**kw).logits for kw in calls[:2]]
    rt.patch(model)
    traced = []
    inner = rt._ExactTables._traced
    monkeypatch.setattr(rt._ExactTables, "_traced", lambda *a, **k: traced.append(1) or inner(*a, **k))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        with torch.no_grad():
            for i, kw in enumerate(calls):
                eager = model(**kw).logits
                got = compiled(**kw).logits
                assert torch.equal(got, eager), (i, (got - eager).abs().max().item())
                if i < len(ref):
                    assert torch.allclose(got, ref[i], atol=1e-5, rtol=0)
    finally:
        rt.unpatch(model)
        torch._dynamo.reset()
    assert traced  # the graph computed the exact tables itself
