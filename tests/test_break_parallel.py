"""Adversarial inputs to ``ropekit.parallel``: defects found by trying to break it, kept as
regression tests. Expected values come from a plain Python reference of the schemes (rank
``r`` holds chunk ``r``, or chunks ``r`` and ``2W-1-r`` for zigzag)."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

from ropekit import RopeConfig, RopeError, RotaryEmbedding
from ropekit.config import MAX_EXACT_POSITION
from ropekit.parallel import rotate_dtensor, shard, shard_packed, shard_positions, unshard


def _ref_positions(S, W, r, scheme):
    if scheme == "contiguous":
        c = S // W
        return list(range(r * c, (r + 1) * c))
    c = S // (2 * W)
    return list(range(r * c, (r + 1) * c)) + list(range((2 * W - 1 - r) * c, (2 * W - r) * c))


def test_shard_positions_past_exact_positions_is_refused():
    # was: positions up to 2**60 (not exact in the float64 angle), or an OverflowError
    with pytest.raises(RopeError, match="seq_len"):
        shard_positions(2**60, 2**59, 2**59 - 1)
    with pytest.raises(RopeError, match="seq_len"):
        shard_positions(2**64, 2**63, 2**63 - 1)
    # the largest exact length is fine: the last rank holds positions up to 2**53 - 1
    S = MAX_EXACT_POSITION
    assert shard_positions(S, S // 2, S // 2 - 1).tolist() == _ref_positions(S, S // 2, S // 2 - 1, "contiguous")


def test_shard_positions_take_numpy_and_0d_tensor_ints():
    # seq_len from a tensor (attention_mask.sum()) or NumPy was refused as "not an int"
    for scheme in ("contiguous", "zigzag"):
        want = _ref_positions(24, 3, 1, scheme)
        assert shard_positions(np.int64(24), np.int64(3), np.int64(1), scheme=scheme).tolist() == want
        assert shard_positions(torch.tensor(24), 3, torch.tensor(1), scheme=scheme).tolist() == want
    with pytest.raises(RopeError, match="rank"):
        shard_positions(24, 3, True)


def test_unshard_refuses_mixed_dtypes_and_devices():
    # was: torch.cat promoted the int64 shards to float64, silently
    x = torch.arange(24).view(2, 12)
    for scheme in ("contiguous", "zigzag"):
        parts = [shard(x, 3, r, seq_dim=1, scheme=scheme) for r in range(3)]
        parts[1] = parts[1].double()
        with pytest.raises(RopeError, match="dtype"):
            unshard(parts, seq_dim=1, scheme=scheme)
        parts[1] = parts[1].long().to("meta")
        with pytest.raises(RopeError, match="device"):
            unshard(parts, seq_dim=1, scheme=scheme)


def test_shard_packed_keeps_the_cu_seqlens_dtype():
    # flash-attn's varlen kernels take int32 cu_seqlens: int32 in gave int64 local boundaries
    lens = [4, 0, 8]
    for dtype in (torch.int32, torch.int64):
        cu = torch.tensor([0, 4, 4, 12], dtype=dtype)
        for scheme in ("contiguous", "zigzag"):
            idx, pos, lcu = shard_packed(cu, 2, 1, scheme=scheme)
            assert lcu.dtype == dtype
            ref = [0]
            for n in lens:
                ref.append(ref[-1] + len(_ref_positions(n, 2, 1, scheme)))
            assert lcu.tolist() == ref
            assert idx.dtype == pos.dtype == torch.int64


def test_shard_packed_meta_cu_seqlens_message():
    # the message asked for total=, an argument shard_packed does not have
    with pytest.raises(RopeError, match="meta") as e:
        shard_packed(torch.tensor([0, 4], device="meta"), 2, 0)
    assert "total=" not in str(e.value)


# --------------------------------------------------------------------------- rotate_dtensor
def _dtensor_checks(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    flipped = DeviceMesh("cpu", torch.arange(world - 1, -1, -1))  # same ranks, other order
    rope = RotaryEmbedding(RopeConfig(16))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, 3, 16, generator=g), torch.randn(2, 8, 1, 16, generator=g)
    qd = distribute_tensor(q, mesh, [Shard(1)])
    kd = distribute_tensor(k, mesh, [Shard(1)])
    # k on another mesh holds another slice on this rank: it was rotated with q's positions
    kf = distribute_tensor(k, flipped, [Shard(1)])
    with pytest.raises(RopeError, match="mesh"):
        rotate_dtensor(rope, qd, kf)
    # not a module: was TypeError ("'NoneType' object is not callable")
    with pytest.raises(RopeError, match="rope"):
        rotate_dtensor(None, qd, kd)
    # a sequence-length mismatch says so (it reported the placements, which were equal)
    with pytest.raises(RopeError, match="sequence length 8 and 4"):
        rotate_dtensor(rope, qd, distribute_tensor(k[:, :4], mesh, [Shard(1)]))
    # 3-D tensors for a 4-D format: the rank is named
    with pytest.raises(RopeError, match="4 dims"):
        rotate_dtensor(rope, distribute_tensor(q[0], mesh, [Shard(0)]), distribute_tensor(k[0], mesh, [Shard(0)]))
    # and the good call is unchanged: this rank's slice of the single-process rotation
    q2, k2 = rotate_dtensor(rope, qd, kd)
    want_q, want_k = rope(q, k)
    assert torch.equal(q2.to_local(), torch.chunk(want_q, world, dim=1)[rank])
    assert torch.equal(k2.to_local(), torch.chunk(want_k, world, dim=1)[rank])


def test_rotate_dtensor_refusals():
    pytest.importorskip("torch.distributed.tensor")
    import torch.multiprocessing as mp

    from test_parallel import gloo_worker

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(gloo_worker, args=(2, os.path.join(tmp, "init"), _dtensor_checks), nprocs=2, join=True)
