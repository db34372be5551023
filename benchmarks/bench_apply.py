"""Benchmark: applying RoPE to q and k, against what users run today, with copy_ as the ceiling.

Measures in one run, on LLM-shaped inputs (prefill b=1 and 4, s=2048, hq=32, hk=8, d=128;
decode b=8, s=1; float32 and bfloat16; forward, backward, forward+backward):

* ropekit ``apply_rotary_qk`` with each CPU backend (``eager``, ``cpu``): in place, ``out=``
  and out of place, plus ``RotaryEmbedding`` (the fused position gather) and the bare
  operator ``torch.ops.ropekit.rotary_qk_`` (what the dispatcher call itself costs);
* a pair of aten in-place ops on the same tensors (``q.mul_(1.0); k.mul_(1.0)``): the
  per-call floor of any dispatcher op touching q and k;
* transformers' ``apply_rotary_pos_emb`` (``transformers.models.llama.modeling_llama``), with
  full-width tables in the model dtype as ``LlamaRotaryEmbedding`` returns them;
* Meta llama's complex form (``view_as_complex(x.float()) * freqs_cis``, written here);
* rotary-embedding-torch's ``apply_rotary_emb`` if it is installed (it is not a dependency);
* ``torch.compile`` of transformers' formula and of the cat-free rewrite
  ``cat((x1*c - x2*s, x2*c + x1*s))`` in float32;
* ``copy_`` of the same bytes (the bandwidth ceiling) and ``clone()`` (the allocation floor).

Every variant of one (shape, dtype, mode) is timed round-robin (one sample of each per
round), so load changes on a shared machine hit all of them alike. Rows are appended to
``benchmarks/results/apply.csv``: device, CPU, threads, versions, git revision, shape, dtype,
mode, median/p20/p80 (µs), GB/s and the ratio to the same-run ``copy_`` of the same bytes
(> 1 means faster than copy: in place moves fewer bytes than ``copy_``, which also reads
its destination). ``--plot`` draws ``benchmarks/results/apply.png`` from the CSV; ``--table``
prints the latest run as markdown. Also measured: the first call in a fresh process
("first_call", seconds after ``import torch, ropekit``: the operators are compiled at
install, nothing is built at run time) and a training step on views of one projection
("train" rows: the projection's forward + backward alone, and with ``apply_rotary_qk``
in place on its q/k views, beside the ``mul_`` pair).

Run: ``python benchmarks/bench_apply.py`` (all, ~10-20 min on 2 cores), ``--quick`` (subset).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ropekit import RopeConfig, RotaryEmbedding, apply_rotary, apply_rotary_qk, cos_sin
import ropekit.ops  # noqa: F401  (registers torch.ops.ropekit)

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # run as a script or loaded by `ropekit bench`
from _env import append_rows, cpu_level, cpu_model, git_rev, latest_rows, round_robin, stats, version  # noqa: E402
RESULTS = ROOT / "results"
CSV_PATH = RESULTS / "apply.csv"
PNG_PATH = RESULTS / "apply.png"
FIELDS = [
    "run", "device", "cpu", "level", "threads", "torch", "triton", "transformers", "git_rev", "variant", "shape",
    "b", "s", "hq", "hk", "d", "dtype", "mode", "median_us", "p20_us", "p80_us", "gbps", "ratio_to_copy",
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------
# environment





# ------------------------------------------------------------------------------------------
# the competitors (written here from their public formulas)


def hf_apply():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb


def meta_apply(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    """Meta llama's form: pairs (2i, 2i+1) as complex numbers times exp(i m θ); float32 math."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # [b, s, h, d/2]
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def hf_formula(q, k, cos, sin):
    """transformers' eager formula (rotate_half with cat), for torch.compile."""

    def rot_half(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    return q * cos + rot_half(q) * sin, k * cos + rot_half(k) * sin


def catfree_formula(q, k, c, s):
    """Compile-friendly rewrite: half-width float32 tables, one cat, one cast."""

    def one(x):
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h].float(), x[..., h:].float()
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return one(q), one(k)


