"""``RopeConfig.from_hf`` on configs with a RoPE base (``rope_theta``, ``rope_parameters["rope_theta"]``,
``rotary_emb_base``) other than the config class default, for families whose own code ignores it:
GPT-J and CodeGen compute their sinusoids from a hard-coded 10000 (``create_sinusoidal_positions``),
as ESM (``RotaryEmbedding(dim)``) and IDEFICS (``IdeficsEmbedding(head_dim)``, ``base=10000``) do
on transformers 4.x. ``from_hf`` returns the base the model computes with and says so with an
``IgnoredBaseWarning``; every other family reads the config's base, and ``from_hf`` must too.

Each answer is compared with the family's own code on a tiny config built from its config class
(never weights): the model's RoPE function fed basis vectors with the model's own tables must equal
the rotation ropekit's config describes, bit for bit (``hf_sweep._static_check``, as the sweep
does), and tiny models built from the config must hand their RoPE function the tables of
``transformers_cos_sin(from_hf(config))`` in float32 and in bfloat16.

:func:`base_check` is the sweep's base check: ``.ci/sweep-transformers`` runs
``test_every_family_reads_the_base_as_its_code`` with ``ROPEKIT_BASE_SWEEP=all`` (every family of
the installed transformers; by default a subset). Runs under any installed transformers; a family
the installed version lacks is skipped."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ropekit import RopeError, _hf_code, _hf_table  # noqa: E402
from ropekit import hf as rhf  # noqa: E402
from ropekit.hf import rope_config_from_hf, transformers_cos_sin  # noqa: E402
from ropekit.integrations import hf_sweep as hs  # noqa: E402
from _hf_util import need as _need, quiet_transformers  # noqa: E402,F401 (an autouse fixture)

V4 = transformers.__version__.startswith("4.")
THETA = 30000.0  # 3x the default of every family below: no family's own constant
LINEAR = {"rope_type": "linear", "factor": 2.0}


#: Top-level config keys that state a RoPE base (4.x names; ModernBERT's global / local bases).
BASE_KEYS = ("rope_theta", "rotary_emb_base", "rope_local_base_freq", "global_rope_theta", "local_rope_theta")


def rebased(cfg: Any, factor: float = 3.0, scaling: Optional[Dict[str, Any]] = None, **top: Any) -> Any:
    """``cfg`` (the sweep's tiny config) with every RoPE base its language model states multiplied
    by ``factor`` (5.x: in ``rope_parameters``, per layer type when nested; 4.x: :data:`BASE_KEYS`),
    or ``rope_theta = 10000 * factor`` where it states none (a GPT-J config.json that sets one),
    through the config class as a config.json would go (a class that does not take its own
    ``to_dict()`` back, 4.57's DBRX: set on a copy of the object); ``scaling``: rope parameters
    merged in too (4.x: ``rope_scaling``)."""
    d = cfg.to_dict()
    text = d["text_config"] if hs._text(cfg) is not cfg else d
    keys = set(text)
    stated = False
    rp = text.get("rope_parameters")
    if isinstance(rp, dict) and rp:
        nested = all(isinstance(v, dict) or v is None for v in rp.values())
        for p in [v for v in rp.values() if isinstance(v, dict)] if nested else [rp]:
            p["rope_theta"] = float(p.get("rope_theta") or 10000.0) * factor
            stated = True
            if scaling is not None:
                p.pop("type", None)
                p.update(scaling)
    elif scaling is not None:
        if V4:
            text["rope_scaling"] = dict(scaling, type=scaling["rope_type"])
        else:
            text["rope_parameters"] = dict(scaling, rope_theta=float(text.get("rope_theta") or 10000.0) * factor)
            stated = True
    for k in BASE_KEYS:
        if text.get(k) is not None:
            text[k] = float(text[k]) * factor
            stated = True
    if not stated:
        text["rope_theta"] = 10000.0 * factor
    text.update(top)
    try:
        return type(cfg).from_dict(d)
    except Exception:
        if scaling is not None or top:
            raise
    out = copy.deepcopy(cfg)
    target = hs._text(out)
    for k, v in text.items():
        if (k == "rope_parameters" or k in BASE_KEYS) and (k in keys or k == "rope_theta"):
            object.__setattr__(target, k, v)
    return out


def _tiny(model_type: str, **top: Any) -> Any:
    _need(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hs.tiny_config(model_type, **top) if top else hs.tiny_config(model_type)


def _from_hf(obj: Any, **kw: Any) -> Tuple[Any, List[str]]:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = rope_config_from_hf(obj, **kw)
    return got, [str(x.category.__name__) + ": " + str(x.message) for x in w if "Ignored" in x.category.__name__]


def _said(msgs: List[str], kind: str) -> List[str]:
    return [m for m in msgs if m.startswith(kind + ":")]


def _assert_the_models_rotation(cfg: Any, result: Any) -> None:
    text = hs._text(cfg)
    diff = hs._static_check(text, hs._flat(result))
    assert diff is None or diff.startswith(("ROUNDING ", "LAYERS ")), diff


def _same_from_files(cfg: Any, result: Any, tmp_path) -> None:
    """The config's dict, its diff dict and its saved config.json give the same answer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg.save_pretrained(tmp_path)
        assert rope_config_from_hf(tmp_path) == result
        assert rope_config_from_hf(cfg.to_dict()) == result
        assert rope_config_from_hf(dict(cfg.to_diff_dict(), model_type=cfg.model_type)) == result


# ----------------------------------------------------------------- the families whose code ignores the base
@pytest.mark.parametrize("mt", ["gptj", "codegen"])
def test_gptj_codegen_ignore_the_base(mt, tmp_path):
    """GPT-J and CodeGen compute their sinusoids from the rotary width and a hard-coded 10000
    (create_sinusoidal_positions, every transformers version): a rope_theta in the config changes
    nothing in the model, so from_hf returns base 10000, with an IgnoredBaseWarning (it returned
    the config's 30000 before: tables off by up to 0.17 at 7 positions)."""
    cfg = rebased(_tiny(mt))
    assert getattr(cfg, "rope_theta", None) == THETA
    result, said = _from_hf(cfg)
    assert result.base == 10000.0, result
    assert _said(said, "IgnoredBaseWarning") and "ignores" in said[0] and "30000" in said[0], said
    module = _hf_code.modeling_module_for(mt)
    if _hf_code.rotary_classes(module):
        _assert_the_models_rotation(cfg, result)
    else:  # 4.x: no rotary class, the attention indexes create_sinusoidal_positions' table
        sin, cos = torch.chunk(module.create_sinusoidal_positions(9, result.rotary_dim), 2, dim=-1)
        c, s = transformers_cos_sin(result, torch.arange(9))
        assert torch.equal(c, cos) and torch.equal(s, sin)
    _same_from_files(cfg, result, tmp_path)


@pytest.mark.parametrize("mt", ["gptj", "codegen"])
def test_scaling_and_base_both_ignored(mt):
    """A GPT-J config with linear scaling and another base: the model computes neither; from_hf
    returns the unscaled base-10000 RoPE with both warnings (the measured scaling effect is
    decided after the base, so it is not mistaken for "other tables")."""
    cfg = rebased(_tiny(mt), scaling=LINEAR)
    result, said = _from_hf(cfg)
    assert result.scaling is None and result.base == 10000.0, result
    assert _said(said, "IgnoredBaseWarning") and _said(said, "IgnoredScalingWarning"), said
    if _hf_code.rotary_classes(_hf_code.modeling_module_for(mt)):
        _assert_the_models_rotation(cfg, result)


def test_esm_base_as_the_installed_code_computes_it(tmp_path):
    """transformers 4.x ESM builds RotaryEmbedding(dim=head_dim) in each attention, base 10000
    hard-coded (modeling_esm.py: ``10000 ** (torch.arange(...``); 5.x reads config.rope_theta."""
    cfg = rebased(_tiny("esm", position_embedding_type="rotary"))
    result, said = _from_hf(cfg)
    module = _hf_code.modeling_module_for("esm")
    if V4:
        assert result.base == 10000.0 and _said(said, "IgnoredBaseWarning"), (result, said)
        inv = module.RotaryEmbedding(result.head_dim).inv_freq
        assert torch.equal(rhf.transformers_inv_freq(result), inv.float())
    else:
        assert result.base == THETA and not _said(said, "IgnoredBaseWarning"), (result, said)
        _assert_the_models_rotation(cfg, result)
    _same_from_files(cfg, result, tmp_path)


def test_idefics_base_as_the_installed_code_computes_it():
    """transformers 4.x IDEFICS builds IdeficsEmbedding(self.head_dim) (``base=10000``, the
    parameter's default: no config value reaches it); 5.x reads rope_parameters."""
    cfg = rebased(_tiny("idefics"))
    result, said = _from_hf(cfg)
    module = _hf_code.modeling_module_for("idefics")
    if V4:
        assert result.base == 10000.0 and _said(said, "IgnoredBaseWarning"), (result, said)
        inv = module.IdeficsEmbedding(result.head_dim).inv_freq
        assert torch.equal(rhf.transformers_inv_freq(result), inv.float())
    else:
        assert result.base == THETA and not _said(said, "IgnoredBaseWarning"), (result, said)
        _assert_the_models_rotation(cfg, result)


@pytest.mark.parametrize("mt", ["llama", "nemotron", "gpt_neox", "gemma3_text", "qwen2"])
def test_families_that_read_the_base(mt, tmp_path):
    """Families whose code reads the config's base (by transformers' rope functions, their own
    compute_default_rope_parameters, GPT-NeoX's rotary_emb_base, Gemma 3's per-layer-type bases;
    Nemotron on 4.x too, which ignores its rope_scaling): from_hf follows it, silently."""
    plain = _tiny(mt)
    cfg = rebased(plain)
    result, said = _from_hf(cfg)
    assert not said, said
    before = hs._flat(rope_config_from_hf(plain))
    after = hs._flat(result)
    assert all(after[k].base == 3.0 * before[k].base for k in before if before[k] is not None), (before, after)
    _assert_the_models_rotation(cfg, result)
    _same_from_files(cfg, result, tmp_path)


def test_source_reading():
    """The modeling code's own say: which modules never read the config's base, and the
    constant they compute with."""
    for mt in ("gptj", "codegen"):
        module = _hf_code.modeling_module_for(mt)
        assert _hf_code.reads_base(module) is False and _hf_code.coded_base(module) == 10000.0, mt
    for mt in ("esm", "idefics"):
        module = _hf_code.modeling_module_for(mt)
        assert _hf_code.reads_base(module) is (not V4), mt
        if V4:
            assert _hf_code.coded_base(module) == 10000.0, mt
    for mt in ("llama", "nemotron", "gpt_neox", "gemma3_text"):
        assert _hf_code.reads_base(_hf_code.modeling_module_for(mt)) is True, mt


def test_measured_when_the_source_names_a_base(monkeypatch):
    """A module that names a base but computes with a constant is caught by measuring its rotary
    module (here GPT-J's, with the source reading switched off): same answer, same warning."""
    _need("gptj")
    if V4:
        pytest.skip("transformers 4.x GPT-J has no rotary class to measure")
    monkeypatch.setattr(_hf_code, "reads_base", lambda module: True)
    result, said = _from_hf(rebased(_tiny("gptj")), component="attention")
    monkeypatch.undo()
    assert result.base == 10000.0 and _said(said, "IgnoredBaseWarning"), (result, said)
    assert "rotary module computes the tables of base 10000" in said[0]


def test_overrides_and_config_rules_keep_the_base():
    """An explicit base= is kept as given (no warning); read_code=False reads the config alone."""
    cfg = rebased(_tiny("gptj"))
    result, said = _from_hf(cfg, base=THETA)
    assert result.base == THETA and not _said(said, "IgnoredBaseWarning"), said
    assert rope_config_from_hf(cfg.to_dict(), read_code=False).base == THETA


# ----------------------------------------------------------------- tiny models, float32 and bfloat16
def _forward_tables(model: torch.nn.Module, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Any]:
    """(cos, sin, measured) of the first RoPE call of a forward: the tables the model's RoPE
    function receives, at positions 0..S-1, read at the table lane of each pair."""
    calls: list = []
    with hs._recording(model, calls):
        hs._run(model, ids)
    caller, fname, fn, args, layer = calls[0]
    kind = _hf_code.signature_kind(fn)
    names = list(args)
    cos, sin = args["cos"], args["sin"]
    ct = cos.reshape(-1, cos.shape[-2], cos.shape[-1])[0]
    st = sin.reshape(-1, sin.shape[-2], sin.shape[-1])[0]
    m, _ = _hf_code.measure(fn, kind, ct[None].float(), st[None].float(), args[names[0]].shape[-1])
    idx = torch.tensor(m.lanes)
    return ct[:, idx], st[:, idx], m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mt", ["gptj", "codegen"])
def test_tiny_model_tables_equal_from_hf(mt, dtype):
    """A tiny model built from a config with rope_theta 30000: its forward does not depend on the
    base (the logits equal those of the default-base model), and the tables its RoPE function
    receives are those of transformers_cos_sin(from_hf(config)), exactly, in the dtype the model
    keeps them in (bfloat16 for a buffer cast with the model; 4.x CodeGen keeps a float32 attribute)."""
    plain = _tiny(mt)
    cfg = rebased(plain)
    a, _, why = hs._build(mt, plain)
    b, _, why = hs._build(mt, cfg)
    assert b is not None, why
    ids = hs._ids(128)
    a.to(dtype)
    b.to(dtype)
    assert torch.equal(hs._run(a, ids), hs._run(b, ids))  # same seed, same weights: the base changes nothing
    result, _ = _from_hf(cfg)
    cos, sin, m = _forward_tables(b, ids)
    c, s = transformers_cos_sin(result, torch.arange(hs.S))
    assert torch.equal(cos, c.to(cos.dtype)) and torch.equal(m.direction * sin, s.to(sin.dtype)), (
        (cos.float() - c).abs().max(),
        (sin.float() - s).abs().max(),
    )


# ----------------------------------------------------------------- the family table
def _row(mt: str) -> Dict[str, Any]:
    version = _hf_table.installed_version()
    r = _hf_table.row(mt, version)
    if r is None or version not in r["verified"]:
        pytest.skip(f"no {mt} row verified against transformers {version}")
    return r


def _fresh(code: str, path, tmp_path) -> List[str]:
    env = dict(os.environ, ROPEKIT_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True, env=env)
    return out.stdout.split()


CODE = (
    "import sys, warnings, ropekit\n"
    "with warnings.catch_warnings(record=True) as w:\n"
    "    warnings.simplefilter('always')\n"
    "    c = ropekit.RopeConfig.from_hf(sys.argv[1])\n"
    "print(c.base, 'transformers' in sys.modules, [x.category.__name__ for x in w])\n"
)


def test_gptj_config_json_with_a_base(tmp_path):
    """A GPT-J config.json with rope_theta: its table row (verified on the class default base,
    its code ignores the rope parameters) sends another base to the code, which says 10000; one
    without rope_theta is still answered by the row, without importing transformers."""
    _row("gptj")
    path = tmp_path / "config.json"
    gptj = {"model_type": "gptj", "n_embd": 4096, "n_head": 16, "rotary_dim": 64, "n_positions": 2048}
    path.write_text(json.dumps(dict(gptj, rope_theta=THETA)))
    assert _fresh(CODE, path, tmp_path) == ["10000.0", "True", "['IgnoredBaseWarning']"]
    path.write_text(json.dumps(gptj))
    assert _fresh(CODE, path, tmp_path) == ["10000.0", "False", "[]"]


def test_table_answers_a_base_the_code_reads_without_transformers(tmp_path):
    """A Qwen2 config.json with another rope_theta: answered by the row (the family's code reads
    the base as transformers' rope functions do), without importing transformers."""
    _row("qwen2")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 896, "num_attention_heads": 14,
                                "num_key_value_heads": 2, "rope_theta": 123456.0}))  # fmt: skip
    assert _fresh(CODE, path, tmp_path) == ["123456.0", "False", "[]"]


