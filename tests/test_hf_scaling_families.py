"""``RopeConfig.from_hf`` on configs with scaled rope parameters (``rope_scaling`` /
``rope_parameters`` with a ``rope_type``) for families whose own code does not apply them the
way transformers' rope functions do: it ignores them (GPT-J, CodeGen, ESM; Nemotron on 4.x),
refuses them (Ernie 4.5 VL), or computes other tables (Phi-3.5-MoE's per-length attention
scales); and Phi-3 LongRoPE with ``max_position_embeddings`` below the original context.

Each answer is compared with the family's own code on a tiny config built from its config class
(never weights): the model's RoPE function fed basis vectors with the model's own tables must
equal the rotation ropekit's config describes, bit for bit (``hf_sweep._static_check``, as the
sweep does), or ``from_hf`` must raise a RopeError. Runs under any installed transformers; a
family the installed version lacks is skipped."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ropekit import RopeError, _hf_code, _hf_table  # noqa: E402
from ropekit import hf as rhf  # noqa: E402
from ropekit.hf import rope_config_from_hf, transformers_cos_sin  # noqa: E402
from ropekit.integrations import hf_sweep as hs  # noqa: E402
from _hf_util import need as _need, quiet_transformers  # noqa: E402,F401 (an autouse fixture)

V4 = transformers.__version__.startswith("4.")
LINEAR = {"rope_type": "linear", "factor": 2.0}
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}


def _scaled(model_type: str, rope: dict, **top):
    """The sweep's tiny config of ``model_type`` with scaled rope parameters, through the config
    class as a config.json would go (5.x: merged into ``rope_parameters``, per layer type when
    nested; 4.x: ``rope_scaling`` with the ``type`` alias), plus top-level keys ``top``."""
    _need(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = hs.tiny_config(model_type)
        d = base.to_dict()
        text = d["text_config"] if hs._text(base) is not base else d
        if not V4:
            rp = text.get("rope_parameters") or {}
            strip = lambda p: {k: v for k, v in p.items() if k not in ("rope_type", "type")}  # noqa: E731
            if rp and all(isinstance(v, dict) or v is None for v in rp.values()):
                text["rope_parameters"] = {lt: None if p is None else dict(strip(p), **rope) for lt, p in rp.items()}
            else:
                text["rope_parameters"] = dict(strip(rp), **rope)
        else:
            text["rope_scaling"] = dict(rope, type=rope["rope_type"])
        text.update(top)
        try:
            return type(base).from_dict(copy.deepcopy(d))
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"{model_type}'s config class refuses it: {type(e).__name__}: {str(e)[:120]}")


def _from_hf(obj):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = rope_config_from_hf(obj)
    return got, [x for x in w if x.category.__name__ == "IgnoredScalingWarning"]


def _assert_the_models_rotation(cfg, result) -> None:
    """from_hf's rotation equals the family's own function with its own tables, bit for bit
    (float32 cos/sin rounding of another routine allowed, as the sweep allows)."""
    text = hs._text(cfg)
    diff = hs._static_check(text, hs._flat(result))
    assert diff is None or diff.startswith(("ROUNDING ", "LAYERS ")), diff


def _same_from_files(cfg, result, tmp_path) -> None:
    """The config's dict, its diff dict and its saved config.json give the same answer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg.save_pretrained(tmp_path)
        assert rope_config_from_hf(tmp_path) == result
        assert rope_config_from_hf(cfg.to_dict()) == result
        assert rope_config_from_hf(dict(cfg.to_diff_dict(), model_type=cfg.model_type)) == result


# ----------------------------------------------------------------- families that ignore the scaling
def _sinusoid_family_check(mt, cfg, result) -> None:
    """4.x GPT-J / CodeGen have no rotary class: their tables are create_sinusoidal_positions."""
    module = _hf_code.modeling_module_for(mt)
    if _hf_code.rotary_classes(module):
        _assert_the_models_rotation(cfg, result)
        return
    n = 9
    sincos = module.create_sinusoidal_positions(n, cfg.rotary_dim)  # [n, r]: cat(sin, cos)
    sin, cos = torch.chunk(sincos, 2, dim=-1)
    c, s = transformers_cos_sin(result, torch.arange(n))
    assert torch.equal(c, cos) and torch.equal(s, sin)


