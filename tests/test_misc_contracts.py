"""Contracts of the multi-axis module, context parallelism, the CLI and input checks.

- ``MultiAxisRotaryEmbedding`` honours ``cfg.direction`` and ``cfg.rotary_offset``
  (first-principles float64 rotation as the oracle; text tokens equal 1-D RoPE bit for bit);
- context parallelism with length-dependent scaling (LongRoPE, dynamic NTK): the recipe of
  docs/parallel.md and ``rotate_dtensor`` give the unsharded rotation bit for bit;
- the CLI refuses bad numbers with one line on stderr and exit status 2;
- bad input raises RopeError (never another exception type).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import types
from pathlib import Path

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, RotaryEmbedding
from ropekit.cli import main
from ropekit.scaling import DynamicNTK, LongRoPE

DOCS = Path(__file__).resolve().parents[1] / "docs"


# --------------------------------------------------------------------------- oracle
def _rotate_oracle(x: torch.Tensor, angles: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """float64 first principles: dims ``[o, o + r)`` of ``x [..., d]`` rotate pair ``j`` by
    ``direction · angles[..., j]`` (``a' = a cos - b sin``, ``b' = b cos + a sin``); the
    other dims pass through. ``angles`` broadcast to ``x[..., :r/2]``."""
    o, r, n = cfg.rotary_offset, cfg.rotary_dim, cfg.rotary_dim // 2
    out = x.to(torch.float64).clone()
    rot = out[..., o : o + r]
    if cfg.layout == "half":
        ia, ib = list(range(n)), list(range(n, r))
    else:
        ia, ib = list(range(0, r, 2)), list(range(1, r, 2))
    a, b = rot[..., ia].clone(), rot[..., ib].clone()
    phi = cfg.direction * angles.to(torch.float64)
    c, s = torch.cos(phi), torch.sin(phi)
    rot[..., ia] = a * c - b * s
    rot[..., ib] = b * c + a * s
    return out


def _inv_freq(cfg: RopeConfig) -> torch.Tensor:
    r = cfg.rotary_dim
    return torch.tensor([cfg.base ** (-2.0 * i / r) for i in range(r // 2)], dtype=torch.float64)


CFGS = [
    dict(head_dim=16, direction=-1),
    dict(head_dim=24, rotary_dim=16, rotary_offset=8),
    dict(head_dim=24, rotary_dim=16, rotary_offset=4, direction=-1, layout="interleaved"),
    dict(head_dim=20, rotary_dim=16, rotary_offset=4, direction=-1, layout="half"),
]


# --------------------------------------------------------------------------- bug 1: multi-axis module
@pytest.mark.parametrize("kw", CFGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_multi_axis_module_direction_and_offset_match_oracle(kw):
    cfg = RopeConfig(**kw)
    sections = [2, 3, 3]
    g = torch.Generator().manual_seed(0)
    b, s = 2, 7
    q = torch.randn(b, s, 3, cfg.head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(b, s, 1, cfg.head_dim, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 50, (b, s, 3), generator=g)
    rope = ropekit.MultiAxisRotaryEmbedding(cfg, sections, table_dtype=torch.float64)
    q2, k2 = rope(q, k, pos)
    # oracle: pair j (chunked sections) takes its position from axis a(j)
    axis = torch.tensor([a for a, n in enumerate(sections) for _ in range(n)])
    ang = pos[..., axis].to(torch.float64) * _inv_freq(cfg)  # [b, s, r/2]
    torch.testing.assert_close(q2, _rotate_oracle(q, ang[:, :, None], cfg), atol=1e-12, rtol=0)
    torch.testing.assert_close(k2, _rotate_oracle(k, ang[:, :, None], cfg), atol=1e-12, rtol=0)
    o, r = cfg.rotary_offset, cfg.rotary_dim
    keep = [i for i in range(cfg.head_dim) if not o <= i < o + r]
    assert torch.equal(q2[..., keep], q[..., keep])  # the pass-through dims, bit for bit
    # in place: the same numbers, in q and k themselves
    qi, ki = q.clone(), k.clone()
    q3, k3 = rope(qi, ki, pos, inplace=True)
    assert q3.data_ptr() == qi.data_ptr() and torch.equal(qi, q2) and torch.equal(ki, k2)


@pytest.mark.parametrize("kw", CFGS + [dict(head_dim=16)], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_multi_axis_module_text_tokens_equal_1d_rope(kw):
    # the class docstring and docs/multi_axis.md: text tokens get exactly 1-D RotaryEmbedding
    cfg = RopeConfig(**kw)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 5, 2, cfg.head_dim, generator=g), torch.randn(1, 5, 1, cfg.head_dim, generator=g)
    pos = torch.arange(5)
    q1, k1 = RotaryEmbedding(cfg)(q, k, positions=pos)
    q2, k2 = ropekit.MultiAxisRotaryEmbedding(cfg, [2, 3, 3])(q, k, pos[:, None].expand(5, 3))
    assert torch.equal(q1, q2) and torch.equal(k1, k2)


def test_multi_axis_module_inplace_must_be_bool():
    cfg = RopeConfig(head_dim=24, rotary_dim=16, rotary_offset=8)
    q = torch.randn(1, 3, 1, 24)
    with pytest.raises(RopeError, match="inplace"):
        ropekit.MultiAxisRotaryEmbedding(cfg, [2, 3, 3])(q, q.clone(), torch.zeros(3, 3, dtype=torch.long), inplace="no")


# --------------------------------------------------------------------------- bug 2: context parallelism
def _length_dependent():
    return [
        ("longrope", LongRoPE([1.0] * 4, [3.0] * 4, 24, factor=4.0)),  # some ranks short, some long
        ("dynamic", DynamicNTK(2.0, 16)),
    ]


def _doc_recipe() -> str:
    text = (DOCS / "parallel.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "shard_positions" in block and "rope(" in block
    return block


@pytest.mark.parametrize("name,scaling", _length_dependent())
@pytest.mark.parametrize("W", [2, 4])
def test_docs_parallel_recipe_is_bit_identical(name, scaling, W):
    # run the recipe of docs/parallel.md as written, on every rank of a simulated group
    block = _doc_recipe()
    from ropekit.parallel import unshard

    S = 32
    rope = RotaryEmbedding(RopeConfig(head_dim=8, scaling=scaling))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, S, 2, 8, generator=g), torch.randn(2, S, 1, 8, generator=g)
    q_full, k_full = rope(q, k)
    qs, ks = [], []
    for r in range(W):
        fake = types.SimpleNamespace(get_world_size=lambda group, W=W: W, get_rank=lambda group, r=r: r)
        ns = {"dist": fake, "group": None, "S": S, "q": q, "k": k, "rope": rope}
        exec(block, ns)
        qs.append(ns["q_loc"])
        ks.append(ns["k_loc"])
    scheme = "zigzag" if 'scheme="zigzag"' in block else "contiguous"
    assert torch.equal(unshard(qs, seq_dim=1, scheme=scheme), q_full), name
    assert torch.equal(unshard(ks, seq_dim=1, scheme=scheme), k_full), name


@pytest.mark.parametrize("name,scaling", _length_dependent() + [("none", None)])
@pytest.mark.parametrize("scheme", ["contiguous", "zigzag"])
def test_sharded_with_global_seq_len_equals_unsharded(name, scaling, scheme):
    from ropekit.parallel import shard, shard_packed, shard_positions, unshard

    S, W = 32, 2
    rope = RotaryEmbedding(RopeConfig(head_dim=8, scaling=scaling))
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, S, 2, 8, generator=g), torch.randn(1, S, 2, 8, generator=g)
    want, _ = rope(q, k)
    parts = [
        rope(shard(q, W, r, seq_dim=1, scheme=scheme), shard(k, W, r, seq_dim=1, scheme=scheme),
             positions=shard_positions(S, W, r, scheme=scheme), seq_len=S)[0]
        for r in range(W)
    ]
    assert torch.equal(unshard(parts, seq_dim=1, scheme=scheme), want)
    # packed (thd): seq_len = the longest sequence of the pack (docs/parallel.md)
    cu = torch.tensor([0, 8, 32])
    qt, kt = torch.randn(32, 2, 8, generator=g), torch.randn(32, 2, 8, generator=g)
    want_t, _ = rope(qt, kt, cu_seqlens=cu, format="thd")
    got = torch.empty_like(qt)
    for r in range(W):
        idx, pos, _ = shard_packed(cu, W, r, scheme=scheme)
        got[idx] = rope(qt[idx], kt[idx], positions=pos, format="thd", seq_len=int((cu[1:] - cu[:-1]).max()))[0]
    assert torch.equal(got, want_t)


def _dtensor_checks(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from ropekit.parallel import rotate_dtensor

    mesh = init_device_mesh("cpu", (world,))
    for name, sc in _length_dependent():
        rope = RotaryEmbedding(RopeConfig(head_dim=8, scaling=sc))
        for S, off in ((32, 0), (33, 0), (32, 5)):
            g = torch.Generator().manual_seed(S + off)
            q, k = torch.randn(1, S, 2, 8, generator=g), torch.randn(1, S, 1, 8, generator=g)
            want_q, want_k = rope(q, k, offsets=off)
            qd, kd = (distribute_tensor(t, mesh, [Shard(1)]) for t in (q, k))
            q2, k2 = rotate_dtensor(rope, qd, kd, offsets=off or None)
            # this rank's shard against the same slice of the single-process rotation
            sq = torch.chunk(want_q, world, dim=1)[rank]
            sk = torch.chunk(want_k, world, dim=1)[rank]
            assert torch.equal(q2.to_local(), sq) and torch.equal(k2.to_local(), sk), (name, S, off)
            # an explicit seq_len is passed to every rank alike
            q3, _ = rotate_dtensor(rope, qd, kd, seq_len=4 * S)
            assert torch.equal(q3.to_local(), torch.chunk(rope(q, k, seq_len=4 * S)[0], world, dim=1)[rank])


def test_rotate_dtensor_length_dependent_matches_single_process():
    pytest.importorskip("torch.distributed.tensor")
    import torch.multiprocessing as mp

    from test_parallel import gloo_worker  # (tests/ is on the path: pyproject's pythonpath)

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(gloo_worker, args=(2, os.path.join(tmp, "init"), _dtensor_checks), nprocs=2, join=True)


# --------------------------------------------------------------------------- bugs 3-5: CLI
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("value", ["inf", "1e400", "-5", "0", "8192.5", "nan", "abc"])
def test_inspect_bad_context_is_one_line_naming_context(capsys, value):
    assert main(["inspect", f"head_dim=128,base=1e4,context={value}"]) == 2
    line = _one_line_error(capsys)
    assert "context" in line and "seq_len" not in line


def test_inspect_good_context_still_works(capsys):
    assert main(["inspect", "head_dim=128,context=1e5"]) == 0
    assert "100,000" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--steps", "-3"], ["--steps", "0"], ["--seeds", "0"], ["--seeds", "-2"],
                                  ["--eval-spans", "0"], ["--jobs", "0"], ["--finetune-steps", "-1"]])
def test_experiment_refuses_non_positive_counts(capsys, monkeypatch, argv):
    from ropekit.experiment import corpus, study

    def no_training(*a, **kw):
        raise AssertionError("the run started instead of refusing the arguments")

    monkeypatch.setattr(corpus, "load_corpus", no_training)
    monkeypatch.setattr(study, "run_study", no_training)
    full = ["experiment", "--smoke", *argv, "--encodings", "rope", "--schemes", "none", "--quiet", "--out", "unused"]
    assert main(full) == 2
    line = _one_line_error(capsys)
    assert argv[0] in line


def test_hf_sweep_unknown_model_type_is_an_error(capsys):
    pytest.importorskip("transformers")
    assert main(["hf-sweep", "--only", "bogus_type", "--no-models", "--quiet"]) == 2
    line = _one_line_error(capsys)
    assert "bogus_type" in line


# --------------------------------------------------------------------------- bugs 6-7: RopeError, flags
def _cases():
    from ropekit.attention import linear_attention
    from ropekit.multi_axis import mrope_decode_positions, mrope_positions
    from ropekit.parallel import shard, shard_positions

    cases = {
        "shard_positions device='foo'": lambda: shard_positions(8, 2, 0, device="foo"),
        "shard 0-d tensor": lambda: shard(torch.tensor(1), 2, 0, seq_dim=0),
        "mrope_positions mask [1, 1] for s=2": lambda: mrope_positions(torch.tensor([[0, 0]]), attention_mask=torch.tensor([[1]])),
        "mrope_positions 1-D mask": lambda: mrope_positions(torch.tensor([[0, 0]]), attention_mask=torch.tensor([1, 1])),
        "mrope_positions list mask": lambda: mrope_positions(torch.tensor([[0, 0]]), attention_mask=[[1, 1]]),
        "mrope_positions mask values": lambda: mrope_positions(torch.tensor([[0, 0]]), attention_mask=torch.tensor([[2, 1]])),
        "mrope_decode_positions start len != b": lambda: mrope_decode_positions(torch.tensor([[1], [2]]), torch.tensor([1, 2, 3])),
        "linear_attention causal='no'": lambda: linear_attention(
            *(torch.randn(1, 4, 1, 8),) * 3, torch.ones(4, 1, 4), torch.zeros(4, 1, 4), causal="no"),
    }
    if not torch.cuda.is_available():
        cases["shard_positions device='cuda' without CUDA"] = lambda: shard_positions(8, 2, 0, device="cuda")
    return cases


@pytest.mark.parametrize("name", list(_cases()))
def test_bad_input_raises_rope_error(name):
    with pytest.raises(RopeError, match="expected .*, got .*Fix: "):
        _cases()[name]()


def test_mrope_mask_and_start_still_accept_good_input():
    from ropekit.multi_axis import mrope_decode_positions, mrope_positions

    types_ = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    pos, delta = mrope_positions(types_, attention_mask=mask)
    assert pos[0].tolist() == [[0, 0, 1], [0, 1, 2]] and delta.tolist() == [[0], [0]]
    delta = torch.tensor([[-2], [3]])
    got = mrope_decode_positions(delta, torch.tensor([7, 9]), length=2)
    want = torch.tensor([[5, 6], [12, 13]])  # k + delta for k in start .. start + 1
    assert got.shape == (3, 2, 2) and all(torch.equal(got[a], want) for a in range(3))


def test_linear_attention_causal_empty_sequence():
    from ropekit.attention import linear_attention

    q, v = torch.randn(2, 0, 3, 8), torch.randn(2, 0, 3, 5)
    for causal in (True, False):
        out = linear_attention(q, q, v, torch.ones(0, 1, 4), torch.zeros(0, 1, 4), causal=causal)
        assert out.shape == (2, 0, 3, 5) and out.dtype == v.dtype


def test_xpos_huge_gamma_and_scale_base():
    from ropekit.variants import xpos_cos_sin, xpos_max_distance

    cfg = RopeConfig(head_dim=8)
    # γ so large that ζ = (2i/r + γ)/(1 + γ) rounds to 1: no scale, plain RoPE tables
    t = xpos_cos_sin(cfg, torch.arange(3), gamma=1e300, dtype=torch.float64)
    ang = torch.arange(3, dtype=torch.float64)[:, None] * _inv_freq(cfg)
    for c, s in ((t.cos_q, t.sin_q), (t.cos_k, t.sin_k)):
        torch.testing.assert_close(c, torch.cos(ang), atol=1e-15, rtol=0)
        torch.testing.assert_close(s, torch.sin(ang), atol=1e-15, rtol=0)
    assert xpos_max_distance(cfg, gamma=1e300) >= 2**54
    assert xpos_max_distance(cfg, scale_base=1e308) >= 2**54  # no OverflowError
    # the paper's setting is unchanged: ⌊B · L / |ln ζ_0|⌋ in float32
    fi = torch.finfo(torch.float32)
    want = int(512.0 * min(math.log(fi.max), -math.log(fi.tiny)) / abs(math.log(0.4 / 1.4)))
    assert xpos_max_distance(cfg) == want


# ------------------------------------------------------------------ config and scaling arguments
def test_direction_is_a_real_plus_or_minus_one_stored_as_int():
    import numpy as np

    for v, want in ((1, 1), (-1, -1), (1.0, 1), (np.int64(-1), -1)):
        d = ropekit.RopeConfig(8, direction=v).direction
        assert d == want and type(d) is int
    for v in (torch.tensor([1, -1]), torch.tensor(-1), True, 2, "1", None):  # a tensor raised RuntimeError
        with pytest.raises(ropekit.RopeError, match="direction 1 or -1"):
            ropekit.RopeConfig(8, direction=v)


def test_from_dict_without_head_dim_says_so():
    with pytest.raises(ropekit.RopeError, match="a dict with head_dim"):  # was "remove unknown keys"
        ropekit.RopeConfig.from_dict({"base": 1e4})


@pytest.mark.parametrize("factors", [{1.0: "a", 2.0: "b"}, {1.0, 2.0}])
def test_longrope_factors_from_a_dict_or_set_are_refused(factors):
    from ropekit.scaling import LongRoPE

    with pytest.raises(ropekit.RopeError, match="short_factor a list of numbers"):  # a dict's keys were taken
        LongRoPE(factors, [1.0, 1.0], 16, factor=2.0)