# ------------------------------------------------------------------------------------------
# timing


# the shared harness (benchmarks/_env.py): torch.utils.benchmark.Timer samples, variants in turn
_round_robin, _stats = round_robin, stats


# ------------------------------------------------------------------------------------------
# one (shape, dtype)


def _inputs(b, s, hq, hk, d, dtype, decode):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, s, hq, d, generator=g).to(dtype)  # [b, s, hq, d]
    k = torch.randn(b, s, hk, d, generator=g).to(dtype)  # [b, s, hk, d]
    cfg = RopeConfig(d)
    if decode:  # one new token per sample, each at its own cache length
        pos = torch.tensor([100 + 37 * i for i in range(b)])[:, None]  # [b, 1]
    else:
        pos = torch.arange(s)[None].expand(b, s)  # [b, s]
    cos, sin = cos_sin(cfg, pos)  # [b, s, r/2] float32
    return cfg, q, k, pos, cos, sin


def variants(b, s, hq, hk, d, dtype, decode, with_compile) -> Tuple[Dict, Dict, Dict]:
    """Zero-argument callables per variant for forward, backward and forward+backward."""
    cfg, q, k, pos, cos, sin = _inputs(b, s, hq, hk, d, dtype, decode)
    c4, s4 = cos[:, :, None], sin[:, :, None]  # [b, s, 1, r/2] half width, float32
    cf = torch.cat((cos, cos), -1).to(dtype)  # [b, s, d] full width in the model dtype (transformers)
    sf = torch.cat((sin, sin), -1).to(dtype)
    freqs = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[:, :, None]  # [b, s, 1, d/2] complex64
    qd, kd = torch.empty_like(q), torch.empty_like(k)
    qi, ki = q.clone(), k.clone()
    fwd: Dict[str, Callable] = {}
    fwd["copy_"] = lambda: (qd.copy_(q), kd.copy_(k))
    fwd["clone()"] = lambda: (q.clone(), k.clone())
    for be in ("eager", "cpu"):
        fwd[f"ropekit-{be} in-place"] = lambda be=be: apply_rotary_qk(qi, ki, c4, s4, inplace=True, backend=be)
        fwd[f"ropekit-{be} out="] = lambda be=be: (
            apply_rotary(q, c4, s4, out=qd, backend=be), apply_rotary(k, c4, s4, out=kd, backend=be))
        fwd[f"ropekit-{be}"] = lambda be=be: apply_rotary_qk(q, k, c4, s4, backend=be)
    rope = RotaryEmbedding(cfg, backend="cpu", max_position=int(pos.max()) + 1)
    posarg = {"offsets": pos[:, 0]} if decode else {}
    fwd["ropekit-cpu module in-place"] = lambda: rope(qi, ki, inplace=True, **posarg)
    fwd["ropekit-cpu module"] = lambda: rope(q, k, **posarg)
    fwd["torch.ops.ropekit.rotary_qk_ (op only)"] = lambda: torch.ops.ropekit.rotary_qk_(qi, ki, c4, s4, "half", False)
    fwd["aten mul_ pair"] = lambda: (qi.mul_(1.0), ki.mul_(1.0))
    hf = hf_apply()
    fwd["transformers eager"] = lambda: hf(q, k, cf, sf, unsqueeze_dim=2)
    fwd["meta complex"] = lambda: meta_apply(q, k, freqs)
    try:
        from rotary_embedding_torch import apply_rotary_emb as ret_apply  # optional

        fr = torch.cat((torch.atan2(sin, cos),) * 2, -1)[:, :, None]  # [b, s, 1, d] angles
        fwd["rotary-embedding-torch"] = lambda: (ret_apply(fr, q, seq_dim=1), ret_apply(fr, k, seq_dim=1))
        fwd["rotary-embedding-torch"]()
    except Exception as e:  # not installed (the usual case) or an API it does not have
        fwd.pop("rotary-embedding-torch", None)
        print(f"  (rotary-embedding-torch skipped: {type(e).__name__}: {e})", flush=True)
    if with_compile:
        hfc = torch.compile(hf_formula, dynamic=False)
        cfc = torch.compile(catfree_formula, dynamic=False)
        cf4, sf4 = cf[:, :, None], sf[:, :, None]
        fwd["torch.compile(transformers)"] = lambda: hfc(q, k, cf4, sf4)
        fwd["torch.compile(cat-free)"] = lambda: cfc(q, k, c4, s4)

    # backward / fwd+bwd: the out-of-place variants, gradients of random upstream grads
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    grad_fns = {k_: v for k_, v in fwd.items() if k_ in (
        "ropekit-eager", "ropekit-cpu", "ropekit-cpu module", "transformers eager", "meta complex",
        "rotary-embedding-torch", "torch.compile(transformers)", "torch.compile(cat-free)")}
    bwd: Dict[str, Callable] = {"copy_": fwd["copy_"], "clone()": fwd["clone()"]}
    both: Dict[str, Callable] = {"copy_": fwd["copy_"], "clone()": fwd["clone()"]}
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()

    def _make_grad(name):
        fn = fwd_grad[name]
        outs = fn(qg, kg)
        bwd[name] = lambda: torch.autograd.grad(outs, (qg, kg), (gq, gk), retain_graph=True)
        both[name] = lambda: torch.autograd.grad(fn(qg, kg), (qg, kg), (gq, gk))

    fwd_grad: Dict[str, Callable] = {
        "ropekit-eager": lambda a, b_: apply_rotary_qk(a, b_, c4, s4, backend="eager"),
        "ropekit-cpu": lambda a, b_: apply_rotary_qk(a, b_, c4, s4, backend="cpu"),
        "ropekit-cpu module": lambda a, b_: rope(a, b_, **posarg),
        "transformers eager": lambda a, b_: hf(a, b_, cf, sf, unsqueeze_dim=2),
        "meta complex": lambda a, b_: meta_apply(a, b_, freqs),
    }
    if "rotary-embedding-torch" in fwd:
        fwd_grad["rotary-embedding-torch"] = lambda a, b_: (ret_apply(fr, a, seq_dim=1), ret_apply(fr, b_, seq_dim=1))
    if with_compile:
        fwd_grad["torch.compile(transformers)"] = lambda a, b_: hfc(a, b_, cf4, sf4)
        fwd_grad["torch.compile(cat-free)"] = lambda a, b_: cfc(a, b_, c4, s4)
    for name in grad_fns:
        _make_grad(name)
    return fwd, bwd, both


