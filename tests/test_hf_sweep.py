"""Every RoPE family of the installed transformers (tiny configs, no weights, no hub):
``RopeConfig.from_hf`` against the family's own code and the calls of a real forward,
``from_hf(path) == from_hf(config)``, and ``patch()`` proven (bit-identical logits, same
greedy tokens, exact unpatch) on every model that builds at the tiny size. The same sweep
is ``ropekit hf-sweep`` (about a minute on one core)."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) != 5:
    pytest.skip(f"needs transformers 5.x, found {transformers.__version__}", allow_module_level=True)

from ropekit import RopeConfig, RopeError  # noqa: E402
from ropekit.hf import rope_config_from_hf  # noqa: E402
from ropekit.integrations import hf_sweep as hs  # noqa: E402
from ropekit.integrations import transformers as rt  # noqa: E402

#: Must be built and proven: one of each kind of RoPE code (half/interleaved pairing,
#: partial rotary, MLA [nope | rope] heads, indexers, -θ, per-layer tables, M-RoPE,
#: GPT-J's (tensor, sin, cos), Llama 4's complex tables, repeat_interleave tables).
MODEL_SUBSET = [
    "llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "granite", "cohere",
    "cohere2", "glm", "glm4", "stablelm", "falcon", "starcoder2", "olmo2", "gpt_neox", "gptj", "codegen",
    "qwen2_vl", "deepseek_v3", "deepseek_v32", "mistral4", "glm_moe_dsa", "nanochat", "llama4_text", "helium",
    "ernie4_5", "exaone4", "smollm3", "mixtral", "qwen3_moe",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def rows():
    return hs.sweep(models=True, generate=True)


@pytest.fixture(scope="module")
def config_rows(rows):
    return rows


def test_config_sweep_every_family(config_rows):
    """from_hf is exact (code check: the model's function with its own tables equals
    ropekit's rotation bit for bit) or refused by name, never wrong; path == object."""
    rows = config_rows
    assert len(rows) > 150  # every model type with a 1-D rotary class
    wrong = [(r.model_type, r.detail) for r in rows if r.config == "wrong"]
    assert not wrong, wrong
    refused = [r for r in rows if r.config == "refused"]
    assert all("RopeError" in r.detail for r in refused)
    differs = [(r.model_type, r.detail) for r in rows if r.path_equal is False]
    assert not differs, differs
    exact = {r.family for r in rows if r.config == "exact"}
    assert len(exact) >= 120
    # with scaled rope parameters (linear, dynamic): the model's rotation or a RopeError
    scaled_wrong = [(r.model_type, r.scaled_detail) for r in rows if r.scaled == "wrong"]
    assert not scaled_wrong, scaled_wrong
    assert sum(r.scaled == "exact" for r in rows) >= 200


def test_sweep_table_renders(config_rows):
    table = hs.format_table(config_rows[:5])
    assert table.startswith("| model_type | family | config |") and len(table.splitlines()) == 7
    s = hs.summary(config_rows)
    assert s["model_types"] == len(config_rows) and s["config_wrong_model_types"] == 0


def test_patch_sweep_every_built_model(rows):
    """patch(tables="transformers"): bit-identical logits, identical greedy tokens and an
    exact unpatch wherever it patches; a refusal is a RopeError; never a wrong patch."""
    wrong = [(r.model_type, r.patch_detail) for r in rows if r.patch == "wrong"]
    assert not wrong, wrong
    proven = [r for r in rows if r.patch == "proven"]
    assert all(r.logits and r.generate in (True, None) for r in proven)
    assert all("RopeError" in r.patch_detail for r in rows if r.patch == "refused")
    assert len({r.family for r in proven}) >= 100
    # ropekit's exact tables: proven (logits within float32 rounding times the tiny network's
    # gain) or refused with the reason (multi-axis tables ropekit cannot rebuild)
    exact = [r for r in proven if r.exact.startswith("proven")]
    assert all(r.exact.startswith(("proven", "refused: ")) for r in proven)
    assert all(float(r.exact.rsplit(" ", 1)[1]) <= 1e-5 for r in exact), [r.exact for r in exact]
    assert len({r.family for r in exact}) >= 100
    assert not rt._INSTALLED


@pytest.mark.parametrize("mt", MODEL_SUBSET)
def test_patch_proven(rows, mt):
    row = next(r for r in rows if r.model_type == mt)
    assert row.config == "exact", (mt, row.detail)
    assert row.checked == "code+run", (mt, row.detail)  # the real forward's calls agree too
    assert row.patch == "proven" and row.logits, (mt, row.patch_detail)
    if mt not in ("qwen2_vl", "mistral4"):  # no AutoModelForCausalLM for these tiny configs
        assert row.generate is True, mt


# ----------------------------------------------------------------- what from_hf reads from the code
def _cfg(mt):
    return hs.tiny_config(mt)


def test_mla_head_slice_and_width():
    ds = rope_config_from_hf(transformers.DeepseekV3Config())
    assert (ds.head_dim, ds.rotary_dim, ds.rotary_offset, ds.layout) == (192, 64, 128, "interleaved")
    assert ds.rotary_slice == slice(128, 192)
    m4 = rope_config_from_hf(transformers.Mistral4Config())  # partial_rotary_factor relative to the 128 head
    assert (m4.head_dim, m4.rotary_dim, m4.rotary_offset) == (128, 64, 64)
    assert rope_config_from_hf(transformers.DeepseekV3Config(rope_interleave=False)).layout == "half"


def test_components_deepseek_v32():
    both = rope_config_from_hf(transformers.DeepseekV32Config())
    assert set(both) == {"attention", "indexer"}
    assert (both["attention"].layout, both["attention"].head_dim, both["attention"].rotary_offset) == (
        "interleaved", 192, 128,
    )  # fmt: skip
    idx = rope_config_from_hf(transformers.DeepseekV32Config(), component="indexer")
    assert (idx.layout, idx.head_dim, idx.rotary_dim, idx.rotary_offset) == ("half", 128, 64, 0)
    with pytest.raises(RopeError, match="component"):
        rope_config_from_hf(transformers.LlamaConfig(), component="indexer")
    with pytest.raises(RopeError, match="component None or one of"):
        rope_config_from_hf(transformers.LlamaConfig(), component="vision")


def test_direction_nanochat():
    cfg = rope_config_from_hf(_cfg("nanochat"))
    assert cfg.direction == -1 and cfg.layout == "half"
    assert rope_config_from_hf(_cfg("llama")).direction == 1


def test_read_code_false_uses_config_rules_only():
    d = transformers.DeepseekV3Config().to_dict()
    cfg = rope_config_from_hf(d, read_code=False)
    assert (cfg.head_dim, cfg.rotary_offset, cfg.layout) == (192, 128, "interleaved")  # fallback rules
    assert rope_config_from_hf(_cfg("nanochat").to_dict(), read_code=False).direction == 1  # needs the code


def test_odd_partial_rotary_is_refused_by_name():
    with pytest.raises(RopeError, match="odd|even rotary dim") as e:
        rope_config_from_hf({"hidden_size": 64, "num_attention_heads": 8, "partial_rotary_factor": 0.9}, read_code=False)
    assert "int(8 * 0.9) = 7" in str(e.value)


def test_rope_config_new_fields_validated_and_serialised():
    cfg = RopeConfig(192, rotary_dim=64, rotary_offset=128, layout="interleaved", direction=-1)
    assert RopeConfig.from_dict(cfg.to_dict()) == cfg
    assert "rotary_offset" not in RopeConfig(64).to_dict()  # defaults keep the short form
    with pytest.raises(RopeError, match="rotary_offset"):
        RopeConfig(192, rotary_dim=64, rotary_offset=129)
    with pytest.raises(RopeError, match="direction"):
        RopeConfig(64, direction=0)


# ----------------------------------------------------------------- patch refuses, changes nothing
def test_patch_refused_when_the_proof_fails_deepseek_v2():
    """DeepSeek-V2 multiplies complex numbers: the rounding differs from ropekit's rotation,
    so the proof fails and the model is left as it was."""
    cfg = hs.tiny_config("deepseek_v2")
    model, _, _ = hs._build("deepseek_v2", cfg)
    with pytest.raises(RopeError, match="deepseek_v2: max \\|difference\\|"):
        rt.patch(model, tables="transformers")
    assert not rt.is_patched(model) and not rt._INSTALLED
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_patch_refuses_a_function_that_is_not_rope(monkeypatch):
    from transformers.models.llama import modeling_llama as m

    model, _, _ = hs._build("llama", hs.tiny_config("llama"))
    original = m.apply_rotary_pos_emb

    def skewed(q, k, cos, sin, unsqueeze_dim=1):  # RoPE on q, but k is scaled
        qe, ke = original(q, k, cos, sin, unsqueeze_dim)
        return qe, ke * 1.5

    monkeypatch.setattr(m, "apply_rotary_pos_emb", skewed)
    with pytest.raises(RopeError, match="llama") as e:
        rt.patch(model)
    assert "difference" in str(e.value) and not rt._INSTALLED
    assert m.apply_rotary_pos_emb is skewed


def test_patch_plans_describe_the_measurement():
    model, _, _ = hs._build("nanochat", hs.tiny_config("nanochat"))
    ids = torch.randint(3, 100, (1, 9))
    with torch.no_grad():
        ref = model(ids).logits
        with rt.patched(model, tables="transformers") as rep:
            assert rep.plans == ("apply_rotary_pos_emb (half, -θ, all)",)
            assert torch.equal(model(ids).logits, ref)
        with rt.patched(model, tables="exact") as rep:
            out = model(ids).logits
            assert rep.rotary
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_supported_model_types_read_from_code():
    mts = rt.supported_model_types()
    assert {"llama", "internlm3", "exaone", "deepseek_v2", "cohere", "gptj"} & set(mts) >= {"llama", "cohere", "gptj"}
    assert len(mts) >= 150


def test_import_ropekit_does_not_import_transformers():
    import subprocess

    code = "import sys, ropekit; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
