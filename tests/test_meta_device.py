"""Everything ropekit offers, constructed inside ``with torch.device("meta"):`` (how torchtune,
torchtitan and accelerate build models without memory), then materialised with
``to_empty`` + ``rope_init()``: the result equals the same object built normally.

Functions that compute values (frequencies, tables from CPU positions) must not put their
intermediate tensors on the context's device: they name their device explicitly.
"""

from __future__ import annotations

import pytest
import torch

import ropekit
from ropekit import MultiAxisRotaryEmbedding, RopeConfig, RotaryEmbedding, cos_sin
from ropekit import multi_axis as M
from ropekit import scaling as S
from ropekit import variants as V
from ropekit.convert import convert_layout, layout_permutation
from ropekit.parallel import shard_positions
from ropekit.tables import TableCache

SCHEMES = {
    "plain": None,
    "linear": S.Linear(2.0),
    "ntk": S.NTK(2.0),
    "dynamic": S.DynamicNTK(2.0, 16),
    "dynamic-static": S.DynamicNTK(2.0, 16, static=True),
    "yarn": S.YaRN(4.0, 16),
    "longrope": S.LongRoPE([1.0 + i / 10 for i in range(16)], [2.0 + i for i in range(16)], 16, factor=4.0),
    "llama3": S.Llama3(8.0, 1.0, 4.0, 16),
    "proportional": S.Proportional(0.25),
}


def _cfg(name: str, layout: str = "half") -> RopeConfig:
    return RopeConfig(32, base=500.0, layout=layout, scaling=SCHEMES[name])


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_frequencies_and_tables_inside_meta_context(name):
    cfg = _cfg(name)
    pos = torch.arange(40, device="cpu")
    want_inv, want = cfg.inv_freq(40), cos_sin(cfg, pos)
    with torch.device("meta"):
        cfg2 = _cfg(name)
        inv = cfg2.inv_freq(40)
        got = cos_sin(cfg2, pos)  # CPU positions: CPU tables with values
        ang = ropekit.angles(cfg2, pos)
        meta = cos_sin(cfg2, torch.arange(40), seq_len=40)  # meta positions: meta tables, no values
        py = cos_sin(cfg2, list(range(40)))  # Python positions are CPU positions
    assert inv.device.type == "cpu" and torch.equal(inv, want_inv)
    assert all(t.device.type == "cpu" for t in got + (ang,) + py)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(py[0], want[0])
    assert meta[0].device.type == "meta" and meta[0].shape == want[0].shape


@pytest.mark.parametrize("name", sorted(SCHEMES))
@pytest.mark.parametrize("max_position", [0, 64])
def test_rotary_embedding_meta_then_to_empty_rope_init(name, max_position):
    cfg = _cfg(name)
    q, k = torch.randn(2, 24, 4, 32), torch.randn(2, 24, 2, 32)
    ref = RotaryEmbedding(cfg, max_position=max_position)
    with torch.device("meta"):
        rope = RotaryEmbedding(cfg, max_position=max_position)
    rope = rope.to_empty(device="cpu")
    rope.rope_init()
    for a, b in zip(rope(q, k), ref(q, k)):
        assert torch.equal(a, b)
    if max_position:
        assert rope.cos_cached is not None and rope.cos_cached.device.type == "cpu"


_INSIDE_META = """
import torch, ropekit
cfg = ropekit.RopeConfig(32, base=500.0, scaling=ropekit.scaling.YaRN(4.0, 16))
q = torch.randn(1, 8, 2, 32, device="cpu")
ref = ropekit.RotaryEmbedding(cfg, max_position=16)(q, q)
rope = ropekit.RotaryEmbedding(cfg, max_position=16)
with torch.device("meta"):
    rope.rope_init("cpu")
    out = rope(q, q)
assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
print("ok")
"""


def test_rope_init_inside_meta_context():
    cfg = _cfg("yarn")
    ref = RotaryEmbedding(cfg, max_position=16)
    ref.rope_init()
    rope = RotaryEmbedding(cfg, max_position=16)
    with torch.device("meta"):
        rope.rope_init("cpu")
    assert rope.cos_cached.device.type == "cpu" and torch.equal(rope.cos_cached, ref.cos_cached)


def test_forward_of_a_cpu_module_inside_meta_context():
    """A module already on CPU, called on CPU tensors while a meta context is active.

    Run in a subprocess: a kernel reading a meta tensor's address would crash the interpreter
    (it once did), which must not take the test session down with it.
    """
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _INSIDE_META], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-500:])