def bench_case(b, s, hq, hk, d, dtype_name, rounds, with_compile, meta, only=None, modes=None) -> List[dict]:
    dtype = DTYPES[dtype_name]
    decode = s == 1
    fwd, bwd, both = variants(b, s, hq, hk, d, dtype, decode, with_compile)
    if only:
        keep = lambda n: n in ("copy_", "clone()") or any(o in n for o in only)  # noqa: E731
        fwd, bwd, both = ({n: f for n, f in dct.items() if keep(n)} for dct in (fwd, bwd, both))
    inner = 200 if decode else 1
    nbytes = 2 * (b * s * (hq + hk) * d) * dtype.itemsize  # read + write of q and k
    rows = []
    for mode, fns in (("forward", fwd), ("backward", bwd), ("fwd+bwd", both)):
        if modes and mode not in modes:
            continue
        for fn in fns.values():  # warm-up (and torch.compile's compilations)
            for _ in range(3):
                fn()
        times = _round_robin(fns, rounds, inner)
        t_copy = statistics.median(times["copy_"])
        for name, ts in times.items():
            med, p20, p80 = _stats(ts)
            moved = nbytes * (2 if mode == "fwd+bwd" and name not in ("copy_", "clone()") else 1)
            rows.append(dict(meta, variant=name, shape=f"b={b} s={s} hq={hq} hk={hk} d={d}", b=b, s=s, hq=hq, hk=hk, d=d,
                             dtype=dtype_name, mode=mode, median_us=f"{med * 1e6:.2f}", p20_us=f"{p20 * 1e6:.2f}",
                             p80_us=f"{p80 * 1e6:.2f}", gbps=f"{moved / med / 1e9:.2f}",
                             ratio_to_copy=f"{moved / med / (nbytes / t_copy):.3f}"))
            print(f"  {mode:8s} {dtype_name:8s} b={b} s={s:<5d} {name:40s} {med * 1e6:10.1f} µs  "
                  f"{moved / med / 1e9:6.2f} GB/s  x{moved / med / (nbytes / t_copy):.2f} of copy_", flush=True)
    return rows


