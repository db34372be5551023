"""Tests of the evidence harness (ropekit.experiment).

The smoke study (a 2-layer byte-level LM, 300 steps, one seed) runs once per module. Its
assertions are only the orderings the issue asks for, each checked to hold for seeds 0-4
at this size before being asserted here, with margins well inside what was measured
(Python 3.11.7 stdlib, `smoke_config(seeds=(s,))` for s = 0..4; table in docs/evidence.md):

    ordering (bits/byte, tail = last 128 positions)     measured over seeds 0-4   asserted
    NoPE - RoPE at length 128                            +0.455 .. +0.526          > +0.2
    plain RoPE tail at 1024 - tail at 128                +0.484 .. +0.571          > +0.25
    plain RoPE - YaRN, tail at 1024                      +0.236 .. +0.394          > +0.1
    PI (linear) - plain RoPE, tail at 1024               +0.156 .. +0.535          >= 0

No absolute values are asserted: they depend on the Python version's standard library.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import pytest
import torch

from ropekit import RopeConfig, scaling
from ropekit.experiment import run, smoke_config
from ropekit.experiment.corpus import load_corpus, stdlib_files, unigram_bits_per_byte
from ropekit.experiment.model import ModelConfig, TinyLM, available_encodings
from ropekit.experiment.report import aggregate, write_report
from ropekit.experiment.schemes import SCHEMES, scheme_config
from ropekit.experiment.study import run_study
from ropekit.experiment.train import TrainConfig, eval_windows, evaluate, set_determinism, train

SEED = 0


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.fixture(scope="module")
def smoke(corpus):
    torch_threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    try:
        # 1 thread: the margins above were measured with 1 thread, and a busy machine slows 2
        # threads far more (seed 0 gives the same numbers with 1 and 2 threads here)
        res = run_study(corpus, dataclasses.replace(smoke_config(seeds=(SEED,)), threads=1), quiet=True)
    finally:  # do not leak the study's global settings into other test modules
        torch.set_num_threads(torch_threads)
        torch.use_deterministic_algorithms(det)
    return res


def _ext(res, scheme, length, col="tail_bpb"):
    (row,) = [r for r in res.extrapolation if r["scheme"] == scheme and r["length"] == length and not r["finetuned"]]
    return row[col]


# --------------------------------------------------------------------------- corpus
def test_corpus_is_the_stdlib_without_site_packages(corpus):
    files = stdlib_files()
    assert files == sorted(files, key=lambda p: p.as_posix())
    assert not any("site-packages" in p.parts or "__pycache__" in p.parts for p in files)
    n_held = corpus.n_files[1]
    assert n_held == -(-len(files) * 5 // 100)  # ceil(5%)
    assert corpus.heldout.numel() == sum(p.stat().st_size for p in files[-n_held:])
    assert corpus.train.numel() + corpus.heldout.numel() == sum(p.stat().st_size for p in files)


def test_unigram_baseline_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    tr = torch.randint(0, 40, (5000,), generator=g, dtype=torch.int64).to(torch.uint8)
    he = torch.randint(0, 60, (700,), generator=g, dtype=torch.int64).to(torch.uint8)
    counts = {b: 1 for b in range(256)}
    for b in tr.tolist():
        counts[b] += 1
    total = sum(counts.values())
    import math

    expect = -sum(math.log2(counts[b] / total) for b in he.tolist()) / len(he)
    assert unigram_bits_per_byte(tr, he) == pytest.approx(expect, rel=1e-12)


# --------------------------------------------------------------------------- evaluation
class _Bigram(torch.nn.Module):
    """Predicts the next byte from the current byte only: its loss cannot depend on the
    window length, so it checks that every length sees exactly the same bytes."""

    def __init__(self):
        super().__init__()
        self.table = torch.randn(256, 256, generator=torch.Generator().manual_seed(3))

    def forward(self, idx, seq_len=None):
        return self.table[idx]


def test_evaluate_scores_the_same_bytes_at_every_length(corpus):
    ev = eval_windows(corpus.heldout, 3, 512)
    m = _Bigram()
    toks = ev.tokens.long()
    logp = torch.log_softmax(m.table, -1)[toks[:, :-1], toks[:, 1:]] / -torch.log(torch.tensor(2.0))  # [n, 512] bits
    for L in (128, 256, 512):
        a, t = evaluate(m, ev, L, tail=128)
        assert a == pytest.approx(float(logp.mean()), rel=1e-5)
        assert t == pytest.approx(float(logp[:, -128:].mean()), rel=1e-5)


def test_dynamic_ntk_sees_the_window_length():
    """A length-dependent scheme must get seq_len = window length: dynamic NTK (factor F,
    max M) at length L equals static NTK with factor F·L/M − (F − 1) (transformers' rule)."""
    torch.manual_seed(0)
    mc = ModelConfig(n_layer=1, d_model=64, n_head=2, ctx=32)
    m = TinyLM(mc, "rope").eval()
    x = torch.randint(0, 256, (2, 128))
    with torch.no_grad():
        m.set_rope(scheme_config("dynamic", mc.rope_config(), 128, 32, dynamic_factor=2.0))
        dyn = m(x)
        m.set_rope(mc.rope_config(scaling.NTK(factor=2.0 * 128 / 32 - 1.0)))
        ntk = m(x)
        m.set_rope(mc.rope_config())
        plain = m(x)
    assert torch.allclose(dyn, ntk, atol=1e-5, rtol=0)
    assert not torch.allclose(dyn, plain, atol=1e-3)
    ev = eval_windows(torch.randint(0, 256, (5000,), dtype=torch.int64).to(torch.uint8), 2, 128)
    m.set_rope(scheme_config("dynamic", mc.rope_config(), 128, 32, dynamic_factor=2.0))
    a_dyn = evaluate(m, ev, 128)
    m.set_rope(mc.rope_config(scaling.NTK(factor=7.0)))
    a_ntk = evaluate(m, ev, 128)
    assert a_dyn == pytest.approx(a_ntk, abs=1e-5)


def test_schemes_reduce_to_plain_rope_at_factor_one():
    base = RopeConfig(head_dim=32)
    for name in SCHEMES:
        c = scheme_config(name, base, 128, 128)
        assert torch.allclose(c.inv_freq(128), base.inv_freq(), rtol=1e-15, atol=0), name
        assert c.attention_factor == 1.0, name


def test_training_is_deterministic(corpus):
    mc = ModelConfig(n_layer=1, d_model=32, n_head=1, ctx=64)
    tc = TrainConfig(steps=6, batch=4, warmup=2, eval_every=3, eval_batches=2)
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        set_determinism(2)
        outs = []
        for _ in range(2):
            torch.manual_seed(5)
            m = TinyLM(mc, "rope")
            curve = train(m, corpus.train, corpus.heldout, tc, seed=5)
            outs.append((curve, m.state_dict()))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    assert outs[0][0] == outs[1][0]
    for k, v in outs[0][1].items():
        assert torch.equal(v, outs[1][1][k]), k


def test_every_available_encoding_trains():
    mc = ModelConfig(n_layer=1, d_model=64, n_head=2, ctx=32)
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    outs = {}
    for pe in available_encodings():
        torch.manual_seed(0)
        m = TinyLM(mc, pe)
        y = m(x)
        y.float().pow(2).mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters()), pe
        outs[pe] = y.detach()
    # same init (seeded), so encodings differ only through positions: all must differ from NoPE
    for pe, y in outs.items():
        if pe != "nope":
            assert not torch.equal(y, outs["nope"]), pe