@pytest.mark.parametrize("interleaved", [False, True])
def test_multi_axis_module_meta_then_to_empty(interleaved):
    cfg = RopeConfig(32, base=1000.0)
    secs = [8, 4, 4] if interleaved else [4, 6, 6]
    pos = torch.randint(0, 30, (2, 10, 3))
    q, k = torch.randn(2, 10, 4, 32), torch.randn(2, 10, 1, 32)
    ref = MultiAxisRotaryEmbedding(cfg, secs, interleaved=interleaved)(q, k, pos)
    with torch.device("meta"):
        mod = MultiAxisRotaryEmbedding(cfg, secs, interleaved=interleaved)
        axes = M.pair_axes(secs, interleaved=interleaved)
        tables = M.multi_axis_cos_sin(cfg, pos, secs, interleaved=interleaved)
    assert axes.device.type == "cpu" and tables[0].device.type == "cpu"
    mod = mod.to_empty(device="cpu")
    mod.rope_init()
    out = mod(q, k, pos)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("init", ["mixed", "axial"])
def test_rope_mixed_meta_then_to_empty_rope_init(init):
    ref = V.RopeMixed(16, 3, init=init, generator=torch.Generator().manual_seed(5))
    with torch.device("meta"):
        mod = V.RopeMixed(16, 3, init=init, generator=torch.Generator().manual_seed(5))
    assert mod.freqs.device.type == "meta"  # the parameter follows the context, like nn.Linear's
    mod = mod.to_empty(device="cpu")
    mod.rope_init(generator=torch.Generator().manual_seed(5))
    assert torch.equal(mod.freqs, ref.freqs)
    pos = M.image_positions(2, 3)
    q = torch.randn(1, 6, 3, 16)
    assert torch.equal(mod(q, q, positions=pos)[0], ref(q, q, positions=pos)[0])


def test_variants_and_helpers_inside_meta_context():
    cfg = RopeConfig(16)
    pos = torch.arange(12, device="cpu")
    want_p = V.p_rope_cos_sin(cfg, pos, 0.5)
    want_x = V.xpos_cos_sin(cfg, pos)
    ax = M.AxialRope(16, n_axes=2)
    grid = M.image_positions(3, 4)
    want_ax = ax.cos_sin(grid, n_special=1)
    tt = torch.tensor([[0, 0, 1, 1, 1, 1, 0]])
    g = torch.tensor([[1, 2, 2]])
    want_m = M.mrope_positions(tt, image_grid_thw=g)
    w = torch.randn(4 * 16, 8)
    with torch.device("meta"):
        got_p = V.p_rope_cos_sin(cfg, pos, 0.5)
        got_x = V.xpos_cos_sin(cfg, pos)
        zeta = V.xpos_zeta(cfg)
        got_ax = M.AxialRope(16, n_axes=2).cos_sin(M.image_positions(3, 4), n_special=1)
        got_pix = M.AxialRope(16, freqs="pixel").inv_freq()
        got_m = M.mrope_positions(tt, image_grid_thw=g)
        perm = layout_permutation(16, "half", "interleaved")
        conv = convert_layout(w, 4, "half", "interleaved")
        shard = shard_positions(8, 2, 0)
        cache = TableCache(cfg).get(5, device="cpu")
    for a, b in zip(got_p + tuple(got_x) + got_ax + got_m, want_p + tuple(want_x) + want_ax + want_m):
        assert a.device.type == "cpu" and torch.equal(a, b)
    for t in (zeta, got_pix, perm, conv, shard, cache[0]):
        assert t.device.type == "cpu"
    assert torch.equal(conv, convert_layout(w, 4, "half", "interleaved"))


def test_meta_weights_convert_on_meta():
    with torch.device("meta"):
        w = torch.empty(4 * 16, 8)
        out = convert_layout(w, 4, "half", "interleaved")
    assert out.device.type == "meta" and out.shape == w.shape


@pytest.mark.parametrize("name", ["plain", "yarn", "longrope", "llama3", "dynamic"])
def test_transformers_angles_inside_meta_context(name):
    cfg = _cfg(name)
    pos = torch.arange(40, device="cpu")
    want = cos_sin(cfg, pos, angles="transformers", seq_len=40)
    with torch.device("meta"):
        got = cos_sin(cfg, pos, angles="transformers", seq_len=40)
    assert got[0].device.type == "cpu" and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_positions_inside_meta_context_are_cpu_positions():
    from ropekit.positions import resolve_positions

    with torch.device("meta"):
        base = resolve_positions("bshd", 2, 3)
        off = resolve_positions("bshd", 2, 3, offsets=4)
        per = resolve_positions("bshd", 2, 3, offsets=torch.tensor([1, 2], device="cpu"))
        cu = ropekit.positions_from_cu_seqlens(torch.tensor([0, 2, 3], device="cpu"))
    assert base.tolist() == [0, 1, 2] and off.tolist() == [4, 5, 6]
    assert per.tolist() == [[1, 2, 3], [2, 3, 4]] and cu.tolist() == [0, 1, 0]