@pytest.mark.parametrize("rope", [LINEAR, DYNAMIC], ids=["linear", "dynamic"])
@pytest.mark.parametrize("mt", ["gptj", "codegen"])
def test_gptj_codegen_ignore_the_scaling(mt, rope, tmp_path):
    """GPT-J and CodeGen compute their sinusoids from the rotary width and base 10000 alone
    (create_sinusoidal_positions): a rope scaling in the config changes nothing in the model, so
    from_hf returns the unscaled RoPE, with an IgnoredScalingWarning."""
    cfg = _scaled(mt, rope)
    result, said = _from_hf(cfg)
    assert result.scaling is None, result
    assert said and "ignores" in str(said[0].message)
    _sinusoid_family_check(mt, cfg, result)
    _same_from_files(cfg, result, tmp_path)


@pytest.mark.parametrize("rope", [LINEAR, DYNAMIC], ids=["linear", "dynamic"])
def test_esm_ignores_the_scaling(rope, tmp_path):
    """ESM's rotary module computes the default RoPE whatever the config's rope type (5.x:
    compute_default_rope_parameters only; 4.x: RotaryEmbedding(head_dim), base 10000)."""
    cfg = _scaled("esm", rope, max_position_embeddings=4)  # dynamic: scaled past 4 positions if applied
    result, said = _from_hf(cfg)
    assert result.scaling is None, result
    assert said
    module = _hf_code.modeling_module_for("esm")
    if _hf_code.derive(cfg, "esm"):  # 5.x: the function with the model's own tables
        _assert_the_models_rotation(cfg, result)
    else:  # 4.x: the attention builds RotaryEmbedding(dim=head_dim) itself (no call site from_hf reads)
        inv = module.RotaryEmbedding(result.head_dim).inv_freq
        assert torch.equal(rhf.transformers_inv_freq(result), inv.float())
    _same_from_files(cfg, result, tmp_path)


@pytest.mark.parametrize("rope", [LINEAR, DYNAMIC], ids=["linear", "dynamic"])
def test_nemotron_scaling_as_the_installed_code_applies_it(rope, tmp_path):
    """transformers 4.x's NemotronRotaryEmbedding hard-codes rope_type "default" (rope_scaling is
    ignored); 5.x applies rope_parameters. from_hf gives the installed version's rotation."""
    cfg = _scaled("nemotron", rope, max_position_embeddings=4)
    result, said = _from_hf(cfg)
    if V4:
        assert result.scaling is None and said, result
    else:
        assert result.scaling is not None and not said, result
    _assert_the_models_rotation(cfg, result)
    _same_from_files(cfg, result, tmp_path)


# ----------------------------------------------------------------- families that refuse or differ
def test_ernie_vl_refuses_scaled_rope_types():
    """Ernie 4.5 VL's text rotary module raises for any rope type but default: no model has
    such a config, so from_hf refuses it (it returned a scaled RoPE before)."""
    _need("ernie4_5_vl_moe")
    for rope in (LINEAR, DYNAMIC):
        cfg = _scaled("ernie4_5_vl_moe", rope)
        rot = _hf_code.rotary_classes(_hf_code.modeling_module_for("ernie4_5_vl_moe"))[0]
        with pytest.raises(ValueError, match="requires the `default` rope type"):
            rot(config=hs._text(cfg))  # the family's own module refuses it
        for obj in (cfg, cfg.to_dict()):
            with pytest.raises(RopeError, match="requires the `default` rope type"):
                rope_config_from_hf(obj)
    assert isinstance(rope_config_from_hf(hs.tiny_config("ernie4_5_vl_moe")), rhf.RopeConfig)  # default: answered