FIRST_CALL = r"""
import time
import torch, ropekit
q = torch.randn(1, 16, 4, 128)
cos, sin = ropekit.cos_sin(ropekit.RopeConfig(128), torch.arange(16))
t0 = time.perf_counter()
ropekit.apply_rotary(q, cos[:, None], sin[:, None], backend="cpu")
t1 = time.perf_counter()
print(t1 - t0)
"""


def first_call(meta) -> List[dict]:
    """First apply in a fresh process (after import torch/ropekit): nothing is compiled at run time."""
    out = subprocess.run([sys.executable, "-c", FIRST_CALL], capture_output=True, text=True, check=True)
    sec = float(out.stdout.strip().splitlines()[-1])
    print(f"  first_call         {sec:.4f} s", flush=True)
    return [dict(meta, variant="ropekit-cpu", shape="b=1 s=16 hq=4 hk=0 d=128", b=1, s=16, hq=4, hk=0, d=128,
                 dtype="float32", mode="first_call", median_us=f"{sec * 1e6:.0f}", p20_us="", p80_us="", gbps="",
                 ratio_to_copy="")]


def train_rows(meta, b, s, hq, hk, d, dtype_name, rounds) -> List[dict]:
    """A training step on views of one projection: ``qkv = x @ W`` viewed as ``[b, s, hq+2hk, d]``,
    q/k/v sliced from it, forward + backward of a loss on them; alone, and with ropekit rotating
    q and k in place on those views (what a model does). Beside the ``mul_`` pair."""
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    hidden = 64
    x = torch.randn(b, s, hidden, generator=g).to(dtype)
    w = torch.randn((hq + 2 * hk) * d, hidden, generator=g).to(dtype).requires_grad_()
    cos, sin = cos_sin(RopeConfig(d), torch.arange(s))
    c4, s4 = cos[:, None], sin[:, None]
    qi, ki = torch.randn(b, s, hq, d).to(dtype), torch.randn(b, s, hk, d).to(dtype)

    def step(rope):
        qkv = (x @ w.T).view(b, s, hq + 2 * hk, d)
        q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hk], qkv[:, :, hq + hk:]
        if rope == "ropekit":
            apply_rotary_qk(q, k, c4, s4, inplace=True)
        elif rope == "mul_":  # the same autograd work for in-place ops on views, with aten's cheapest op
            q.mul_(1.0)
            k.mul_(1.0)
        (q.sum() + k.sum() + v.sum()).backward()
        w.grad = None

    fns = {"aten mul_ pair": lambda: (qi.mul_(1.0), ki.mul_(1.0)), "train: projection fwd+bwd": lambda: step(None),
           "train: projection + mul_ pair in-place fwd+bwd": lambda: step("mul_"),
           "train: projection + ropekit in-place fwd+bwd": lambda: step("ropekit")}
    ts = _round_robin(fns, rounds, 20)
    med = {n: _stats(t)[0] for n, t in ts.items()}
    rows = []
    for name, t in ts.items():
        m, p20, p80 = _stats(t)
        rows.append(dict(meta, variant=name, shape=f"b={b} s={s} hq={hq} hk={hk} d={d}", b=b, s=s, hq=hq, hk=hk, d=d,
                         dtype=dtype_name, mode="train", median_us=f"{m * 1e6:.2f}", p20_us=f"{p20 * 1e6:.2f}",
                         p80_us=f"{p80 * 1e6:.2f}", gbps="", ratio_to_copy=""))
        print(f"  train    {dtype_name:8s} b={b} s={s:<5d} {name:48s} {m * 1e6:10.1f} µs", flush=True)
    extra = med["train: projection + ropekit in-place fwd+bwd"] - med["train: projection fwd+bwd"]
    pair = med["train: projection + mul_ pair in-place fwd+bwd"] - med["train: projection fwd+bwd"]
    print(f"  train    ropekit's added cost: {extra * 1e6:.1f} µs = x{extra / med['aten mul_ pair']:.2f} of the mul_ pair "
          f"alone, x{extra / pair:.2f} of the mul_ pair in the same step (in-place ops on views, with their "
          f"autograd: {pair * 1e6:.1f} µs)", flush=True)
    return rows






