"""The family table (src/ropekit/hf_families.json): answers without transformers, rows held
against the installed transformers, the once-per-version check of an unverified version."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from ropekit import RopeConfig, RopeError
from ropekit import _hf_code, _hf_table
from ropekit.hf import UnknownFamilyWarning, rope_config_from_hf
from ropekit.scaling import Llama3

DATA = os.path.join(os.path.dirname(__file__), "data")

LLAMA31 = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rope_theta": 500000.0, "vocab_size": 128256,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}  # fmt: skip
LLAMA31_ROPE = RopeConfig(128, 500000.0, scaling=Llama3(8.0, 1.0, 4.0, 8192))

#: Rows re-derived from the installed transformers on every run (each ~0.3 s): one per kind of
#: row (half / interleaved / flag-picked / MLA slice / indexer / per-layer types / partial /
#: code-only); ROPEKIT_TABLE_FULL=1 checks every row of the installed version.
SUBSET = ("llama", "qwen3", "gpt_neox", "phi3", "gptj", "cohere", "glm", "deepseek_v3", "deepseek_v32",
          "gemma3_text", "minimax_m3_vl_text", "hy_v4", "mistral_large4_text", "olmo2", "dots3_note_text")  # fmt: skip


def test_llama31_answered_from_the_table_without_transformers(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA31))
    code = (
        "import sys, time, ropekit\n"
        "t = time.perf_counter(); c = ropekit.RopeConfig.from_hf(sys.argv[1]); dt = time.perf_counter() - t\n"
        "print(repr(c)); print('transformers' in sys.modules); print(dt)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    cfg, imported, seconds = out.stdout.strip().splitlines()
    assert cfg == repr(LLAMA31_ROPE)
    assert imported == "False"
    assert float(seconds) < 0.5  # ~2 ms on an idle core; the bound only catches an import


def _installed() -> str:
    pytest.importorskip("transformers")
    return _hf_table.installed_version()


def test_rows_hold_for_the_installed_transformers():
    version = _installed()
    from ropekit.integrations import hf_sweep

    full = os.environ.get("ROPEKIT_TABLE_FULL") == "1"
    todo = [mt for mt, _ in hf_sweep.families()] if full else list(SUBSET)
    checked = 0
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    todo = [mt for mt in todo if mt in CONFIG_MAPPING_NAMES]  # 4.57 has no deepseek_v32, ...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mt in todo:
            key, row = hf_sweep.table_row(mt)
            stored = _hf_table.row(key, version)
            if stored is None or version not in stored["verified"]:
                continue  # a row of another version: checked against the code when used
            assert hf_sweep._same(row, stored), f"{key}: the family table is stale; rerun ropekit hf-sweep --table"
            checked += 1
    assert checked >= (len(todo) // 2 if not full else 1)


def test_installed_version_read_without_importing():
    v = _installed()
    import transformers

    assert v == transformers.__version__


def test_unverified_version_checks_the_code_once(tmp_path, monkeypatch):
    _installed()
    monkeypatch.setenv("ROPEKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_hf_table, "installed_version", lambda: "5.999.0")
    monkeypatch.setattr(_hf_table, "_MEMO", {})
    assert rope_config_from_hf(dict(LLAMA31)) == LLAMA31_ROPE
    cached = json.loads(open(_hf_table.cache_path("5.999.0")).read())
    # a scaled input: the row's scaling fact too; a base other than the class default (500000): the base it reads
    assert cached == {"llama": "same", "llama+scaled": "same", "llama+theta": "same"}
    assert _hf_table.verdict("llama", _hf_table.row("llama", "5.999.0"), "5.999.0") == "table"

    # a row the code no longer agrees with: the code answers, and the row is never used again
    stale = json.loads(json.dumps(_hf_table.row("llama", "5.999.0")))
    stale["components"]["attention"]["layout"] = "interleaved"
    monkeypatch.setitem(_hf_table.table()["rows"], "llama", [stale])
    monkeypatch.setattr(_hf_table, "_MEMO", {})
    monkeypatch.setattr(_hf_table, "cache_path", lambda v: str(tmp_path / "other.json"))
    assert rope_config_from_hf(dict(LLAMA31)) == LLAMA31_ROPE
    assert _hf_table.verdict("llama", stale, "5.999.0") == "code"
    assert rope_config_from_hf(dict(LLAMA31)).layout == "half"


def test_unknown_model_type_is_read_from_code_and_says_so():
    with pytest.warns(UnknownFamilyWarning, match="no row for model_type 'not_a_family_x'"):
        cfg = rope_config_from_hf({"model_type": "not_a_family_x", "hidden_size": 64, "num_attention_heads": 4})
    assert cfg == RopeConfig(16, 10000.0)


def test_from_hf_input_untouched_by_defaults():
    d = {"model_type": "gpt_neox", "hidden_size": 512, "num_attention_heads": 8, "rotary_pct": 0.25, "rotary_emb_base": 20000}
    before = json.dumps(d, sort_keys=True)
    cfg = rope_config_from_hf(d)
    assert (cfg.head_dim, cfg.rotary_dim, cfg.base) == (64, 16, 20000.0)  # the 4.x names win over row defaults
    assert json.dumps(d, sort_keys=True) == before


def test_non_text_sub_config_refused():
    _installed()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "dots3_note" not in CONFIG_MAPPING:
        pytest.skip("no dots3_note in this transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        audio = CONFIG_MAPPING["dots3_note"]().audio_config
    with pytest.raises(RopeError, match="audio_config of dots3_note"):
        rope_config_from_hf(audio)


def test_indexer_cutting_tables_below_the_rotary_width_refused():
    _installed()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "minimax_m3_vl_text" not in CONFIG_MAPPING:
        pytest.skip("no minimax_m3_vl_text in this transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ok = CONFIG_MAPPING["minimax_m3_vl_text"](hidden_size=64, num_attention_heads=4, head_dim=16, index_head_dim=24)
        bad = CONFIG_MAPPING["minimax_m3_vl_text"](hidden_size=64, num_attention_heads=4, head_dim=16, index_head_dim=8)
    assert rope_config_from_hf(ok, component="indexer") == RopeConfig(24, 5e6, rotary_dim=16)
    with pytest.raises(RopeError, match="index_head_dim"):
        rope_config_from_hf(bad)
    with pytest.raises(RopeError, match="index_head_dim"):
        rope_config_from_hf(bad.to_dict())  # the table row says so too


def test_hub_kernel_wrapper_is_read_as_its_function():
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        return q, k

    def make(func):
        class Func(torch.nn.Module):  # the shape of kernels' use_kernel_forward_from_hub wrapper
            def forward(self, *args, **kwargs):
                return func(*args, **kwargs)

        return Func()

    wrapped = make(apply_rotary_pos_emb)
    assert _hf_code.unwrap_kernel_func(wrapped) is apply_rotary_pos_emb
    assert _hf_code.signature_kind(_hf_code.unwrap_kernel_func(wrapped)) == "qk"


def test_derived_defaults_are_not_filled_in():
    # Llama 3.2 1B style: head_dim left to hidden_size // num_attention_heads (64, not the
    # default config's 128)
    cfg = rope_config_from_hf({"model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32, "rope_theta": 5e5})
    assert cfg == RopeConfig(64, 5e5)


PHI2 = {"model_type": "phi", "hidden_size": 2560, "num_attention_heads": 32, "partial_rotary_factor": 0.4,
        "rope_theta": 10000.0, "max_position_embeddings": 2048}  # fmt: skip


def test_partial_factor_other_than_the_rows_is_checked_once_then_answered_by_the_row(tmp_path):
    """A row is verified on the class default partial rotary factor (Phi: 0.5); Phi-2's 0.4 is
    checked against the code once per transformers version (Phi's code applies it in 4.x and
    5.x, so the row's answer stands), and later processes answer from the row without importing
    transformers."""
    _installed()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PHI2))
    code = (
        "import sys, ropekit\n"
        "c = ropekit.RopeConfig.from_hf(sys.argv[1]); print(c.head_dim, c.rotary_dim, 'transformers' in sys.modules)\n"
    )
    env = dict(os.environ, ROPEKIT_CACHE_DIR=str(tmp_path / "cache"))
    run = lambda: subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,  # noqa: E731
                                 check=True, env=env).stdout.split()  # fmt: skip
    assert run() == ["80", "32", "True"]  # the check reads the code
    cached = json.loads(open(os.path.join(env["ROPEKIT_CACHE_DIR"], os.path.basename(_hf_table.cache_path(_installed())))).read())
    assert cached == {"phi+partial:default": "same"}
    assert run() == ["80", "32", "False"]  # the row answers


def test_partial_factor_the_row_does_not_reproduce_is_answered_by_the_code(tmp_path, monkeypatch):
    """transformers 5.x's Llama ignores partial_rotary_factor for the default rope type (its
    compute_default_rope_parameters reads head_dim only) and rotates the whole head; 4.x applies
    it. The row, verified without a factor, cannot tell: the code answers, once checked."""
    version = _installed()
    import transformers

    monkeypatch.setenv("ROPEKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_hf_table, "_MEMO", {})
    d = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "partial_rotary_factor": 0.5}
    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, partial_rotary_factor=0.5)
    five = not version.startswith("4.")
    want = RopeConfig(16, 10000.0, rotary_dim=16 if five else 8)
    for _ in range(2):  # the check, then the cached verdict
        assert rope_config_from_hf(d) == rope_config_from_hf(hf) == want
    cached = json.loads(open(_hf_table.cache_path(version)).read())
    assert cached == {"llama+partial:default": "differs" if five else "same"}
    linear = dict(d, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert rope_config_from_hf(linear).rotary_dim == 8  # every version applies it to the scaled types
    assert rope_config_from_hf(d, read_code=False).rotary_dim == 8  # the config rules alone: applied
