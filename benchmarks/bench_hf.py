"""Benchmark: a small Llama-shaped transformers model on CPU, patched by ropekit vs unpatched.

One run times, round-robin (one sample of each variant per round, so load changes on a
shared machine hit all variants alike), forward (``torch.no_grad``) and forward+backward
(``logits.float().mean().backward()``) of ``LlamaForCausalLM`` built from a config
(random weights, no download) for these variants:

* ``transformers``  — unpatched: transformers' float32 tables and eager ``apply_rotary_pos_emb``;
* ``ropekit_tables_transformers`` — ``patch(model, tables="transformers")``: their tables,
  ropekit's fused apply (``backend="auto"``: the ``cpu`` kernel when it builds);
* ``ropekit_exact`` — ``patch(model, tables="exact")``: ropekit's exact tables and apply;
* ``no_rope`` — RoPE removed: ``apply_rotary_pos_emb`` returns q, k unchanged and the rotary
  module returns precomputed tables. The baseline for the RoPE share of the step,
  ``share = (t_variant - t_no_rope) / t_variant`` (noisy when RoPE is ~1% of the step).

The RoPE time of a forward is also measured directly (``rope_fwd_direct_ms``): the summed
wall time inside the rotary module and ``apply_rotary_pos_emb`` calls of one forward,
median of 5 instrumented forwards taken outside the timed rounds.

Rows go to ``benchmarks/results/hf.csv`` (device, CPU, threads, versions, git revision,
shape, variant, mode, median/p20/p80 in ms, RoPE share and ms).

``--table-error`` instead prints the table error of transformers' float32 tables and of
ropekit's exact tables against a float64 oracle over positions ``0 .. 2^k - 1`` (k = 17, 20),
for a Llama-2-style and a Llama-3.1-style rotary config (numbers quoted in
``docs/transformers.md``).

Run: ``python benchmarks/bench_hf.py`` (~1-3 min on 2 shared cores),
``python benchmarks/bench_hf.py --table-error``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from ropekit.integrations import transformers as rt

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # run as a script or loaded by `ropekit bench`
from _env import append_rows, cpu_level, cpu_model, git_rev, round_robin, stats  # noqa: E402
CSV_PATH = ROOT / "results" / "hf.csv"
FIELDS = [
    "run", "device", "cpu", "level", "threads", "torch", "transformers", "ropekit_backend", "git_rev", "shape",
    "b", "s", "hidden", "layers", "heads", "kv_heads", "head_dim", "dtype", "variant", "mode",
    "median_ms", "p20_ms", "p80_ms", "rope_ms", "rope_share", "rope_fwd_direct_ms", "samples",
]  # fmt: skip




_stats = stats  # the shared harness (benchmarks/_env.py)


# ------------------------------------------------------------------------------------------
# model and variants


def build(args):
    import transformers as T

    cfg = T.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        intermediate_size=int(args.hidden * 8 / 3) // 64 * 64, max_position_embeddings=max(4096, args.s),
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = T.LlamaForCausalLM(cfg).to(args.dtype)
    return model


class _NoRope:
    """Remove RoPE from a Llama model: identity apply, constant tables."""

    def __init__(self, model, ids):
        from transformers.models.llama import modeling_llama as ml

        self.ml, self.model = ml, model
        rot = model.model.rotary_emb
        with torch.no_grad():
            x = torch.zeros(1, dtype=next(model.parameters()).dtype)
            self.tables = rot(x, torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1))

    def __enter__(self):
        self.orig = self.ml.apply_rotary_pos_emb
        self.ml.apply_rotary_pos_emb = lambda q, k, cos, sin, unsqueeze_dim=1: (q, k)
        tables = self.tables
        self.model.model.rotary_emb.forward = lambda x, position_ids=None: tables
        return self

    def __exit__(self, *exc):
        self.ml.apply_rotary_pos_emb = self.orig
        del self.model.model.rotary_emb.__dict__["forward"]


def _step(model, ids, mode: str) -> Callable[[], None]:
    if mode == "fwd":

        def run():
            with torch.no_grad():
                model(ids)

    else:

        def run():
            model.zero_grad(set_to_none=True)
            model(ids).logits.float().mean().backward()

    return run


class _RopeTimer:
    """Sum the wall time spent inside the rotary module and ``apply_rotary_pos_emb`` calls
    of one forward (whatever they currently are: transformers', ropekit's dispatcher)."""

    def __init__(self, model):
        from transformers.models.llama import modeling_llama as ml

        self.ml, self.rot, self.total = ml, model.model.rotary_emb, 0.0

    def _timed(self, f):
        def g(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                self.total += time.perf_counter() - t0

        return g

    def __enter__(self):
        self.fn, self.had, self.fwd = self.ml.apply_rotary_pos_emb, "forward" in self.rot.__dict__, self.rot.forward
        self.ml.apply_rotary_pos_emb = self._timed(self.fn)
        self.rot.forward = self._timed(self.fwd)
        return self

    def __exit__(self, *exc):
        self.ml.apply_rotary_pos_emb = self.fn
        if self.had:
            self.rot.forward = self.fwd
        else:
            del self.rot.__dict__["forward"]


def _direct_rope_ms(model, ids, name: str, n: int = 5) -> float:
    """Median over ``n`` forwards of the time inside RoPE calls (tables + apply), ms."""
    out = []

    def fn():
        with _RopeTimer(model) as t, torch.no_grad():
            model(ids)
        out.append(t.total * 1e3)

    for _ in range(n):
        _in_variant(model, ids, name, fn)
    return statistics.median(out)


def _in_variant(model, ids, name: str, fn: Callable[[], None]) -> None:
    if name == "transformers":
        fn()
    elif name == "no_rope":
        with _NoRope(model, ids):
            fn()
    else:
        with rt.patched(model, tables="transformers" if name == "ropekit_tables_transformers" else "exact"):
            fn()


VARIANTS = ("transformers", "ropekit_tables_transformers", "ropekit_exact", "no_rope")


def bench(args) -> List[dict]:
    import transformers

    model = build(args)
    ids = torch.randint(3, args.vocab, (args.b, args.s), generator=torch.Generator().manual_seed(1))
    rows = []
    run_id = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    with rt.patched(model) as rep:
        backend = rep.backend
    for mode in args.modes:
        fn = _step(model, ids, mode)
        for v in VARIANTS:  # warm-up (kernel build/load, allocator, lazy imports)
            for _ in range(2):
                _in_variant(model, ids, v, fn)
        runs = {v: (lambda v=v: _in_variant(model, ids, v, fn)) for v in VARIANTS}
        times = {v: [t * 1e3 for t in ts] for v, ts in round_robin(runs, args.rounds, 1).items()}  # ms
        base = statistics.median(times["no_rope"])
        direct = {v: _direct_rope_ms(model, ids, v) for v in VARIANTS if v != "no_rope"}
        for v in VARIANTS:
            med, p20, p80 = _stats(times[v])
            rows.append(
                dict(
                    run=run_id, device="cpu", cpu=cpu_model(), level=cpu_level(), threads=torch.get_num_threads(),
                    torch=torch.__version__, transformers=transformers.__version__, ropekit_backend=backend,
                    git_rev=git_rev("bench_hf.py"), shape=f"b{args.b} s{args.s} L{args.layers} h{args.heads}/{args.kv_heads} d{args.hidden // args.heads}",
                    b=args.b, s=args.s, hidden=args.hidden, layers=args.layers, heads=args.heads,
                    kv_heads=args.kv_heads, head_dim=args.hidden // args.heads, dtype=str(args.dtype).replace("torch.", ""),
                    variant=v, mode=mode, median_ms=f"{med:.3f}", p20_ms=f"{p20:.3f}", p80_ms=f"{p80:.3f}",
                    rope_ms=f"{med - base:.3f}", rope_share=f"{(med - base) / med:.4f}",
                    rope_fwd_direct_ms=f"{direct[v]:.3f}" if v in direct else "", samples=len(times[v]),
                )  # fmt: skip
            )
    return rows


def write(rows: List[dict]) -> None:
    append_rows(rows, CSV_PATH, FIELDS)


def print_table(rows: List[dict]) -> None:
    print(f"\n{rows[0]['shape']}, {rows[0]['dtype']}, {rows[0]['threads']} thread(s), backend {rows[0]['ropekit_backend']}")
    print("| mode | variant | median ms | p20 | p80 | RoPE ms (vs no_rope) | RoPE share | RoPE fwd ms (direct) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['variant']} | {r['median_ms']} | {r['p20_ms']} | {r['p80_ms']} | "
            f"{r['rope_ms']} | {float(r['rope_share']) * 100:.1f}% | {r['rope_fwd_direct_ms'] or '-'} |"
        )


# ------------------------------------------------------------------------------------------
# table error at long positions


def table_error(exponents=(17, 20), chunk: int = 1 << 15) -> List[dict]:
    """Max |table - oracle| over positions 0 .. 2^k - 1 and all frequencies.

    Oracle: cos/sin in float64 of the float64 angle ``m * inv_freq64`` (the frequencies
    from ``RopeConfig.inv_freq()``, float64; for unscaled RoPE this is ``base^(-2i/d)``).
    transformers: the float32 tables of ``LlamaRotaryEmbedding`` (their module, run here).
    ropekit: ``patch(tables="exact")``'s tables (float64 angles rounded once to float32).
    """
    import transformers as T
    from ropekit.hf import rope_config_from_hf

    configs = {
        "llama2-style d128 base 1e4": T.LlamaConfig(
            hidden_size=4096, num_attention_heads=32, max_position_embeddings=4096
        ),
        "llama3.1-style d128 base 5e5 llama3x8": T.LlamaConfig(
            hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=8192),
        ),  # fmt: skip
    }
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    out = []
    for name, hf_cfg in configs.items():
        rot = LlamaRotaryEmbedding(hf_cfg)
        cfg = rope_config_from_hf(hf_cfg)
        inv64 = cfg.inv_freq()  # float64 [r/2]
        exact_fwd = rt._exact_forward(rot, "rope")
        x = torch.zeros(1)
        for k in exponents:
            n = 1 << k
            err = {"transformers": 0.0, "ropekit": 0.0}
            for start in range(0, n, chunk):
                pos = torch.arange(start, min(n, start + chunk))[None]  # [1, c]
                ang = pos[..., None].double() * inv64  # float64 [1, c, r/2]
                oc, os_ = ang.cos(), ang.sin()
                h = inv64.shape[0]
                tc, ts = (t[..., :h].double() for t in rot(x, pos))
                ec, es = (t[..., :h].double() for t in exact_fwd(x, pos))
                err["transformers"] = max(err["transformers"], (tc - oc).abs().max().item(), (ts - os_).abs().max().item())
                err["ropekit"] = max(err["ropekit"], (ec - oc).abs().max().item(), (es - os_).abs().max().item())
            out.append(dict(config=name, positions=f"2^{k}", **err))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--b", type=int, default=1)
    p.add_argument("--s", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to the CSV")
    p.add_argument("--table-error", action="store_true", help="print the long-position table error and exit")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table_error:
        print("| config | positions | transformers float32 max abs err | ropekit exact max abs err |")
        print("|---|---|---:|---:|")
        for r in table_error():
            print(f"| {r['config']} | {r['positions']} | {r['transformers']:.3e} | {r['ropekit']:.3e} |")
        return
    args.dtype = getattr(torch, args.dtype)
    rows = bench(args)
    if not args.no_write:
        write(rows)
    print_table(rows)


if __name__ == "__main__":
    main()