def test_unverified_version_checks_another_base_once(tmp_path, monkeypatch):
    """With a transformers version the row was not verified against, an input with another base
    is checked against the code once (its own verdict key: another version's code may read the
    base differently, as ESM and IDEFICS do between 4.x and 5.x)."""
    _need("llama")
    monkeypatch.setenv("ROPEKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_hf_table, "_MEMO", {})
    monkeypatch.setattr(_hf_table, "installed_version", lambda: "9.9.9")
    cfg = rebased(_tiny("llama"))
    for _ in range(2):  # the check, then the cached verdict
        result, said = _from_hf(cfg)
        assert result.base == 30000.0 and not said
    cached = json.loads(open(_hf_table.cache_path("9.9.9")).read())
    assert cached == {"llama": "same", "llama+theta": "same"}, cached


# ----------------------------------------------------------------- the sweep's base check
def base_check(model_type: str) -> Tuple[str, str]:
    """``(verdict, detail)``: ``from_hf`` of ``model_type``'s tiny config with every RoPE base it
    states tripled (:func:`rebased`) against the family's code, as the sweep's config check does:
    the model's function with its own tables equals ropekit's rotation bit for bit
    (``hf_sweep._static_check``), ``from_hf(saved config.json) == from_hf(config)``, and an
    ``IgnoredBaseWarning`` exactly when the answer's base is not the one the config states.

    Verdicts: ``"exact"`` (``"exact, base ignored by the code"`` where it is), ``"wrong"``,
    ``"refused"`` (a RopeError for the rebased config only), ``"n/a"`` (no RoPE call ropekit reads,
    a tiny config from_hf refuses anyway, a config class that refuses or drops the base)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cfg = hs.tiny_config(model_type)
        except Exception:
            try:
                cfg = CONFIG_MAPPING[model_type]()
            except Exception as e:
                return "n/a", f"no config: {type(e).__name__}"
        text = hs._text(cfg)
        try:  # as the sweep's config check: a family whose code ropekit does not read is n/a
            if not _hf_code.derive(text, getattr(text, "model_type", model_type)):
                return "n/a", "no 1-D RoPE call in the language model's code ropekit reads"
        except Exception as e:
            return "n/a", f"the code is not read: {type(e).__name__}"
        try:
            plain = hs._flat(rope_config_from_hf(cfg))
        except RopeError:
            return "n/a", "from_hf refuses the tiny config itself"
        except Exception as e:
            return "wrong", f"from_hf of the tiny config: {type(e).__name__}: {str(e)[:200]}"
        try:
            cfgx = rebased(cfg)
        except Exception as e:
            return "n/a", f"the config class refuses the base ({type(e).__name__}: {str(e)[:100]})"
        stated = hs._flat(rope_config_from_hf(cfgx, read_code=False))
    if all(stated.get(k) is None or p is None or stated[k].base == p.base for k, p in plain.items()):
        return "n/a", "the config class does not keep the base"
    try:
        result, said = _from_hf(cfgx)
    except RopeError as e:
        return "refused", str(e)[:200]
    except Exception as e:
        return "wrong", f"{type(e).__name__}: {str(e)[:200]}"
    flat = hs._flat(result)
    try:
        diff = hs._static_check(hs._text(cfgx), flat)
    except Exception as e:
        diff = f"check failed: {type(e).__name__}: {str(e)[:150]}"
    if diff and not diff.startswith(("ROUNDING ", "LAYERS ")):
        return "wrong", diff[:200]
    try:
        same, why = hs._path_equal(cfgx, result)
    except Exception as e:
        same, why = False, f"{type(e).__name__}: {str(e)[:100]}"
    if not same:
        return "wrong", why
    ignored = any(c is not None and k in stated and stated[k] is not None and c.base != stated[k].base
                  for k, c in flat.items())  # fmt: skip
    warned = bool(_said(said, "IgnoredBaseWarning"))
    if ignored != warned:
        how = "differs from" if ignored else "is"
        return "wrong", f"the base {how} the config's, and IgnoredBaseWarning {'' if warned else 'not '}raised"
    return ("exact, base ignored by the code" if ignored else "exact"), ""


#: Families checked by default (one per way of stating or reading a base); ROPEKIT_BASE_SWEEP=all
#: checks every family of the installed transformers (``.ci/sweep-transformers``).
SUBSET = ("llama", "gptj", "codegen", "esm", "nemotron", "gpt_neox", "gemma3_text", "deepseek_v3", "phi3", "glm",
          "cohere", "qwen3_next", "olmo2", "modernbert-decoder", "ernie4_5_vl_moe_text")  # fmt: skip


def test_every_family_reads_the_base_as_its_code():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    every = os.environ.get("ROPEKIT_BASE_SWEEP") == "all"
    todo = [mt for mt, _ in hs.families()] if every else [mt for mt in SUBSET if mt in CONFIG_MAPPING_NAMES]
    results = {mt: base_check(mt) for mt in todo}
    counts: Dict[str, int] = {}
    for verdict, _ in results.values():
        counts[verdict] = counts.get(verdict, 0) + 1
    if every:
        ignored = sorted(mt for mt, (v, _) in results.items() if "ignored" in v)
        tally = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"\nbase check, transformers {transformers.__version__}: {len(todo)} model types, {tally}; "
              f"base ignored by the code: {ignored}")  # fmt: skip
    wrong = {mt: d for mt, (v, d) in results.items() if v in ("wrong", "refused")}
    assert not wrong, wrong
    assert counts.get("exact", 0) + counts.get("exact, base ignored by the code", 0) >= len(todo) // 2, results


def test_the_base_check_fails_on_a_wrong_base(monkeypatch):
    """The base check (and so the sweep) fails when from_hf answers the config's base for a family
    whose code ignores it: from_hf without the base check is what it answered before."""
    _need("gptj")
    if V4:
        pytest.skip("transformers 4.x GPT-J has no rotary class: not in the sweep")
    assert base_check("gptj") == ("exact, base ignored by the code", "")
    monkeypatch.setattr(rhf, "_as_based", lambda cfg, *a, **k: cfg)
    verdict, detail = base_check("gptj")
    assert verdict == "wrong" and "max |difference|" in detail, (verdict, detail)