def test_phimoe_scaled_tables_use_its_own_attention_scales():
    """Phi-3.5-MoE's rotary module multiplies its tables by short_mscale / long_mscale instead of
    the scheme's attention factor: no RopeConfig rule gives that, so from_hf refuses scaled
    Phi-MoE configs (it returned the scheme with attention factor 1 before: tables 25% off)."""
    _need("phimoe")
    if V4:
        pytest.skip("transformers 4.x Phi-MoE: from_hf reads no RoPE call of its code (config rules)")
    extra = {"short_mscale": 1.25, "long_mscale": 1.25, "original_max_position_embeddings": 256}
    for rope in (LINEAR, DYNAMIC):
        cfg = _scaled("phimoe", dict(rope, **extra), max_position_embeddings=4)
        rot = _hf_code.rotary_classes(_hf_code.modeling_module_for("phimoe"))[0](config=cfg)
        cos, _ = _hf_code.module_tables(rot, 7, config=cfg)
        assert torch.allclose(cos[0, 0], torch.full_like(cos[0, 0], 1.25))  # the model's scale at position 0
        with pytest.raises(RopeError, match="phimoe"):
            rope_config_from_hf(cfg)


# ----------------------------------------------------------------- Phi-3 LongRoPE, context below the original
def _longrope_phi3(max_pos: int, orig: int):
    _need("phi3")
    n = 8  # head 16: 8 pairs
    rope = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(n)],
            "long_factor": [2.0 + 0.3 * i for i in range(n)]}  # fmt: skip
    kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=64,
              vocab_size=128, max_position_embeddings=max_pos, original_max_position_embeddings=orig,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    if V4:
        kw["rope_scaling"] = dict({"type": "longrope"}, **{k: v for k, v in rope.items() if k != "rope_type"})
    else:
        kw["rope_parameters"] = rope
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.Phi3Config(**kw)


@pytest.mark.parametrize("max_pos,orig", [(32, 64), (48, 64), (64, 64)])
def test_phi3_longrope_context_below_the_original(max_pos, orig, tmp_path):
    """transformers takes factor = max_position_embeddings / original (0.5 here) and, for any
    factor <= 1, attention factor 1; the short/long switch is at the original context. from_hf
    refused factor < 1; it now returns LongRoPE with factor 1 (the same attention factor), and
    the tables equal the model's below and past the switch."""
    from ropekit.scaling import LongRoPE

    cfg = _longrope_phi3(max_pos, orig)
    rot = _hf_code.rotary_classes(_hf_code.modeling_module_for("phi3"))[0](config=cfg)
    result = rope_config_from_hf(cfg)
    assert isinstance(result.scaling, LongRoPE) and result.scaling.original_max_position == orig
    assert result.attention_factor == rot.attention_scaling == 1.0
    for n in (20, orig, orig + 6):  # short factors, at the switch, long factors
        pos = torch.arange(n)
        with torch.no_grad():
            cos_t, sin_t = rot(torch.zeros(1), pos[None])
        c, s = transformers_cos_sin(result, pos, seq_len=n)
        half = c.shape[-1]
        assert torch.equal(cos_t[0, :, :half], c) and torch.equal(sin_t[0, :, :half], s), n
    _assert_the_models_rotation(cfg, result)
    _same_from_files(cfg, result, tmp_path)


# ----------------------------------------------------------------- the sweep and the table
def test_sweep_flags_a_scaling_the_code_ignores(monkeypatch):
    """The sweep's scaled check (Row.scaled) compares from_hf of the tiny config with linear /
    dynamic scaling against the family's code: exact for GPT-J now (the scaling dropped, as the
    code does); with the family table's fact forced to "applied" (the old answer) it is wrong, and
    counts as a wrong config in the summary (hf-sweep exits 1, CI fails)."""
    _need("gptj")
    if V4:
        pytest.skip("transformers 4.x GPT-J has no rotary class: not in the sweep")
    row = hs.check("gptj", models=False)
    assert row.config == "exact" and row.scaled == "exact", row
    assert "linear exact, scaling ignored by the code" in row.scaled_detail
    version = _hf_table.installed_version()
    table_row = _hf_table.row("gptj", version)
    if version not in table_row["verified"]:
        pytest.skip(f"the family table has no gptj row verified against {version}")
    monkeypatch.setitem(table_row, "scaling", "applied")
    bad = hs.check("gptj", models=False)
    assert bad.config == "exact" and bad.scaled == "wrong", bad
    assert "linear wrong" in bad.scaled_detail
    s = hs.summary([row, bad])
    assert s["scaled_wrong_model_types"] == 1 and s["config_wrong_model_types"] == 1