def test_p_rope_leaves_the_lowest_frequencies_unrotated():
    from ropekit.experiment.model import P_ROPE_P

    if "p-rope" not in available_encodings():
        pytest.skip("ropekit.variants has no p-RoPE")
    mc = ModelConfig(n_layer=1, d_model=64, n_head=2, ctx=32)
    rope = TinyLM(mc, "p-rope").rope
    q, k = torch.randn(1, 32, 2, 32), torch.randn(1, 32, 2, 32)
    q2, _ = rope(q, k)
    kept = int(P_ROPE_P * 16)  # pairs (i, i + 16) with i >= kept do not rotate ("half" layout)
    assert torch.equal(q2[..., kept:16], q[..., kept:16]) and torch.equal(q2[..., 16 + kept :], q[..., 16 + kept :])
    assert not torch.allclose(q2[:, 1:, :, :kept], q[:, 1:, :, :kept])


def test_absolute_encodings_refuse_longer_inputs():
    m = TinyLM(ModelConfig(n_layer=1, d_model=32, n_head=1, ctx=16), "learned")
    with pytest.raises(ValueError, match="at most ctx=16"):
        m(torch.zeros(1, 17, dtype=torch.long))


# --------------------------------------------------------------------------- smoke study orderings
def test_every_scheme_gives_the_same_loss_at_the_training_length(smoke):
    ctx = smoke.config.model.ctx
    ref = _ext(smoke, "none", ctx, "bpb")
    for name in SCHEMES:
        assert _ext(smoke, name, ctx, "bpb") == pytest.approx(ref, abs=1e-4), name
        assert _ext(smoke, name, ctx, "tail_bpb") == pytest.approx(_ext(smoke, "none", ctx), abs=1e-4), name


