"""Context parallelism: shard, rotate on each rank, all-gather, compare with one process.

One ``torch.multiprocessing.spawn`` per world size (2 and 4, gloo on CPU); every check runs
inside it and a failing rank fails the test with its traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist

import ropekit
from ropekit import RopeConfig, RopeError, RotaryEmbedding
from ropekit.parallel import rotate_dtensor, shard, shard_packed, shard_positions, unshard


# --------------------------------------------------------------------- single process


def test_shard_positions_cover_sequence_once():
    for scheme in ("contiguous", "zigzag"):
        for w in (1, 2, 3, 4):
            S = 24
            pos = torch.cat([shard_positions(S, w, r, scheme=scheme) for r in range(w)])
            assert sorted(pos.tolist()) == list(range(S))  # a permutation of 0..S-1
            x = torch.arange(S)
            for r in range(w):  # shard(x) and shard_positions agree
                assert torch.equal(shard(x, w, r, seq_dim=0, scheme=scheme), shard_positions(S, w, r, scheme=scheme))


def test_zigzag_definition_and_causal_balance():
    # rank r holds chunks r and 2W-1-r (written from the definition, S = 16, W = 4, chunk 2)
    assert shard_positions(16, 4, 1, scheme="zigzag").tolist() == [2, 3, 12, 13]
    # causal work (keys visible to each query = position + 1) is equal on every rank
    S, w = 64, 4
    work = [int((shard_positions(S, w, r, scheme="zigzag") + 1).sum()) for r in range(w)]
    assert len(set(work)) == 1
    contiguous = [int((shard_positions(S, w, r) + 1).sum()) for r in range(w)]
    assert len(set(contiguous)) == w  # the imbalance zigzag removes


def test_unshard_inverts_shard_all_dims():
    x = torch.randn(2, 12, 3, 4)
    for scheme in ("contiguous", "zigzag"):
        for dim in (1, -3):
            parts = [shard(x, 3, r, seq_dim=dim, scheme=scheme) for r in range(3)]
            assert torch.equal(unshard(parts, seq_dim=dim, scheme=scheme), x)


def test_shard_packed_positions_restart_per_sequence():
    cu = torch.tensor([0, 8, 8, 12, 28])  # includes an empty sequence
    pos_all = ropekit.positions_from_cu_seqlens(cu)
    for scheme in ("contiguous", "zigzag"):
        seen = []
        for r in range(2):
            idx, pos, lcu = shard_packed(cu, 2, r, scheme=scheme)
            assert torch.equal(pos, pos_all[idx]) and int(lcu[-1]) == idx.numel() == 14
            assert torch.equal(ropekit.positions_from_cu_seqlens(lcu).numel() * torch.ones(()), torch.tensor(14.0))
            seen += idx.tolist()
        assert sorted(seen) == list(range(28))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: shard_positions(10, 4, 0), r"divisible by 4"),
        (lambda: shard_positions(12, 4, 0, scheme="zigzag"), r"divisible by 8"),
        (lambda: shard_positions(8, 2, 2), r"rank in \[0, 2\)"),
        (lambda: shard_positions(8, 0, 0), r"world_size >= 1"),
        (lambda: shard_positions(8, 2, 0, scheme="ring"), r"scheme in"),
        (lambda: shard(torch.zeros(4, 8), 2, 0, seq_dim=2), r"seq_dim in \[-2, 2\)"),
        (lambda: unshard([torch.zeros(4), torch.zeros(3)], seq_dim=0), r"shards of one shape"),
        (lambda: shard_packed(torch.tensor([0, 3, 8]), 2, 0), r"sequence 0 of length 3"),
    ],
)
def test_errors(call, match):
    with pytest.raises(RopeError, match=match):
        call()


# --------------------------------------------------------------------- multi-process


def _gather(t: torch.Tensor, w: int):
    out = [torch.empty_like(t) for _ in range(w)]
    dist.all_gather(out, t.contiguous())
    return out


def gloo_worker(rank: int, world: int, init_file: str, checks) -> None:
    """One rank of a ``torch.multiprocessing.spawn`` gloo group (CPU): runs ``checks(rank,
    world)`` (a module-level function), then exits without tearing gloo down."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        checks(rank, world)
        # every rank done before teardown: a rank destroying gloo while a peer still has
        # traffic in flight aborts the process ("terminate called without an active exception")
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # checks passed on this rank: exit without tearing gloo down (its teardown still aborted
    # now and then on a loaded 2-core machine, after the barrier); the OS releases it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _checks(rank: int, w: int) -> None:
    torch.manual_seed(0)  # the same full tensors on every rank
    b, S, hq, hk, d = 2, 8 * w, 3, 2, 16
    n = 0
    for layout in ropekit.LAYOUTS:
        cfg = RopeConfig(d, rotary_dim=12, layout=layout)
        rope = RotaryEmbedding(cfg)
        q, k = torch.randn(b, S, hq, d), torch.randn(b, S, hk, d)
        for scheme in ("contiguous", "zigzag"):
            # bshd with per-sample KV-cache offsets, and sbhd with one shared offset
            off = torch.tensor([0, 37])
            q_full, k_full = rope(q, k, offsets=off)
            pos = shard_positions(S, w, rank, scheme=scheme)  # [s]
            ql, kl = (shard(t, w, rank, seq_dim=1, scheme=scheme) for t in (q, k))
            q2, k2 = rope(ql, kl, positions=off[:, None] + pos)  # [b, s]
            for got, want in ((q2, q_full), (k2, k_full)):
                assert torch.equal(unshard(_gather(got, w), seq_dim=1, scheme=scheme), want), (layout, scheme, "bshd")
                n += 1
            qs, ks = q.transpose(0, 1).contiguous(), k.transpose(0, 1).contiguous()  # sbhd
            qs_full, _ = rope(qs, ks, offsets=5, format="sbhd")
            qs2, _ = rope(*(shard(t, w, rank, seq_dim=0, scheme=scheme) for t in (qs, ks)), positions=pos + 5, format="sbhd")
            assert torch.equal(unshard(_gather(qs2, w), seq_dim=0, scheme=scheme), qs_full), (layout, scheme, "sbhd")
            # packed sequences: every sequence split across the ranks
            lens = [4 * w, 0, 2 * w, 6 * w]
            cu = torch.tensor([0] + lens).cumsum(0)
            t = int(cu[-1])
            qt, kt = torch.randn(t, hq, d), torch.randn(t, hk, d)
            qt_full, kt_full = rope(qt, kt, cu_seqlens=cu, format="thd")
            idx, lpos, lcu = shard_packed(cu, w, rank, scheme=scheme)
            q3, k3 = rope(qt[idx], kt[idx], positions=lpos, format="thd")
            idx_all = torch.cat(_gather(idx, w))
            for got, want in ((q3, qt_full), (k3, kt_full)):
                full = torch.empty_like(want)
                full[idx_all] = torch.cat(_gather(got, w))
                assert torch.equal(full, want), (layout, scheme, "thd")
                n += 1
            # ring attention: local queries against keys gathered already rotated give the
            # single-process scores, which depend on relative positions only (offset-free here)
            kg = unshard(_gather(k2, w), seq_dim=1, scheme=scheme)
            q0, k0 = rope(q, k)
            torch.testing.assert_close(
                torch.einsum("bqhd,bkhd->bhqk", q2[:, :, :hk], kg),
                torch.einsum("bqhd,bkhd->bhqk", shard(q0, w, rank, seq_dim=1, scheme=scheme)[:, :, :hk], k0),
                atol=1e-4, rtol=1e-4,
            )
    # DTensor sharded on the sequence dim (if this torch has it), uneven split included
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
    except ImportError:  # pragma: no cover - old torch
        return
    mesh = init_device_mesh("cpu", (w,))
    rope = RotaryEmbedding(RopeConfig(d))
    for S2 in (4 * w, 4 * w + 1):
        q, k = torch.randn(b, S2, hq, d), torch.randn(b, S2, hk, d)
        qd, kd = (distribute_tensor(t, mesh, [Shard(1)]) for t in (q, k))
        q2, k2 = rotate_dtensor(rope, qd, kd, offsets=3)
        want_q, want_k = rope(q, k, offsets=3)
        assert q2.placements == qd.placements
        assert torch.equal(q2.full_tensor(), want_q) and torch.equal(k2.full_tensor(), want_k), ("dtensor", S2)
    assert n == 16


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_single_process(world):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(gloo_worker, args=(world, os.path.join(tmp, "init"), _checks), nprocs=world, join=True)