def test_table_rows_state_the_scaling_fact():
    """The family table says, per row the sweep verified against the installed transformers, what
    the family's code does with a scaled rope type."""
    version = _hf_table.installed_version()
    want = {"gptj": "ignored", "codegen": "ignored", "esm": "ignored", "llama": "applied",
            "nemotron": "ignored" if V4 else "applied"}  # fmt: skip
    for mt, fact in want.items():
        r = _hf_table.row(mt, version)
        if r is None or version not in r["verified"]:
            continue  # no row for this version (4.x GPT-J / CodeGen: no rotary class)
        assert r.get("scaling") == fact, (mt, r.get("scaling"))
    r = _hf_table.row("ernie4_5_vl_moe_text", version)
    if r is not None and version in r["verified"]:
        assert r["scaling"]["linear"].startswith("refused: ") and "default` rope type" in r["scaling"]["linear"]


def test_ignored_scaling_answered_from_the_table_without_transformers(tmp_path):
    """A GPT-J config.json with rope_scaling: the family table's row answers (unscaled, with the
    warning) without importing transformers."""
    version = _hf_table.installed_version()
    r = _hf_table.row("gptj", version)
    if r is None or version not in r["verified"]:
        pytest.skip(f"no gptj row verified against transformers {version}")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gptj", "n_embd": 4096, "n_head": 16, "rotary_dim": 64,
                                "n_positions": 2048, "rope_scaling": {"type": "linear", "factor": 4.0}}))  # fmt: skip
    code = (
        "import sys, warnings, ropekit\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    c = ropekit.RopeConfig.from_hf(sys.argv[1])\n"
        "print(c.scaling, c.rotary_dim, 'transformers' in sys.modules, [x.category.__name__ for x in w])\n"
    )
    env = dict(os.environ, ROPEKIT_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["None", "64", "False", "['IgnoredScalingWarning']"]


def test_unverified_version_checks_scaled_inputs_once(tmp_path, monkeypatch):
    """With a transformers version the row was not verified against, a scaled input is checked
    against the code once (its own verdict key: another version's code may treat the scaling
    differently, as Nemotron does between 4.x and 5.x), whatever an unscaled input found."""
    _need("gptj")
    monkeypatch.setenv("ROPEKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_hf_table, "_MEMO", {})
    real = _hf_table.installed_version()
    monkeypatch.setattr(_hf_table, "installed_version", lambda: "9.9.9")
    plain = hs.tiny_config("gptj")
    rope_config_from_hf(plain)
    cached = json.loads(open(_hf_table.cache_path("9.9.9")).read())
    assert cached == {"gptj": "same"}
    cfg = _scaled("gptj", LINEAR)
    for _ in range(2):  # the check, then the cached verdict
        result, said = _from_hf(cfg)
        assert result.scaling is None and said
    cached = json.loads(open(_hf_table.cache_path("9.9.9")).read())
    assert cached == {"gptj": "same", "gptj+scaled": "same"}, (cached, real)


def test_llama4_llama3_scaling_answered_by_the_code():
    """transformers 4.57's Llama 4 reads any rope_scaling as llama3 (linear / dynamic crash its
    rotary module: the table row refuses those types only); a real llama3 config is answered
    (by the code, on 4.57) with the model's rotation."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 4}  # fmt: skip
    cfg = _scaled("llama4_text", rope)
    result, said = _from_hf(cfg)
    assert result.scaling is not None and type(result.scaling).__name__ == "Llama3" and not said
    _assert_the_models_rotation(cfg, result)
    if V4:
        with pytest.raises(RopeError, match="low_freq_factor"):
            rope_config_from_hf(_scaled("llama4_text", LINEAR))