def test_plain_rope_degrades_beyond_the_training_length(smoke):
    # same 128 bytes: with no earlier context at 128, after 896 bytes of context at 1024
    assert _ext(smoke, "none", 1024) > _ext(smoke, "none", 128) + 0.25


def test_yarn_beats_plain_rope_at_8x(smoke):
    assert _ext(smoke, "yarn", 1024) < _ext(smoke, "none", 1024) - 0.1


def test_training_free_pi_does_not_beat_plain_rope_at_8x(smoke):
    assert _ext(smoke, "linear", 1024) >= _ext(smoke, "none", 1024)


def test_nope_is_worse_than_rope_at_the_training_length(smoke):
    by = {r["encoding"]: r["bpb"] for r in smoke.encodings}
    assert by["nope"] > by["rope"] + 0.2
    assert by["rope"] < smoke.unigram_bpb - 1.0  # the model uses context at all


# --------------------------------------------------------------------------- outputs
def test_report_files(smoke, tmp_path):
    paths = write_report(smoke, str(tmp_path), command="test")
    names = {os.path.basename(p) for p in paths}
    assert {"report.md", "curves.csv", "encodings.csv", "extrapolation.csv", "analysis.csv", "config.json"} <= names
    assert {"loss_curves.png", "extrapolation.png"} <= names
    with open(tmp_path / "extrapolation.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(SCHEMES) * len(smoke.config.lengths)
    text = (tmp_path / "report.md").read_text()
    assert "Context-free baseline" in text and "| yarn |" in text
    agg = aggregate(smoke.extrapolation, ["scheme", "length"], "bpb")
    assert agg[("none", 128)][2] == 1


def test_merge_replaces_rows_of_rerun_encodings(smoke, tmp_path):
    import copy

    from ropekit.experiment.report import load_result, merge_dirs

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_report(smoke, a, command="first")
    back, cmd = load_result(a, smoke.corpus, smoke.unigram_bpb)
    assert cmd == "first" and back.config == smoke.config
    assert [r["bpb"] for r in back.encodings] == pytest.approx([r["bpb"] for r in smoke.encodings], rel=1e-5)
    rerun = copy.deepcopy(smoke)
    rerun.encodings = [dict(r, bpb=r["bpb"] + 1.0) for r in smoke.encodings if r["encoding"] == "nope"]
    rerun.curves = [r for r in smoke.curves if r["encoding"] == "nope"]
    rerun.extrapolation, rerun.analysis = [], []
    write_report(rerun, b, command="second")
    merged, cmd = merge_dirs([a, b], smoke.corpus, smoke.unigram_bpb)
    assert cmd == "first && second"
    by = {r["encoding"]: r["bpb"] for r in merged.encodings}
    old = {r["encoding"]: r["bpb"] for r in smoke.encodings}
    assert by["nope"] == pytest.approx(old["nope"] + 1.0, rel=1e-5) and by["rope"] == pytest.approx(old["rope"], rel=1e-5)
    assert len(merged.extrapolation) == len(smoke.extrapolation) and len(merged.curves) == len(smoke.curves)


def test_analysis_rows(smoke):
    rows = {r["scheme"]: r for r in smoke.analysis}
    assert set(rows) == set(SCHEMES)
    for r in rows.values():
        assert r["relpos_max_dev"] < 1e-9  # RoPE scores depend only on m - n, for every scheme
    # the bound is largest at distance 0: (r/2 + 1) / 2 with r/2 = 16 pairs (RoFormer 3.4.3)
    assert rows["none"]["bound_0"] == pytest.approx(17 / 2)
    assert rows["none"]["bound_1024"] < rows["none"]["bound_0"]


def test_cli_entry_tiny(tmp_path, corpus):
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        rc = run(
            ["--smoke", "--steps", "3", "--eval-spans", "1", "--schemes", "none,yarn", "--encodings", "rope",
             "--quiet", "--out", str(tmp_path)]
        )
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    assert rc == 0
    assert (tmp_path / "report.md").exists()
    with pytest.raises(ValueError, match="schemes from"):
        run(["--schemes", "bogus", "--quiet", "--out", str(tmp_path)])