# ------------------------------------------------------------------------------------------
# outputs drawn from the CSV


def plot(path: Path, png: Path, run: Optional[str] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in latest_rows(path, run) if r["mode"] == "forward"]
    cases = sorted({(int(r["b"]), int(r["s"]), r["dtype"]) for r in rows}, key=lambda c: (c[2], -c[1], c[0]))
    if not cases:
        return
    ncol = len({c[:2] for c in cases})
    nrow = len({c[2] for c in cases})
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 0.32 * 18 * nrow + 1), squeeze=False, sharey=True)
    names = sorted({r["variant"] for r in rows if r["variant"] != "copy_"})
    shapes = sorted({c[:2] for c in cases}, key=lambda c: (-c[1], c[0]))
    dtypes = sorted({c[2] for c in cases}, reverse=True)
    for i, dt in enumerate(dtypes):
        for j, (b, s) in enumerate(shapes):
            ax = axes[i][j]
            sub = {r["variant"]: r for r in rows if (int(r["b"]), int(r["s"]), r["dtype"]) == (b, s, dt)}
            vals = [float(sub[n]["ratio_to_copy"]) if n in sub else 0.0 for n in names]
            colors = ["tab:green" if n.startswith(("ropekit-cpu", "cpu.")) else "tab:gray" if n == "clone()" else "tab:blue" for n in names]
            ax.barh(range(len(names)), vals, color=colors)
            ax.axvline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.set_title(f"{'decode' if s == 1 else 'prefill'} b={b} s={s}, {dt}", fontsize=9)
            ax.set_xlabel("throughput / copy_ (same bytes, same run)", fontsize=8)
            ax.tick_params(labelsize=7)
            for y, v in enumerate(vals):
                if v:
                    ax.text(v, y, f" {v:.2f}", va="center", fontsize=6)
    axes[0][0].set_yticks(range(len(names)))
    axes[0][0].set_yticklabels(names)
    r0 = rows[0]
    fig.suptitle(f"RoPE on q+k (hq={r0['hq']}, hk={r0['hk']}, d={r0['d']}), forward — {r0['cpu']}, {r0['threads']} threads, "
                 f"torch {r0['torch']}, rev {r0['git_rev']}", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def table(path: Path, modes=("forward", "backward", "fwd+bwd"), run: Optional[str] = None) -> str:
    rows = latest_rows(path, run)
    out = []
    for mode in modes:
        sub = [r for r in rows if r["mode"] == mode]
        if not sub:
            continue
        cases = []
        for r in sub:
            c = (r["dtype"], int(r["b"]), int(r["s"]))
            if c not in cases:
                cases.append(c)
        names = []
        for r in sub:
            if r["variant"] not in names:
                names.append(r["variant"])
        out.append(f"\n**{mode}** — median µs (ratio to `copy_` of the same bytes)\n")
        out.append("| variant | " + " | ".join(f"{dt} b={b} s={s}" for dt, b, s in cases) + " |")
        out.append("|---|" + "---|" * len(cases))
        for n in names:
            cells = []
            for c in cases:
                r = next((x for x in sub if x["variant"] == n and (x["dtype"], int(x["b"]), int(x["s"])) == c), None)
                cells.append(f"{float(r['median_us']):.1f} ({float(r['ratio_to_copy']):.2f})" if r else "–")
            out.append(f"| {n} | " + " | ".join(cells) + " |")
    first = [r for r in rows if r["mode"].startswith("first_call")]
    if first:
        out.append("\nFirst call in a fresh process (after imports): " + ", ".join(
            f"{r['mode'].replace('first_call_', '')} {float(r['median_us']) / 1e6:.3f} s" for r in first))
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="prefill b=1 and decode, no torch.compile, fewer rounds")
    ap.add_argument("--rounds", type=int, default=None, help="samples per variant (default 15, quick 7)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--cases", default=None, help="e.g. '1x2048,4x2048,8x1' (b x s)")
    ap.add_argument("--variants", default=None, help="comma-separated substrings: time only matching variants (+ copy_/clone())")
    ap.add_argument("--modes", default="forward,backward,fwd+bwd,train")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (the cpu kernel follows it)")
    ap.add_argument("--no-first-call", action="store_true", help="skip the fresh-process first-call measurement")
    ap.add_argument("--csv", type=Path, default=CSV_PATH)
    ap.add_argument("--plot", action="store_true", help="only draw the PNG from the CSV's latest run")
    ap.add_argument("--table", action="store_true", help="only print the CSV's latest run as markdown")
    ap.add_argument("--run", default=None, help="with --plot/--table: the run (its timestamp) instead of the latest")
    ap.add_argument("--png", type=Path, default=None, help="with --plot: output path (default: the CSV's name, .png)")
    args = ap.parse_args(argv)
    if args.plot:
        return plot(args.csv, args.png or args.csv.with_suffix(".png"), args.run)
    if args.table:
        return print(table(args.csv, run=args.run))

    if args.threads:
        torch.set_num_threads(args.threads)
    hq, hk, d = 32, 8, 128
    cases = [(1, 2048), (8, 1)] if args.quick else [(1, 2048), (4, 2048), (8, 1)]
    if args.cases:
        cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    rounds = args.rounds or (7 if args.quick else 15)
    with_compile = not (args.quick or args.no_compile)
    meta = dict(run=_dt.datetime.now().isoformat(timespec="seconds"), device="cpu", cpu=cpu_model(), level=cpu_level(),
                threads=torch.get_num_threads(), torch=torch.__version__, triton=version("triton"),
                transformers=version("transformers"), git_rev=git_rev("bench_apply.py"))
    print(f"ropekit apply benchmark: {meta}", flush=True)
    rows = [] if args.no_first_call else first_call(meta)
    only = args.variants.split(",") if args.variants else None
    for dtn in args.dtypes.split(","):
        for b, s in cases:
            rows += bench_case(b, s, hq, hk, d, dtn, rounds, with_compile, meta, only, args.modes.split(","))
            if "train" in args.modes.split(","):
                rows += train_rows(meta, b, s, hq, hk, d, dtn, rounds)
    append_rows(rows, args.csv, FIELDS)
    print(f"appended {len(rows)} rows to {args.csv}")
    plot(args.csv, args.csv.with_suffix(".png"))
    print(table(args.csv))


if __name__ == "__main__":
    main()
