"""GPU check and benchmark of the Triton backend: timings against peers, CUDA graphs, int64 offsets, block sizes.

One run (``make gpu-check`` runs it after opcheck and the GPU tests with ``ROPEKIT_TEST_DEVICE=cuda``)
answers:

* **Timings** on LLM shapes (q ``[b, s, 32, 128]`` and k ``[b, s, 8, 128]``, bshd): prefill
  b = 1, 2, 4, 8 at s = 4096 and decode b = 64, 256 at s = 1 (each sample at its own
  position); bfloat16, float16, float32; forward, backward, forward+backward; in place and
  out of place. Variants: ropekit's ``triton`` backend (``apply_rotary_qk`` and
  ``RotaryEmbedding``, in place and out of place), Liger-Kernel's RoPE, flash-attention's
  Triton rotary, FlashInfer's RoPE, transformers' eager ``apply_rotary_pos_emb``,
  ``torch.compile`` of that formula, and ``copy_`` of the same bytes. A peer that does not
  import is skipped with a row saying why; one that raises is recorded as an error row and
  the run goes on. Every variant's output (and gradient) is compared once with ropekit's
  float32 eager result before it is timed (``max_err``; ``MISMATCH`` in ``note`` past 8 ulps
  of the dtype).
* **CUDA graphs**: the decode step captured and replayed (``RotaryEmbedding`` eager,
  ``torch.compile(RotaryEmbedding)``, and ``apply_rotary_qk`` on table rows indexed on the
  device); each capture is preceded by one step under ``torch.cuda.set_sync_debug_mode
  ("error")`` (host syncs are reported), replays are compared with eager calls on the
  same inputs, and a replay is timed.
* **int64 offsets**: one tensor with more than 2^31 elements rotated out of place, in place
  and through ``RotaryEmbedding``, checked chunk by chunk against the eager backend.
* **QK-norm + RoPE** (``apply_qk_norm_rotary``: per-head RMSNorm of q and k, then RoPE):
  the fused Triton kernel (out of place and in place) against ropekit's unfused path
  (torch float32 norm, then the triton RoPE kernel), transformers' eager Qwen3 code
  (``Qwen3RMSNorm`` + ``apply_rotary_pos_emb``) and ``torch.compile`` of it; prefill b = 1
  s = 2048 and decode b = 8 s = 1, bfloat16 and float32, forward and forward+backward
  (gradients of q, k and both norm weights). Rows: ``mode`` "qk-norm forward" / "qk-norm
  fwd+bwd", each checked first against ropekit's eager composition.
* **Block sizes**: a sweep over the kernel's launch parameters (``triton.LAUNCH``: tile,
  heads per program, warps) per shape class, each configuration checked bit-exact against
  the default, the best printed.

Timing: every variant of one (shape, dtype, mode) is timed round-robin; on CUDA each sample
is CUDA events around the call(s), prefill samples after overwriting a buffer of 4x the L2
cache (q/k come from HBM, not L2), decode samples as the mean of 20 back-to-back calls
(launch- and host-bound: that is what decode costs without a graph). ``gbps`` counts the
bytes of q and k read once and written once (twice that for forward+backward); ``frac_peak``
divides it by the GPU's peak memory bandwidth (from the clock and bus width torch reports,
else a table of known GPUs, else ``--peak-gbps``); ``ratio_to_copy`` compares with the
same-run ``copy_`` of the same bytes.

Output: ``OUT/gpu.csv`` (one row per measurement or check, environment columns included)
and ``OUT/summary.md`` (targets, tables, checks, skipped peers), which ends with one summary
table: the tests, every variant as µs and % of the same-run ``copy_`` bandwidth, missing peers
as ``not installed``, the CUDA-graph and int64 checks. ``--device cpu`` runs the
same code under ``TRITON_INTERPRET=1`` on tiny shapes (``tests/test_bench_gpu.py``).

Run: ``python benchmarks/bench_gpu.py --out gpu-results`` (``--budget-s`` bounds the time:
sections not reached are listed as skipped), ``--summarize`` (only rewrite summary.md from
the CSV).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import itertools
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # run as a script or imported by the tests
from _env import git_rev, version  # noqa: E402

FIELDS = [
    "run", "device", "gpu", "driver", "cuda", "torch", "triton", "transformers", "liger", "git_rev", "peak_gbps",
    "variant", "shape", "b", "s", "hq", "hk", "d", "dtype", "mode", "inplace",
    "median_us", "p20_us", "p80_us", "gbps", "frac_peak", "ratio_to_copy", "max_err", "note",
]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HQ, HK, D = 32, 8, 128
PREFILL = [(1, 4096), (2, 4096), (4, 4096), (8, 4096)]
DECODE = [(64, 1), (256, 1)]
MODES = ("forward", "backward", "fwd+bwd")
COPY = "copy_"
# peak memory bandwidth (GB/s) by device name, when torch does not report clock and bus width
KNOWN_PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0,
                   "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0, "L4": 300.0}
SWEEP_GRID = {"tile": (2048, 4096, 8192, 16384), "bh_max": (4, 16), "num_warps": (4, 8)}  # 16 (+ the default)


# ------------------------------------------------------------------------------------------
# environment


def _nvidia_smi(query: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else "-"
    except (OSError, subprocess.SubprocessError):
        return "-"


def dist_version(name: str) -> str:
    """Installed distribution version (``importlib.metadata``), ``"-"`` when absent."""
    try:
        from importlib.metadata import version as _v

        return _v(name)
    except Exception:
        return "-"


def peak_gbps(device: torch.device, override: Optional[float] = None) -> Tuple[float, str]:
    """``(GB/s, source)``: the override, else 2 x memory clock x bus width, else the name table."""
    if override:
        return float(override), "--peak-gbps"
    if device.type != "cuda":
        return 0.0, "none (not a GPU)"
    return peak_from_props(torch.cuda.get_device_properties(device))


def peak_from_props(props) -> Tuple[float, str]:
    """Double data rate x memory clock (kHz, as CUDA reports it) x bus width; else by name."""
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9, f"2 x {clock_khz / 1e3:.0f} MHz x {bus_bits} bit"
    return peak_from_name(props.name)


def peak_from_name(name: str) -> Tuple[float, str]:
    for key, val in KNOWN_PEAK_GBPS.items():  # most specific first
        if key in name:
            return val, f"datasheet ({key})"
    return 0.0, "unknown (pass --peak-gbps)"


def environment(device: torch.device, peak: Optional[float] = None) -> dict:
    """The environment columns of every row."""
    is_cuda = device.type == "cuda"
    gbps, src = peak_gbps(device, peak)
    return dict(
        run=_dt.datetime.now().isoformat(timespec="seconds"),
        device=device.type,
        gpu=torch.cuda.get_device_name(device) if is_cuda else "cpu (TRITON_INTERPRET=1)",
        driver=_nvidia_smi("driver_version") if is_cuda else "-",
        cuda=torch.version.cuda or "-",
        torch=torch.__version__,
        triton=version("triton"),
        transformers=version("transformers"),
        liger=dist_version("liger-kernel"),
        git_rev=git_rev("bench_gpu.py"),
        peak_gbps=f"{gbps:.0f}" if gbps else "",
        _peak_source=src,
    )


# ------------------------------------------------------------------------------------------
# inputs


@dataclass
class Case:
    b: int
    s: int
    hq: int
    hk: int
    d: int
    dtype: str
    device: torch.device

    @property
    def decode(self) -> bool:
        return self.s == 1

    @property
    def shape(self) -> str:
        return f"b={self.b} s={self.s} hq={self.hq} hk={self.hk} d={self.d}"

    @property
    def nbytes(self) -> int:
        """q and k read once and written once."""
        return 2 * self.b * self.s * (self.hq + self.hk) * self.d * DTYPES[self.dtype].itemsize


class Inputs:
    """q/k and every table form the variants take, for one case."""

    def __init__(self, case: Case, seed: int = 0):
        from ropekit import RopeConfig, cos_sin

        self.case = case
        dev, dt = case.device, DTYPES[case.dtype]
        b, s = case.b, case.s
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.q = torch.randn(b, s, case.hq, case.d, generator=g).to(device=dev, dtype=dt)  # [b, s, hq, d]
        self.k = torch.randn(b, s, case.hk, case.d, generator=g).to(device=dev, dtype=dt)  # [b, s, hk, d]
        self.cfg = RopeConfig(case.d)
        if case.decode:  # one new token per sample, each at its own cache length
            self.offsets = torch.tensor([100 + 37 * i for i in range(b)], device=dev)  # [b] int64
            self.pos = self.offsets[:, None]  # [b, 1]
        else:
            self.offsets = None
            self.pos = torch.arange(s, device=dev)[None].expand(b, s)  # [b, s]
        n = int(self.pos.max()) + 1
        self.n = 1 << (n - 1).bit_length()
        self.cos_t, self.sin_t = cos_sin(self.cfg, torch.arange(self.n, device=dev), device=dev)  # [n, r/2] fp32
        if case.decode:
            cos, sin = self.cos_t[self.offsets][:, None], self.sin_t[self.offsets][:, None]  # [b, 1, r/2]
        else:
            cos, sin = self.cos_t[:s][None], self.sin_t[:s][None]  # [1, s, r/2]
        self.c4, self.s4 = cos[:, :, None], sin[:, :, None]  # [b|1, s, 1, r/2] half width fp32
        self.cf = torch.cat((cos, cos), -1).to(dt)  # [b|1, s, d] full width, model dtype (transformers)
        self.sf = torch.cat((sin, sin), -1).to(dt)
        self.gq, self.gk = torch.randn_like(self.q), torch.randn_like(self.k)
        self._ref = None
        self._ref_grad = None

    @property
    def posarg(self) -> dict:
        return {} if self.offsets is None else {"offsets": self.offsets}

    def ref(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """ropekit's eager backend (float32 math, one cast): what every variant is compared with."""
        if self._ref is None:
            from ropekit import apply_rotary_qk

            self._ref = apply_rotary_qk(self.q, self.k, self.c4, self.s4, backend="eager")
        return self._ref

    def ref_grad(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gradient of sum(out * g): g rotated by -θ."""
        if self._ref_grad is None:
            from ropekit import apply_rotary_qk

            self._ref_grad = apply_rotary_qk(self.gq, self.gk, self.c4, self.s4, backend="eager", conjugate=True)
        return self._ref_grad


# ------------------------------------------------------------------------------------------
# variants


@dataclass
class Variant:
    """``apply(q, k) -> (q_rot, k_rot)``; ``inplace``: writes into its arguments.

    ``grad``: a differentiable ``(q, k) -> (q_rot, k_rot)`` for the backward modes (None:
    forward only). ``grad_mutates``: its backward overwrites the incoming gradient.
    """

    name: str
    apply: Callable
    inplace: bool
    grad: Optional[Callable] = None
    grad_mutates: bool = False
    note: str = ""


def _hf_formula(q, k, cos, sin):
    """transformers' eager formula (rotate_half with cat), written out for torch.compile."""

    def rot_half(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    return q * cos + rot_half(q) * sin, k * cos + rot_half(k) * sin


def ropekit_variants(inp: Inputs) -> List[Variant]:
    from ropekit import RotaryEmbedding, apply_rotary_qk

    c4, s4 = inp.c4, inp.s4
    rope = RotaryEmbedding(inp.cfg, backend="triton", max_position=inp.n)
    pa = inp.posarg
    return [
        Variant("ropekit-triton in-place", lambda a, b: apply_rotary_qk(a, b, c4, s4, inplace=True, backend="triton"), True),
        Variant("ropekit-triton", lambda a, b: apply_rotary_qk(a, b, c4, s4, backend="triton"), False,
                grad=lambda a, b: apply_rotary_qk(a, b, c4, s4, backend="triton")),
        Variant("ropekit-triton module in-place", lambda a, b: rope(a, b, inplace=True, **pa), True,
                note="RotaryEmbedding: in-kernel table gather, positions range-checked in the kernel (no host sync)"),
        Variant("ropekit-triton module", lambda a, b: rope(a, b, **pa), False, grad=lambda a, b: rope(a, b, **pa),
                note="RotaryEmbedding: in-kernel table gather, positions range-checked in the kernel (no host sync)"),
    ]


def peer_liger(inp: Inputs) -> List[Variant]:
    from liger_kernel.ops.rope import LigerRopeFunction

    cf, sf = inp.cf, inp.sf  # full width, model dtype, as transformers hands them to Liger

    def liger(a, b):  # Liger takes [b, h, s, d] views of bshd memory and rotates that memory in place
        qo, ko = LigerRopeFunction.apply(a.transpose(1, 2), b.transpose(1, 2), cf, sf)
        return qo.transpose(1, 2), ko.transpose(1, 2)

    return [Variant("liger", liger, True, grad=liger, grad_mutates=True,
                    note="in place on contiguous q/k; computes in the tables' dtype (model dtype, as from transformers)")]


def peer_flash_attn(inp: Inputs) -> List[Variant]:
    from flash_attn.layers.rotary import apply_rotary_emb
    from flash_attn.ops.triton.rotary import apply_rotary

    dt = DTYPES[inp.case.dtype]
    cos, sin = inp.cos_t.to(dt), inp.sin_t.to(dt)  # [n, r/2] in x's dtype (flash-attn requires it)
    off = 0 if inp.offsets is None else inp.offsets.to(torch.int32)

    def fa(a, b, inplace=False):
        return (apply_rotary(a, cos, sin, seqlen_offsets=off, inplace=inplace),
                apply_rotary(b, cos, sin, seqlen_offsets=off, inplace=inplace))

    def fa_grad(a, b):
        return apply_rotary_emb(a, cos, sin, seqlen_offsets=off), apply_rotary_emb(b, cos, sin, seqlen_offsets=off)

    return [Variant("flash-attn triton in-place", lambda a, b: fa(a, b, True), True, note="one launch per tensor"),
            Variant("flash-attn triton", fa, False, grad=fa_grad, note="one launch per tensor")]


def peer_flashinfer(inp: Inputs) -> List[Variant]:
    import flashinfer

    c = inp.case
    cache = torch.cat((inp.cos_t, inp.sin_t), -1).float().contiguous()  # [n, r]: cos half, then sin half
    flat = inp.pos.reshape(-1).contiguous()  # [b*s] int64

    def fi(a, b):
        flashinfer.rope.apply_rope_with_cos_sin_cache_inplace(
            flat, a.view(c.b * c.s, c.hq * c.d), b.view(c.b * c.s, c.hk * c.d), c.d, cache, is_neox=True)
        return a, b

    return [Variant("flashinfer in-place", fi, True, note="apply_rope_with_cos_sin_cache_inplace; forward only")]


def peer_transformers(inp: Inputs) -> List[Variant]:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cf, sf = inp.cf, inp.sf

    def hf(a, b):
        return apply_rotary_pos_emb(a, b, cf, sf, unsqueeze_dim=2)

    return [Variant("transformers eager", hf, False, grad=hf, note="apply_rotary_pos_emb, tables in the model dtype")]


_COMPILED: Dict[str, Callable] = {}


def peer_compile(inp: Inputs, backend: str = "inductor") -> List[Variant]:
    fn = _COMPILED.get(backend)
    if fn is None:
        cfg = torch._dynamo.config
        for name in ("cache_size_limit", "recompile_limit"):  # one recompile per shape/dtype: keep them compiled
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        fn = _COMPILED[backend] = torch.compile(_hf_formula, backend=backend)
    cf4, sf4 = inp.cf[:, :, None], inp.sf[:, :, None]

    def comp(a, b):
        return fn(a, b, cf4, sf4)

    return [Variant("torch.compile(transformers)", comp, False, grad=comp,
                    note=f"torch.compile(backend={backend!r}) of the eager formula")]


PEERS: Dict[str, Callable[..., List[Variant]]] = {
    "liger": peer_liger,
    "flash-attn": peer_flash_attn,
    "flashinfer": peer_flashinfer,
    "transformers": peer_transformers,
    "torch.compile": peer_compile,
}


def all_variants(inp: Inputs, peers: Sequence[str], compile_backend: str) -> Tuple[List[Variant], Dict[str, str]]:
    """ropekit's variants and every importable peer's; ``{peer: why skipped}`` for the others."""
    out = ropekit_variants(inp)
    skipped: Dict[str, str] = {}
    for name in peers:
        try:
            fn = PEERS[name]
            out += fn(inp, compile_backend) if name == "torch.compile" else fn(inp)
        except ImportError as e:
            skipped[name] = f"not importable: {type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - a peer that breaks is reported, not fatal
            skipped[name] = f"setup failed: {type(e).__name__}: {e}"
    return out, skipped


# ------------------------------------------------------------------------------------------
# timing


class Timer:
    """Per-call times (seconds) of zero-argument callables, round-robin, CUDA events on GPU."""

    def __init__(self, device: torch.device, flush: bool):
        self.device = device
        self.cuda = device.type == "cuda"
        self.flush_buf = None
        if self.cuda and flush:
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
            self.flush_buf = torch.empty(max(4 * l2, 256 << 20), dtype=torch.uint8, device=device)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def run(self, fns: Dict[str, Callable[[], object]], rounds: int, inner: int) -> Dict[str, List[float]]:
        times: Dict[str, List[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            if self.cuda:
                evs = []
                for name, fn in fns.items():
                    if self.flush_buf is not None:
                        self.flush_buf.zero_()
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    for _ in range(inner):
                        fn()
                    e1.record()
                    evs.append((name, e0, e1))
                torch.cuda.synchronize(self.device)
                for name, e0, e1 in evs:
                    times[name].append(e0.elapsed_time(e1) / 1e3 / inner)
            else:
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        fn()
                    times[name].append((time.perf_counter() - t0) / inner)
        return times


def stats(ts: List[float]) -> Tuple[float, float, float]:
    """median, p20, p80."""
    q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
    return statistics.median(ts), q[1], q[7]


def max_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    return max(float((g.detach().float() - w.detach().float()).abs().max()) if g.numel() else 0.0 for g, w in zip(got, want))


def err_tol(dtype: str, want: Sequence[torch.Tensor]) -> float:
    """8 ulps of the dtype at the largest magnitude: rounding differences pass, a wrong formula does not."""
    scale = max(1.0, max(float(w.float().abs().max()) for w in want))
    return 8 * torch.finfo(DTYPES[dtype]).eps * scale


# ------------------------------------------------------------------------------------------
# rows


def _row(meta, case: Optional[Case], variant: str, mode: str, inplace="", med=None, p20=None, p80=None,
         moved=None, copy_gbps=None, err=None, note="") -> dict:
    r = dict.fromkeys(FIELDS, "")
    r.update({k: v for k, v in meta.items() if not k.startswith("_")})
    r.update(variant=variant, mode=mode, inplace=inplace, note=note,
             median_us="" if med is None else f"{med * 1e6:.2f}", p20_us="" if p20 is None else f"{p20 * 1e6:.2f}",
             p80_us="" if p80 is None else f"{p80 * 1e6:.2f}", max_err="" if err is None else f"{err:.3g}")
    if case is not None:
        r.update(shape=case.shape, b=case.b, s=case.s, hq=case.hq, hk=case.hk, d=case.d, dtype=case.dtype)
    gbps = moved / med / 1e9 if moved and med else None
    r["gbps"] = "" if gbps is None else f"{gbps:.1f}"
    peak = float(meta.get("peak_gbps") or 0)
    r["frac_peak"] = f"{gbps / peak:.3f}" if gbps and peak else ""
    r["ratio_to_copy"] = f"{gbps / copy_gbps:.3f}" if gbps and copy_gbps else ""
    return r


def write_rows(rows: List[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def read_rows(path: Path) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------
# one (shape, dtype): every variant, every mode


def bench_case(case: Case, meta: dict, peers: Sequence[str] = tuple(PEERS), modes: Sequence[str] = MODES,
               rounds: int = 20, compile_backend: str = "inductor", only: Optional[Sequence[str]] = None,
               warmup: int = 2, log=print) -> List[dict]:
    """Rows for ``case``: skipped peers, then per mode every variant's timing (and check)."""
    inp = Inputs(case)
    variants, skipped = all_variants(inp, peers, compile_backend)
    if only:
        variants = [v for v in variants if any(o in v.name for o in only)]
    rows = [_row(meta, case, name, "skipped", note=why) for name, why in skipped.items()]
    for name, why in skipped.items():
        log(f"  (skipped {name}: {why})")
    nbytes = case.nbytes
    decode = case.decode
    inner = 20 if decode else 1
    timer = Timer(case.device, flush=not decode)
    q, k = inp.q, inp.k
    qd, kd = torch.empty_like(q), torch.empty_like(k)
    want, want_g = inp.ref(), None
    tol = err_tol(case.dtype, want)

    for mode in modes:
        fns: Dict[str, Callable] = {COPY: lambda: (qd.copy_(q), kd.copy_(k))}
        meta_of: Dict[str, Tuple[Variant, float]] = {}
        for v in variants:
            try:
                if mode == "forward":
                    err = max_err(v.apply(q.clone(), k.clone()), want)  # fresh copies: in place variants too
                    if v.inplace:
                        qi, ki = q.clone(), k.clone()  # rotated again and again: a rotation keeps magnitudes
                        fn = (lambda v=v, qi=qi, ki=ki: v.apply(qi, ki))
                    else:
                        fn = (lambda v=v: v.apply(q, k))
                else:
                    if v.grad is None:
                        continue
                    if want_g is None:
                        want_g = inp.ref_grad()
                    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
                    gq, gk = inp.gq.clone(), inp.gk.clone()
                    outs = v.grad(qg, kg)
                    got = torch.autograd.grad(outs, (qg, kg), (gq.clone(), gk.clone()))
                    err = max(max_err(got, want_g), max_err(v.grad(q.clone().requires_grad_(), k.clone().requires_grad_()), want))
                    if mode == "backward":
                        outs = v.grad(qg, kg)
                        fn = (lambda outs=outs, qg=qg, kg=kg, gq=gq, gk=gk: torch.autograd.grad(outs, (qg, kg), (gq, gk), retain_graph=True))
                    else:
                        fn = (lambda v=v, qg=qg, kg=kg, gq=gq, gk=gk: torch.autograd.grad(v.grad(qg, kg), (qg, kg), (gq, gk)))
                for _ in range(warmup):  # compilations, allocator
                    fn()
                timer.sync()
                fns[v.name] = fn
                meta_of[v.name] = (v, err)
            except Exception as e:  # noqa: BLE001 - one broken variant must not end the run
                rows.append(_row(meta, case, v.name, mode, "yes" if v.inplace else "no", note=f"error: {type(e).__name__}: {e}"[:400]))
                log(f"  {mode:8s} {case.dtype:9s} {case.shape:30s} {v.name:34s} ERROR {type(e).__name__}: {e}")
                if os.environ.get("ROPEKIT_BENCH_TRACEBACK"):
                    traceback.print_exc()
        if len(fns) == 1:
            continue
        times = timer.run(fns, rounds, inner)
        t_copy = statistics.median(times[COPY])
        copy_gbps = nbytes / t_copy / 1e9
        for name, ts in times.items():
            med, p20, p80 = stats(ts)
            moved = nbytes * (2 if mode == "fwd+bwd" and name != COPY else 1)
            v, err = meta_of.get(name, (None, None))
            note = "" if v is None else v.note
            if err is not None and not err <= tol:
                note = f"MISMATCH (tolerance {tol:.3g}); " + note
            inpl = "" if v is None else ("yes" if v.inplace else "no")
            if mode != "forward" and v is not None:
                inpl = "no"  # gradients are fresh tensors (Liger's backward rotates the incoming gradient in place)
            rows.append(_row(meta, case, name, mode, inpl, med, p20, p80, moved, copy_gbps, err, note))
            r = rows[-1]
            log(f"  {mode:8s} {case.dtype:9s} {case.shape:30s} {name:34s} {med * 1e6:10.1f} µs {r['gbps']:>8s} GB/s"
                f"  peak x{r['frac_peak'] or '-':>6s}  copy_ x{r['ratio_to_copy'] or '-':>6s}  err {r['max_err'] or '-'}"
                + ("  MISMATCH" if "MISMATCH" in note else ""))
    return rows


# ------------------------------------------------------------------------------------------
# per-head RMSNorm + RoPE (apply_qk_norm_rotary): the fused kernel against the unfused paths


QK_NORM_CASES = [(1, 2048), (8, 1)]  # prefill b=1 s=2048; decode b=8 s=1 (each sample at its own position)
QK_NORM_DTYPES = ("bfloat16", "float32")
QK_NORM_MODES = ("forward", "fwd+bwd")
QK_NORM = "qk-norm "  # prefix of the rows' mode: "qk-norm forward", "qk-norm fwd+bwd"
QK_NORM_FUSED = "ropekit-triton qk-norm"
QK_NORM_EPS = 1e-6


class QKNormInputs:
    """One case's :class:`Inputs` plus the ``[d]`` norm weights of q and k (model dtype, as a
    Qwen3 checkpoint holds them) and the references (ropekit's eager composition: float32
    norm and rotation, one rounding; its torch gradients w.r.t. q, k and both weights)."""

    def __init__(self, case: Case, seed: int = 0):
        self.rope = Inputs(case, seed)
        g = torch.Generator(device="cpu").manual_seed(seed + 1)
        dt = DTYPES[case.dtype]
        self.wq = (1 + 0.1 * torch.randn(case.d, generator=g)).to(device=case.device, dtype=dt)  # [d]
        self.wk = (1 + 0.1 * torch.randn(case.d, generator=g)).to(device=case.device, dtype=dt)  # [d]
        self._ref = self._ref_grad = None

    def ref(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._ref is None:
            from ropekit import apply_qk_norm_rotary

            r = self.rope
            self._ref = apply_qk_norm_rotary(r.q, r.k, self.wq, self.wk, r.c4, r.s4, eps=QK_NORM_EPS, backend="eager")
        return self._ref

    def ref_grad(self) -> Tuple[torch.Tensor, ...]:
        """``(dq, dk, dq_weight, dk_weight)`` of ``sum(q_out * gq) + sum(k_out * gk)``."""
        if self._ref_grad is None:
            from ropekit import apply_qk_norm_rotary

            r = self.rope
            leaves = [t.clone().requires_grad_() for t in (r.q, r.k, self.wq, self.wk)]
            outs = apply_qk_norm_rotary(*leaves, r.c4, r.s4, eps=QK_NORM_EPS, backend="eager")
            self._ref_grad = torch.autograd.grad(outs, leaves, (r.gq, r.gk))
        return self._ref_grad


def _hf_qk_norm(q, k, q_weight, k_weight, cos, sin, eps: float = QK_NORM_EPS):
    """transformers' Qwen3 attention prologue, written out: ``Qwen3RMSNorm`` on q and k (float32
    statistics, the normalised value rounded to the model dtype, then times the weight), then
    ``apply_rotary_pos_emb`` (rotate_half with cat, full-width tables in the model dtype)."""

    def norm(x, w):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype)

    return _hf_formula(norm(q, q_weight), norm(k, k_weight), cos, sin)


def qk_norm_variants(inp: QKNormInputs, compile_backend: str = "inductor") -> Tuple[List[Variant], Dict[str, str]]:
    """The fused kernel (out of place and in place), ropekit's unfused path (torch float32 norm,
    then the triton RoPE kernel: what a backend without the fused kernel runs), transformers'
    eager code and torch.compile of it. ``grad`` takes ``(q, k, q_weight, k_weight)``."""
    from ropekit import apply_qk_norm_rotary
    from ropekit.backends import _generic, triton as tb

    r, wq, wk = inp.rope, inp.wq, inp.wk
    c4, s4 = r.c4, r.s4
    cf4, sf4 = r.cf[:, :, None], r.sf[:, :, None]  # [b|1, s, 1, d] full width, model dtype

    def fused(a, b, wa=wq, wb=wk):
        return apply_qk_norm_rotary(a, b, wa, wb, c4, s4, eps=QK_NORM_EPS, backend="triton")

    def fused_inplace(a, b):
        return apply_qk_norm_rotary(a, b, wq, wk, c4, s4, eps=QK_NORM_EPS, backend="triton", inplace=True)

    def unfused(a, b, wa=wq, wb=wk):  # the float32 norm in torch, then the triton rotation, one rounding
        from ropekit import apply_rotary_qk
        na = _generic.rms_norm_functional(a, wa, QK_NORM_EPS, 0.0)
        nb = _generic.rms_norm_functional(b, wb, QK_NORM_EPS, 0.0)
        qa, qb = apply_rotary_qk(na, nb, c4, s4, backend="triton")
        return qa.to(a.dtype), qb.to(b.dtype)

    def hf(a, b, wa=wq, wb=wk):
        return _hf_qk_norm(a, b, wa, wb, cf4, sf4)

    out = [
        Variant(QK_NORM_FUSED, fused, False, grad=fused, note="one launch for q and k, forward and backward"),
        Variant(QK_NORM_FUSED + " in-place", fused_inplace, True, note="one launch; forward only"),
        Variant("ropekit unfused (torch norm + triton rope)", unfused, False, grad=unfused,
                note="float32 norm in torch, then apply_qk with the triton RoPE kernel, one rounding"),
        Variant("transformers eager (qk-norm)", hf, False, grad=hf,
                note="Qwen3RMSNorm + apply_rotary_pos_emb: rounds to the model dtype after the norm and in the rotation"),
    ]
    skipped: Dict[str, str] = {}
    key = "qk-norm " + compile_backend
    try:
        fn = _COMPILED.get(key)
        if fn is None:
            fn = _COMPILED[key] = torch.compile(_hf_qk_norm, backend=compile_backend)

        def comp(a, b, wa=wq, wb=wk):
            return fn(a, b, wa, wb, cf4, sf4)

        out.append(Variant("torch.compile(transformers qk-norm)", comp, False, grad=comp,
                           note=f"torch.compile(backend={compile_backend!r}) of the eager code"))
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        skipped["torch.compile(transformers qk-norm)"] = f"setup failed: {type(e).__name__}: {e}"
    return out, skipped


def bench_qk_norm_case(case: Case, meta: dict, modes: Sequence[str] = QK_NORM_MODES, rounds: int = 20,
                       compile_backend: str = "inductor", warmup: int = 2, log=print) -> List[dict]:
    """Rows ``mode = "qk-norm forward" | "qk-norm fwd+bwd"`` for ``case``: every variant of
    :func:`qk_norm_variants` timed round-robin (as :func:`bench_case`), each checked once first
    against the references (forward: q and k; fwd+bwd also dq, dk and both weight gradients;
    ``MISMATCH`` past 8 ulps of the dtype at each tensor's own largest magnitude).

    ``gbps`` counts the least traffic: q and k read and written once forward (the case's
    bytes), 2.5 times that forward+backward (the backward reads the gradient and the input
    and writes ``dx``); ``ratio_to_copy`` compares with the same-run ``copy_`` of q and k.
    """
    inp = QKNormInputs(case)
    variants, skipped = qk_norm_variants(inp, compile_backend)
    rows = [_row(meta, case, name, QK_NORM + "skipped", note=why) for name, why in skipped.items()]
    for name, why in skipped.items():
        log(f"  (skipped {name}: {why})")
    nbytes = case.nbytes
    inner = 20 if case.decode else 1
    timer = Timer(case.device, flush=not case.decode)
    r = inp.rope
    q, k, wq, wk, gq, gk = r.q, r.k, inp.wq, inp.wk, r.gq, r.gk
    qd, kd = torch.empty_like(q), torch.empty_like(k)

    def check(got, want) -> Tuple[float, bool]:
        err = max_err(got, want)
        return err, all(max_err([g], [w]) <= err_tol(case.dtype, [w]) for g, w in zip(got, want))

    for mode in modes:
        fns: Dict[str, Callable] = {COPY: lambda: (qd.copy_(q), kd.copy_(k))}
        meta_of: Dict[str, Tuple[Variant, float, bool]] = {}
        for v in variants:
            try:
                if mode == "forward":
                    err, ok = check(v.apply(q.clone(), k.clone()), inp.ref())
                    if v.inplace:
                        qi, ki = q.clone(), k.clone()  # normalised and rotated again and again: magnitudes stay
                        fn = (lambda v=v, qi=qi, ki=ki: v.apply(qi, ki))
                    else:
                        fn = (lambda v=v: v.apply(q, k))
                else:
                    if v.grad is None:
                        continue
                    leaves = [t.clone().requires_grad_() for t in (q, k, wq, wk)]
                    outs = v.grad(*leaves)
                    got = [o.detach() for o in outs] + list(torch.autograd.grad(outs, leaves, (gq, gk)))
                    err, ok = check(got, list(inp.ref()) + list(inp.ref_grad()))
                    fn = (lambda v=v, leaves=leaves: torch.autograd.grad(v.grad(*leaves), leaves, (gq, gk)))
                for _ in range(warmup):
                    fn()
                timer.sync()
                fns[v.name] = fn
                meta_of[v.name] = (v, err, ok)
            except Exception as e:  # noqa: BLE001 - one broken variant must not end the run
                rows.append(_row(meta, case, v.name, QK_NORM + mode, "yes" if v.inplace else "no",
                                 note=f"error: {type(e).__name__}: {e}"[:400]))
                log(f"  {QK_NORM + mode:16s} {case.dtype:9s} {case.shape:30s} {v.name:40s} ERROR {type(e).__name__}: {e}")
                if os.environ.get("ROPEKIT_BENCH_TRACEBACK"):
                    traceback.print_exc()
        if len(fns) == 1:
            continue
        times = timer.run(fns, rounds, inner)
        copy_gbps = nbytes / statistics.median(times[COPY]) / 1e9
        for name, ts in times.items():
            med, p20, p80 = stats(ts)
            moved = nbytes * (2.5 if mode == "fwd+bwd" and name != COPY else 1)
            v, err, ok = meta_of.get(name, (None, None, True))
            note = "" if v is None else v.note
            if not ok:
                note = "MISMATCH (8 ulps of the dtype per tensor); " + note
            inpl = "" if v is None else ("yes" if v.inplace and mode == "forward" else "no")
            rows.append(_row(meta, case, name, QK_NORM + mode, inpl, med, p20, p80, moved, copy_gbps, err, note))
            row = rows[-1]
            log(f"  {QK_NORM + mode:16s} {case.dtype:9s} {case.shape:30s} {name:40s} {med * 1e6:10.1f} µs {row['gbps']:>8s} GB/s"
                f"  copy_ x{row['ratio_to_copy'] or '-':>6s}  err {row['max_err'] or '-'}" + ("  MISMATCH" if not ok else ""))
    return rows


# ------------------------------------------------------------------------------------------
# CUDA graphs: the decode step


def _sync_check(device: torch.device, fn: Callable) -> str:
    """'' when ``fn`` runs without a host sync (CUDA sync debug mode 'error'), else the error."""
    if device.type != "cuda":
        return ""
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return ""
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(device)


def graph_decode(meta: dict, device: torch.device, b: int = 64, dtype: str = "bfloat16", hq: int = HQ, hk: int = HK,
                 d: int = D, steps: int = 4, replays: int = 200, compile_backend: str = "inductor",
                 with_compile: bool = True, log=print) -> List[dict]:
    """Capture the decode step (q, k ``[b, 1, h, d]``, per-sample offsets) in a CUDA graph, replay it.

    Per variant: host syncs of one eager step, capture, ``steps`` replays with new inputs
    copied into the static buffers, each compared with an eager call on the same inputs
    (``torch.equal``, and the max error within the dtype's 1-ulp tolerance for compiled
    code), and the replay time. On CPU (no graphs) only the static-buffer protocol runs.
    """
    from ropekit import RotaryEmbedding, apply_rotary_qk, RopeConfig

    case = Case(b, 1, hq, hk, d, dtype, device)
    dt = DTYPES[dtype]
    cfg = RopeConfig(d)
    n = 1 << 14
    rope = RotaryEmbedding(cfg, backend="triton", max_position=n)
    cos_t, sin_t = rope.tables(n, device=device)
    gen = torch.Generator(device="cpu").manual_seed(1)

    def new_inputs():
        return (torch.randn(b, 1, hq, d, generator=gen).to(device=device, dtype=dt),
                torch.randn(b, 1, hk, d, generator=gen).to(device=device, dtype=dt),
                torch.randint(0, n - 1, (b,), generator=gen).to(device))

    def eager_rope(q, k, off):
        return rope(q, k, offsets=off)

    def eager_index(q, k, off):
        c, s = cos_t[off][:, None, None], sin_t[off][:, None, None]  # [b, 1, 1, r/2], gathered on the device
        return apply_rotary_qk(q, k, c, s, backend="triton")

    variants: List[Tuple[str, Callable, Callable]] = [  # (name, function captured, eager reference)
        ("RotaryEmbedding", eager_rope, eager_rope),
        ("apply_rotary_qk(cos_t[offsets])", eager_index, eager_index),
    ]
    if with_compile:
        variants.append((f"torch.compile(RotaryEmbedding, backend={compile_backend!r})",
                         torch.compile(eager_rope, backend=compile_backend, fullgraph=True, dynamic=False), eager_rope))
    rows = []
    ulp = torch.finfo(dt).eps
    for name, fn, ref_fn in variants:
        qs, ks, offs = new_inputs()
        note, med = [], None
        err_all, equal_all, ok = 0.0, True, True
        try:
            for _ in range(3):  # warm-up (compiles), on a side stream as torch.cuda.graph wants
                if device.type == "cuda":
                    st = torch.cuda.Stream(device)
                    st.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(st):
                        fn(qs, ks, offs)
                    torch.cuda.current_stream(device).wait_stream(st)
                else:
                    fn(qs, ks, offs)
            sync = _sync_check(device, lambda: fn(qs, ks, offs))
            if device.type == "cuda":
                note.append("no host sync" if not sync else f"host sync: {sync}")
            if sync:  # a capture would fail on it (and may leave the stream unusable): report instead
                raise RuntimeError("not captured: the step synchronizes with the host")
            if device.type == "cuda":
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outs = fn(qs, ks, offs)
                replay = graph.replay
            else:
                holder = {}

                def replay():  # CPU: no graph; the same static-buffer protocol, run eagerly
                    holder["outs"] = fn(qs, ks, offs)

                replay()
                outs = None
            for _ in range(steps):
                q, k, off = new_inputs()
                qs.copy_(q), ks.copy_(k), offs.copy_(off)
                replay()
                got = outs if outs is not None else holder["outs"]
                want = ref_fn(q, k, off)
                equal_all &= all(torch.equal(g, w) for g, w in zip(got, want))
                e = max_err(got, want)
                err_all = max(err_all, e)
                ok &= e <= ulp * max(1.0, max(float(w.float().abs().max()) for w in want))
            note.append(("replay == eager (bitwise)" if equal_all else f"replay vs eager max err {err_all:.3g}")
                        + ("" if ok else " MISMATCH"))
            if device.type == "cuda":
                timer = Timer(device, flush=False)
                med, p20, p80 = stats(timer.run({"replay": replay}, 10, replays)["replay"])
                t_call = stats(timer.run({"call": lambda: fn(qs, ks, offs)}, 10, 20)["call"])[0]
                note.append(f"without the graph {t_call * 1e6:.1f} µs per call")
                rows.append(_row(meta, case, name, "cuda_graph_decode", "no", med, p20, p80, case.nbytes, None, err_all,
                                 "captured; " + "; ".join(note)))
            else:
                rows.append(_row(meta, case, name, "cuda_graph_decode", "no", err=err_all,
                                 note="cpu: no CUDA graph, static-buffer protocol only; " + "; ".join(note)))
        except Exception as e:  # noqa: BLE001 - a failed capture is a result
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            rows.append(_row(meta, case, name, "cuda_graph_decode", "no", note="capture failed: " + msg + "; " + "; ".join(note)))
            if device.type == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize(device)
        r = rows[-1]
        log(f"  cuda graph decode {dtype} b={b}: {name:52s} {r['median_us'] or '-':>8s} µs  {r['note']}")
    return rows


# ------------------------------------------------------------------------------------------
# int64 offsets: one tensor of more than 2^31 elements


def check_int64(meta: dict, device: torch.device, dtype: str = "bfloat16", min_numel: int = (1 << 31) + (1 << 22),
                h: int = 64, d: int = 128, chunk: int = 4096, log=print) -> List[dict]:
    """x ``[1, s, h, d]`` with ``s*h*d >= min_numel``: out of place, in place and RotaryEmbedding vs eager.

    The eager backend computes the reference chunk by chunk (``chunk`` tokens), so only x
    and two outputs are resident. Pass: every element within one ulp of the dtype (the
    same float32 formula, cast once) and in place equal to out of place.
    """
    from ropekit import RopeConfig, RotaryEmbedding, apply_rotary, cos_sin

    dt = DTYPES[dtype]
    s = -(-min_numel // (h * d))
    case = Case(1, s, h, 1, d, dtype, device)
    numel = s * h * d
    rows = []
    try:
        cfg = RopeConfig(d)
        gen = torch.Generator(device=device).manual_seed(3)
        x = torch.randn(1, s, h, d, generator=gen, device=device, dtype=dt)
        cos, sin = cos_sin(cfg, torch.arange(s, device=device), device=device)  # [s, r/2]
        c3, s3 = cos[:, None], sin[:, None]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        y = apply_rotary(x, c3, s3, backend="triton")  # compiles the kernel
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        apply_rotary(x, c3, s3, backend="triton", out=y)  # the same kernel again, timed
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_out = time.perf_counter() - t0
        err, worst = 0.0, 0.0
        for i in range(0, s, chunk):
            want = apply_rotary(x[:, i:i + chunk], c3[i:i + chunk], s3[i:i + chunk], backend="eager")
            got = y[:, i:i + chunk]
            e = float((got.float() - want.float()).abs().max())
            err = max(err, e)
            worst = max(worst, e / max(1.0, float(want.float().abs().max())))
            del want
        ulp = torch.finfo(dt).eps

        def agree(a, b):  # (within one ulp, bitwise equal), chunk by chunk
            e = max(float(((a[:, i:i + chunk].float() - b[:, i:i + chunk].float()).abs().max()
                           / max(1.0, float(b[:, i:i + chunk].float().abs().max())))) for i in range(0, s, chunk))
            return e <= ulp, bool(torch.equal(a, b))

        k = torch.zeros(1, s, 1, d, device=device, dtype=dt)
        q_mod, _ = RotaryEmbedding(cfg, backend="triton")(x, k)  # the gather path, out of place
        mod_ok, mod_bits = agree(q_mod, y)
        del q_mod, k
        apply_rotary(x, c3, s3, backend="triton", inplace=True)
        inpl_ok, inpl_bits = agree(x, y)
        ok = worst <= ulp and inpl_ok and mod_ok

        def word(ok_, bits):
            return "bitwise" if bits else ("within 1 ulp" if ok_ else "DIFFERS")

        note = (f"{'ok' if ok else 'FAILED'}: {numel} elements ({numel / (1 << 31):.3f} x 2^31), out of place vs eager "
                f"max err {err:.3g} ({'within' if worst <= ulp else 'NOT within'} 1 ulp); in place vs out of place: "
                f"{word(inpl_ok, inpl_bits)}; RotaryEmbedding vs apply_rotary: {word(mod_ok, mod_bits)}")
        moved = 2 * numel * dt.itemsize
        rows.append(_row(meta, case, "ropekit-triton", "int64_offsets", "no", t_out, None, None, moved, None, err, note))
        del x, y
    except Exception as e:  # noqa: BLE001 - e.g. out of memory
        rows.append(_row(meta, case, "ropekit-triton", "int64_offsets", "no", note=f"FAILED: {type(e).__name__}: {e}"[:400]))
    log(f"  int64 offsets {dtype} [1, {s}, {h}, {d}]: {rows[-1]['note']}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------
# block-size sweep


def sweep_classes(cases, dtype: str, hq: int, hk: int, d: int, device: torch.device) -> Dict[str, Case]:
    """The largest prefill batch and the largest decode batch (most work per launch: block sizes matter most)."""
    classes = {}
    pre = [(b, s) for b, s in cases if s > 1]
    if pre:
        b, s = max(pre)
        classes[f"prefill b={b} s={s} {dtype}"] = Case(b, s, hq, hk, d, dtype, device)
    dec = [b for b, s in cases if s == 1]
    if dec:
        classes[f"decode b={max(dec)} {dtype}"] = Case(max(dec), 1, hq, hk, d, dtype, device)
    return classes


def sweep_configs(grid: Dict[str, Sequence] = SWEEP_GRID) -> List[dict]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def sweep(meta: dict, classes: Dict[str, Case], grid: Dict[str, Sequence] = SWEEP_GRID, rounds: int = 10,
          deadline: Optional[float] = None, log=print) -> Tuple[List[dict], Dict[str, Tuple[dict, float, float]]]:
    """Time in-place ``apply_rotary_qk(backend="triton")`` per launch configuration and shape class.

    Configurations that give the same ``(BT, BH, num_warps)`` for a class are timed once.
    Each one's output must equal the default configuration's bit for bit (else the row says
    MISMATCH and it cannot win). Returns the rows and ``{class: (best config, best s, default s)}``.
    """
    from ropekit import apply_rotary_qk
    from ropekit.backends import triton as tb

    rows, best = [], {}
    interp = not any(c.device.type == "cuda" for c in classes.values())
    for cls, case in classes.items():
        inp = Inputs(case)
        q, k, c4, s4 = inp.q, inp.k, inp.c4, inp.s4
        with tb.launch_config(**tb.LAUNCH_DEFAULTS):
            want = apply_rotary_qk(q, k, c4, s4, backend="triton")
        M, r2p = case.b * case.s, tb._pow2(c4.shape[-1])
        seen: Dict[Tuple[int, int, int], dict] = {}
        for cfg in [dict(tb.LAUNCH_DEFAULTS)] + sweep_configs(grid):
            with tb.launch_config(**cfg):
                key = tb._launch_params(M, case.hq, case.hk, r2p, interp)
            seen.setdefault(key, cfg)
        timer = Timer(case.device, flush=not case.decode)
        inner = 20 if case.decode else 1
        results = []
        for i, (key, cfg) in enumerate(seen.items()):
            if deadline is not None and time.monotonic() > deadline and i > 0:
                rows.append(_row(meta, case, f"{cls}: {len(seen) - i} configurations", "sweep", note="skipped: time budget"))
                break
            qi, ki = q.clone(), k.clone()
            try:
                with tb.launch_config(**cfg):
                    got = apply_rotary_qk(q, k, c4, s4, backend="triton")
                    same = all(torch.equal(g, w) for g, w in zip(got, want))
                    fn = lambda: apply_rotary_qk(qi, ki, c4, s4, inplace=True, backend="triton")  # noqa: E731
                    fn()
                    timer.sync()
                    med, p20, p80 = stats(timer.run({"x": fn}, rounds, inner)["x"])
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory / registers for a config
                rows.append(_row(meta, case, _cfg_name(cfg, key), "sweep", "yes", note=f"{cls}; error: {type(e).__name__}: {e}"[:300]))
                continue
            default = key == next(iter(seen))
            note = f"{cls}" + ("; default" if default else "") + ("" if same else "; MISMATCH vs default config")
            rows.append(_row(meta, case, _cfg_name(cfg, key), "sweep", "yes", med, p20, p80, case.nbytes, None, None, note))
            if same:
                results.append((med, cfg, key))
        if results:
            t_def = next((t for t, c, kk in results if kk == next(iter(seen))), None)
            t_best, cfg_best, key_best = min(results, key=lambda r: r[0])
            best[cls] = (dict(cfg_best, BT=key_best[0], BH=key_best[1]), t_best, t_def)
            log(f"  sweep {cls}: best {_cfg_name(cfg_best, key_best)} {t_best * 1e6:.1f} µs"
                + (f" (default {t_def * 1e6:.1f} µs, x{t_def / t_best:.2f})" if t_def else "") + f"; {len(results)} configurations")
    return rows, best


def _cfg_name(cfg: dict, key: Tuple[int, int, int]) -> str:
    return f"tile={cfg['tile'] or 'default'} bh_max={cfg['bh_max']} num_warps={cfg['num_warps']} (BT={key[0]} BH={key[1]})"


# ------------------------------------------------------------------------------------------
# summary


def _f(r: dict, key: str) -> Optional[float]:
    try:
        return float(r[key])
    except (KeyError, TypeError, ValueError):
        return None


def summarize(rows: List[dict], tests: str = "", peak_source: str = "") -> str:
    """Markdown: environment, tests, targets, forward table, graphs, int64, sweep, skips and errors."""
    if not rows:
        return "# GPU check\n\nNo rows were written.\n" + (f"\n{tests}\n" if tests else "")
    r0 = rows[0]
    out = ["# GPU check", "",
           f"{r0['gpu']} · driver {r0['driver']} · CUDA {r0['cuda']} · torch {r0['torch']} · triton {r0['triton']} · "
           f"transformers {r0['transformers']} · liger-kernel {r0['liger']} · rev {r0['git_rev']} · run {r0['run']} · "
           f"peak memory bandwidth {r0['peak_gbps'] or '?'} GB/s" + (f" ({peak_source})" if peak_source else ""), ""]
    if tests:
        out += ["## GPU tests (opcheck, bits against the CPU op, CUDA graphs; ROPEKIT_TEST_DEVICE=cuda)", "", tests, ""]

    def get(variant, mode, dtype, b, s):
        return next((r for r in rows if r["variant"] == variant and r["mode"] == mode and r["dtype"] == dtype
                     and str(r["b"]) == str(b) and str(r["s"]) == str(s) and r["median_us"]), None)

    timed = [r for r in rows if r["mode"] in MODES and r["median_us"]]
    prefill = sorted({(int(r["b"]), int(r["s"])) for r in timed if int(r["s"]) > 1})
    decode = sorted({(int(r["b"]), int(r["s"])) for r in timed if int(r["s"]) == 1})
    out += ["## Targets", "", "| target | shape | measured | met |", "|---|---|---|---|"]
    for name, bound in TARGETS:
        for b, s in prefill:
            r = get(name, "forward", "bfloat16", b, s)
            x = _f(r, "ratio_to_copy") if r else None
            out.append(f"| {name} forward bf16 >= {bound:.0%} of the same-run copy_ bandwidth | b={b} s={s} | "
                       + (f"{x:.0%} ({r['gbps']} GB/s)" if x is not None else "–") + f" | {_yes(x, bound)} |")
    for b, s in prefill + decode:
        r, lg = get("ropekit-triton in-place", "forward", "bfloat16", b, s), get("liger", "forward", "bfloat16", b, s)
        x = _f(lg, "median_us") / _f(r, "median_us") if r and lg else None
        out.append(f"| at least Liger's forward speed (bf16, both in place) | b={b} s={s} | "
                   + (f"{x:.2f}x" if x else "– (no Liger row)") + f" | {_yes(x, 1.0)} |")
    for b, s in prefill + decode:
        f, bw = get("ropekit-triton", "forward", "bfloat16", b, s), get("ropekit-triton", "backward", "bfloat16", b, s)
        x = _f(bw, "median_us") / _f(f, "median_us") if f and bw else None
        out.append(f"| backward within 1.1x of forward (bf16, out of place) | b={b} s={s} | "
                   + (f"{x:.2f}x" if x else "–") + f" | {_yes(x, 1.1, below=True)} |")
    graphs = [r for r in rows if r["mode"] == "cuda_graph_decode"]
    for r in graphs:
        met = r["note"].startswith("captured") and "MISMATCH" not in r["note"]
        out.append(f"| decode replayed in a CUDA graph ({r['variant']}) | {r['shape']} | {r['note'][:160]} | {'yes' if met else 'no'} |")
    out.append("")

    for mode in MODES:
        sub = [r for r in timed if r["mode"] == mode]
        for dtype in ("bfloat16", "float16", "float32"):
            dsub = [r for r in sub if r["dtype"] == dtype]
            if not dsub:
                continue
            cases = sorted({(int(r["b"]), int(r["s"])) for r in dsub}, key=lambda c: (c[1] == 1, c[0]))
            names = list(dict.fromkeys(r["variant"] for r in dsub))
            out += [f"## {mode}, {dtype}: median µs (fraction of peak bandwidth; x of copy_)", "",
                    "| variant | " + " | ".join(f"b={b} s={s}" for b, s in cases) + " |", "|---|" + "---|" * len(cases)]
            for n in names:
                cells = []
                for b, s in cases:
                    r = get(n, mode, dtype, b, s)
                    cells.append(f"{float(r['median_us']):.1f} ({r['frac_peak'] or '-'}; x{r['ratio_to_copy'] or '-'})"
                                 + (" MISMATCH" if "MISMATCH" in r["note"] else "") if r else "–")
                out.append(f"| {n} | " + " | ".join(cells) + " |")
            out.append("")
    if graphs:
        out += ["## CUDA graph: decode step", "", "| variant | shape | dtype | replay µs | result |", "|---|---|---|---|---|"]
        out += [f"| {r['variant']} | {r['shape']} | {r['dtype']} | {r['median_us'] or '–'} | {r['note']} |" for r in graphs]
        out.append("")
    big = [r for r in rows if r["mode"] == "int64_offsets"]
    if big:
        out += ["## More than 2^31 elements (int64 offsets)", ""]
        out += [f"- {r['dtype']} {r['shape']}: {r['note']}" + (f" ({r['median_us']} µs, {r['gbps']} GB/s)" if r["median_us"] else "") for r in big]
        out.append("")
    sw = [r for r in rows if r["mode"] == "sweep" and r["median_us"]]
    if sw:
        out += ["## Block-size sweep (in-place forward): best per shape class", "",
                "| class | best configuration | µs | default µs | default / best |", "|---|---|---|---|---|"]
        for cls in dict.fromkeys(r["note"].split(";")[0] for r in sw):
            cand = [r for r in sw if r["note"].split(";")[0] == cls and "MISMATCH" not in r["note"]]
            if not cand:
                continue
            bestr = min(cand, key=lambda r: float(r["median_us"]))
            d = next((r for r in cand if "default" in r["note"]), None)
            ratio = f"{float(d['median_us']) / float(bestr['median_us']):.2f}" if d else "–"
            out.append(f"| {cls} | {bestr['variant']} | {bestr['median_us']} | {d['median_us'] if d else '–'} | {ratio} |")
        out.append("")
    qk = [r for r in rows if r["mode"].startswith(QK_NORM) and r["median_us"]]
    if qk:
        out += qk_norm_tables(qk)
    bad = [r for r in rows if r["mode"] in ("skipped", "error", QK_NORM + "skipped") or r["note"].startswith(("error", "skipped", "FAILED", "capture failed"))
           or "error:" in r["note"] or "MISMATCH" in r["note"]]
    if bad:
        out += ["## Skipped, failed, mismatched", ""]
        seen = set()
        for r in bad:
            line = f"- {r['variant']} ({r['mode']}, {r['dtype'] or '-'} {r['shape'] or ''}): {r['note']}"
            key = (r["variant"], r["mode"], r["note"])
            if key not in seen:
                seen.add(key)
                out.append(line)
        out.append("")
    out += final_table(rows, tests)
    return "\n".join(out)


# the targets of the rotation, as fractions of the same run's copy_ of the same bytes
TARGETS = (("ropekit-triton in-place", 0.90), ("ropekit-triton", 0.85))
# peers by the name of their rows ("skipped" rows carry the peer name; timed rows the variant's)
PEER_VARIANTS = {"liger": ("liger",), "flash-attn": ("flash-attn triton in-place", "flash-attn triton"),
                 "flashinfer": ("flashinfer in-place",), "transformers": ("transformers eager",),
                 "torch.compile": ("torch.compile(transformers)",)}


def _pct(r: Optional[dict]) -> str:
    if r is None:
        return "–"
    x = _f(r, "ratio_to_copy")
    return f"{float(r['median_us']):.1f} µs, {x:.0%}" if x is not None and x >= 0.1 else f"{float(r['median_us']):.1f} µs, {x:.2%}" if x is not None else f"{float(r['median_us']):.1f} µs"


def final_table(rows: List[dict], tests: str = "") -> List[str]:
    """The one table that ends summary.md: the tests, then per variant the bf16 forward (else the
    first dtype timed) at the
    largest prefill and decode batches as µs and % of the same-run copy_ bandwidth (the target
    where there is one), the CUDA-graph decode checks and the int64 check; a peer that did not
    import is a row saying 'not installed'."""
    fwd = [r for r in rows if r["mode"] == "forward" and r["median_us"]]
    dtype = "bfloat16" if any(r["dtype"] == "bfloat16" for r in fwd) else (fwd[0]["dtype"] if fwd else "bfloat16")
    out = ["## Summary", "", f"| what | prefill ({dtype} forward) | decode ({dtype} forward) | target | met |",
           "|---|---|---|---|---|"]
    if tests:
        m = re.search(r"exit status (\d+)", tests)
        res = re.search(r"`([^`]*)`", tests)
        first = res.group(1) if res else (f"exit status {m.group(1)}" if m else "no result")
        met = "yes" if m and m.group(1) == "0" else "no"
        out.append(f"| GPU tests (ROPEKIT_TEST_DEVICE=cuda, opcheck included) | {first} | | all pass | {met} |")
    timed = [r for r in fwd if r["dtype"] == dtype]
    pre = max(((int(r["b"]), int(r["s"])) for r in timed if int(r["s"]) > 1), default=None, key=lambda c: (c[0] * c[1], c[0]))
    dec = max(((int(r["b"]), int(r["s"])) for r in timed if int(r["s"]) == 1), default=None)

    def at(name, case):
        if case is None:
            return None
        return next((r for r in timed if r["variant"] == name and (int(r["b"]), int(r["s"])) == case), None)

    if pre or dec:
        cp = at(COPY, pre)
        out.append(f"| copy_ of the same bytes (the reference) | "
                   + (f"{cp['gbps']} GB/s at b={pre[0]} s={pre[1]}" if cp else "–") + " | "
                   + (f"{at(COPY, dec)['gbps']} GB/s at b={dec[0]}" if at(COPY, dec) else "–") + " | | |")
    targets = dict(TARGETS)
    for name in dict.fromkeys(r["variant"] for r in timed if r["variant"] != COPY):
        rp, rd = at(name, pre), at(name, dec)
        bound = targets.get(name)
        met = _yes(_f(rp, "ratio_to_copy") if rp else None, bound) if bound else ""
        if "MISMATCH" in ((rp or {}).get("note", "") + (rd or {}).get("note", "")):
            met = (met + " " if met else "") + "MISMATCH"
        out.append(f"| {name} | {_pct(rp)} | {_pct(rd)} | " + (f">= {bound:.0%} of copy_" if bound else "") + f" | {met} |")
    seen = {r["variant"] for r in timed}
    for peer, names in PEER_VARIANTS.items():
        if any(n in seen for n in names):
            continue
        why = next((r["note"] for r in rows if r["variant"] == peer and r["mode"] == "skipped"), "")
        if why:
            state = "not installed" if why.startswith("not importable") else why[:120]
            out.append(f"| {peer} | {state} | {state} | | |")
    for r in rows:
        if r["mode"] == "cuda_graph_decode":
            ok = r["note"].startswith("captured") and "MISMATCH" not in r["note"] and "host sync:" not in r["note"]
            out.append(f"| decode in a CUDA graph: {r['variant']} ({r['shape']}) | | "
                       + (f"{r['median_us']} µs per replay" if r["median_us"] else r["note"][:120])
                       + " | captured, no host sync, replay == eager | " + ("yes" if ok else "no") + " |")
        elif r["mode"] == "int64_offsets":
            out.append(f"| more than 2^31 elements ({r['variant']}) | {r['note'][:120]} | | within 1 ulp | "
                       + ("yes" if r["note"].startswith("ok") else "no") + " |")
    out.append("")
    return out


def qk_norm_tables(rows: List[dict]) -> List[str]:
    """Markdown lines: per qk-norm mode and dtype, median µs of every variant per case, and how
    many times the fused kernel's time it is."""
    out = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for dtype in dict.fromkeys(r["dtype"] for r in rows if r["mode"] == mode):
            sub = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype]
            cases = sorted({(int(r["b"]), int(r["s"])) for r in sub}, key=lambda c: (c[1] == 1, c[0]))
            names = list(dict.fromkeys(r["variant"] for r in sub))
            out += [f"## {mode} (per-head RMSNorm + RoPE of q and k), {dtype}: median µs (x of {QK_NORM_FUSED})", "",
                    "| variant | " + " | ".join(f"b={b} s={s}" for b, s in cases) + " |", "|---|" + "---|" * len(cases)]
            for n in names:
                cells = []
                for b, s in cases:
                    r = next((x for x in sub if x["variant"] == n and int(x["b"]) == b and int(x["s"]) == s), None)
                    f = next((x for x in sub if x["variant"] == QK_NORM_FUSED and int(x["b"]) == b and int(x["s"]) == s), None)
                    if r is None:
                        cells.append("–")
                        continue
                    ratio = f" (x{float(r['median_us']) / float(f['median_us']):.2f})" if f else ""
                    cells.append(f"{float(r['median_us']):.1f}{ratio}" + (" MISMATCH" if "MISMATCH" in r["note"] else ""))
                out.append(f"| {n} | " + " | ".join(cells) + " |")
            out.append("")
    return out


def _yes(x: Optional[float], bound: float, below: bool = False) -> str:
    if x is None:
        return "not measured"
    return "yes" if (x <= bound if below else x >= bound) else "no"


def tests_text(log: Optional[Path], rc: Optional[int]) -> str:
    """One line from a pytest log: its result line and exit status."""
    if log is None or not log.exists():
        return "" if rc is None else f"exit status {rc} (no log)"
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    result = next((ln for ln in reversed(lines) if " in " in ln and any(w in ln for w in ("passed", "failed", "error", "skipped"))), "")
    fails = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:20]
    txt = f"`{result.strip('= ')}`" if result else "(no pytest result line)"
    if rc is not None:
        txt += f", exit status {rc}" + (" (timed out)" if rc == 124 else "")
    return txt + ("".join(f"\n- {ln}" for ln in fails) if fails else "")


# ------------------------------------------------------------------------------------------
# main


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-results")))
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (TRITON_INTERPRET=1, tiny shapes: a check of the harness)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new sections after this many seconds")
    ap.add_argument("--dtypes", default="bfloat16,float16,float32")
    ap.add_argument("--cases", default=None, help="b x s list, e.g. '1x4096,8x4096,64x1' (default: prefill b=1,2,4,8 s=4096; decode b=64,256)")
    ap.add_argument("--heads", default=f"{HQ},{HK},{D}", help="hq,hk,d")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ",".join(PEERS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--no-int64", action="store_true")
    ap.add_argument("--no-qk-norm", action="store_true", help="skip the per-head RMSNorm + RoPE section")
    ap.add_argument("--qk-norm-cases", default=None,
                    help="b x s list for the qk-norm section (default on CUDA: '1x2048,8x1'; on CPU: --cases)")
    ap.add_argument("--qk-norm-dtypes", default=",".join(QK_NORM_DTYPES))
    ap.add_argument("--int64-numel", type=int, default=(1 << 31) + (1 << 22))
    ap.add_argument("--sweep-grid", default=None, help="e.g. 'tile=4096,8192;bh_max=8,16;num_warps=4,8'")
    ap.add_argument("--peak-gbps", type=float, default=None)
    ap.add_argument("--tests-log", type=Path, default=None, help="pytest output to quote in the summary")
    ap.add_argument("--tests-rc", type=int, default=None)
    ap.add_argument("--summarize", action="store_true", help="only rewrite summary.md from OUT/gpu.csv")
    ap.add_argument("--note", default="", help="a line for the top of the summary")
    args = ap.parse_args(argv)

    out = args.out
    csv_path, md_path = out / "gpu.csv", out / "summary.md"
    tests = tests_text(args.tests_log, args.tests_rc)
    if args.note:
        tests = f"{args.note}\n\n{tests}" if tests else args.note
    if args.summarize:
        rows = read_rows(csv_path) if csv_path.exists() else []
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(summarize(rows, tests))
        print(f"wrote {md_path}")
        return 0

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda}): nothing to benchmark")
        return 0
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined
    from ropekit.backends import triton as tb

    if not tb.available():
        print("ropekit's triton backend is not available here (triton missing, or CPU without TRITON_INTERPRET=1)")
        return 1
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    meta = environment(device, args.peak_gbps)
    print(f"ropekit GPU benchmark: {({k: v for k, v in meta.items() if not k.startswith('_')})}", flush=True)
    print(f"peak memory bandwidth: {meta['peak_gbps'] or '?'} GB/s ({meta['_peak_source']})", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    if csv_path.exists():
        csv_path.unlink()  # one run per folder
    hq, hk, d = (int(v) for v in args.heads.split(","))
    if args.cases:
        cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    else:
        cases = PREFILL + DECODE
    dtypes = args.dtypes.split(",")
    peers = [p for p in args.peers.split(",") if p]
    modes = args.modes.split(",")
    all_rows: List[dict] = []

    def emit(rows):
        all_rows.extend(rows)
        write_rows(rows, csv_path)

    def budget_left(what: str) -> bool:
        if time.monotonic() <= deadline:
            return True
        emit([_row(meta, None, what, "skipped", note="skipped: time budget (--budget-s)")])
        print(f"  (skipped {what}: time budget)", flush=True)
        return False

    def log(msg):
        print(msg, flush=True)

    # the checks first (each answers a question on its own), then the timings, bf16 first
    if not args.no_int64 and budget_left("int64 check"):
        emit(check_int64(meta, device, "bfloat16", args.int64_numel, h=2 * hq, d=d, log=log))
    if not args.no_graphs and budget_left("CUDA graph check"):
        for b in sorted({b for b, s in cases if s == 1}) or [8]:
            emit(graph_decode(meta, device, b, "bfloat16", hq, hk, d, compile_backend=args.compile_backend,
                              with_compile="torch.compile" in peers, log=log))
    def run_sweep():
        if args.no_sweep or not budget_left("block-size sweep"):
            return
        grid = SWEEP_GRID
        if args.sweep_grid:
            grid = {kv.split("=")[0]: tuple(int(v) for v in kv.split("=")[1].split(",")) for kv in args.sweep_grid.split(";")}
        classes = sweep_classes(cases, dtypes[0], hq, hk, d, device)
        emit(sweep(meta, classes, grid, rounds=max(3, args.rounds // 2), deadline=deadline, log=log)[0])

    def run_qk_norm():
        if args.no_qk_norm:
            return
        if args.qk_norm_cases:
            qk_cases = [tuple(int(v) for v in c.split("x")) for c in args.qk_norm_cases.split(",")]
        else:
            qk_cases = QK_NORM_CASES if device.type == "cuda" else cases
        qk_modes = [m for m in QK_NORM_MODES if m in modes] or list(QK_NORM_MODES)
        for dt in args.qk_norm_dtypes.split(","):
            for b, s in qk_cases:
                if not budget_left(f"qk-norm {dt} b={b} s={s}"):
                    continue
                emit(bench_qk_norm_case(Case(b, s, hq, hk, d, dt, device), meta, qk_modes, args.rounds,
                                        args.compile_backend, log=log))
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    # what the targets need first: the first dtype's first two modes, the sweep, the qk-norm
    # section, the first dtype's other modes, then the other dtypes' first mode, then the rest
    first = [(dtypes[0], m) for m in modes[:2]]
    order = first + [(dtypes[0], m) for m in modes[2:]] + [(dt, modes[0]) for dt in dtypes[1:]]
    order += [(dt, m) for dt in dtypes[1:] for m in modes[1:]]
    for i, (dt, mode) in enumerate(order):
        if i == len(first):
            run_sweep()
            run_qk_norm()
        for b, s in cases:
            if not budget_left(f"{mode} {dt} b={b} s={s}"):
                continue
            emit(bench_case(Case(b, s, hq, hk, d, dt, device), meta, peers, [mode], args.rounds, args.compile_backend, log=log))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if len(order) <= len(first):
        run_sweep()
        run_qk_norm()
    md_path.write_text(summarize(all_rows, tests, meta["_peak_source"]))
    print(f"wrote {len(all_rows)} rows to {csv_path} and the summary to {md_path} in {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
