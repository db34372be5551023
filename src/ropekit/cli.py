"""The ``ropekit`` command: inspect, plot, verify, bench, demo.

MODEL arguments accept a preset name (``ropekit list``), a ``config.json`` path, a local
Hugging Face model folder (its ``config.json``), or an inline spec
``head_dim=128,base=500000[,rotary_dim=..,layout=..,context=..,label=..]``, optionally
with a scheme: ``rope_type=yarn,factor=4,original_max_position=4096`` (the parameters of
:mod:`ropekit.scaling`). Append ``:unscaled`` to drop the scaling (same base frequencies,
original context).

Every user error prints one line ``ropekit: error: ...`` and exits with status 2;
``verify`` exits with 1 when a check fails. When the reader of the output goes away early
(``ropekit inspect MODEL | head``) the command stops quietly with status 141 (128 + SIGPIPE,
as Unix tools do). ``ropekit --version`` prints the version.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import inspect as _inspect
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO

import torch

from ._errors import fail

__all__ = ["main", "build_parser", "load_models", "Progress"]

#: Preset used by ``ropekit demo`` and ``ropekit verify`` without MODEL.
DEFAULT_MODEL = "llama-3.1-8b"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and no ``sys.exit`` on them."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


# ----------------------------------------------------------------------------- models
def _presets() -> Any:
    try:
        from . import presets
    except ImportError:
        return None
    return presets


def _builtin_default() -> Any:
    """Llama 3.1 8B's rotary settings, used by the demo when ropekit.presets is missing.

    Source: meta-llama/Llama-3.1-8B config.json (rope_theta 500000, head_dim 128,
    rope_scaling llama3 factor 8 / low 1 / high 4 / original 8192, max positions 131072).
    """
    from .analysis import Model
    from .config import RopeConfig
    from .scaling import Llama3

    sc = Llama3(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
    cfg = RopeConfig(head_dim=128, base=500000.0, scaling=sc)
    return Model(DEFAULT_MODEL, cfg, context=131072, source="meta-llama/Llama-3.1-8B (built in)")


def _models_from(label: str, config: Any, context: Optional[int], source: Optional[str]) -> list:
    from .analysis import Model
    from .config import RopeConfig

    if isinstance(config, dict):
        return [Model(f"{label} [{lt}]", c, context, source) for lt, c in config.items()]
    if not isinstance(config, RopeConfig):
        raise fail("a RopeConfig", type(config).__name__, f"check the loader of {label}")
    return [Model(label, config, context, source)]


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")


def _positive_int(v: Any) -> Optional[int]:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _context_of(data: Dict[str, Any]) -> Optional[int]:
    """The context length a config.json states, else the one its transformers config class
    fills in (e.g. ``google/gemma-3-4b-it`` omits ``max_position_embeddings``, equal to
    Gemma3TextConfig's default 131072), else ``None``."""
    for d in (data, data.get("text_config") or {}, data.get("llm_config") or {}):
        if isinstance(d, dict):
            for key in _CONTEXT_KEYS:
                v = _positive_int(d.get(key))
                if v is not None:
                    return v
    return _class_default_context(data)


def _class_default_context(data: Dict[str, Any]) -> Optional[int]:
    model_type = data.get("model_type")
    if not isinstance(model_type, str):
        return None
    try:
        from transformers import AutoConfig  # optional dependency
    except Exception:
        return None
    rest = {k: v for k, v in data.items() if k != "model_type"}
    try:
        conf = AutoConfig.for_model(model_type, **rest)
    except Exception:  # unknown model type, or a config the class refuses: no context
        return None
    for obj in (conf, getattr(conf, "text_config", None), getattr(conf, "llm_config", None)):
        for key in _CONTEXT_KEYS:
            v = _positive_int(getattr(obj, key, None)) if obj is not None else None
            if v is not None:
                return v
    return None


def _path_label(path: Path, file: Path) -> str:
    """A model folder, or a file named config.json: the folder's name (the Hugging Face
    layout, where the folder is the model); any other file: its own name without .json."""
    if path.is_dir():
        return path.resolve().name or str(path)
    if file.name == "config.json":
        return file.resolve().parent.name or file.name
    return file.stem or file.name


def _load_path(path: Path) -> list:
    from .config import RopeConfig

    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise fail("a model folder containing config.json", f"{path} without config.json", "pass the folder of a HF checkpoint or its config.json")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail("a readable JSON config.json", f"{file}: {e}", "check the file (is it a Hugging Face config.json?)") from None
    if not isinstance(data, dict):
        raise fail("a JSON object in config.json", type(data).__name__, "check the file")
    try:
        cfg = RopeConfig.from_hf(data)
    except ImportError as e:
        raise fail("ropekit.hf (the config loader)", f"ImportError: {e}", "update ropekit") from None
    label = _path_label(path, file)
    return _models_from(label, cfg, _context_of(data), str(file))


_SPEC_KEYS = ("head_dim", "base", "rotary_dim", "layout", "context", "label", "rope_type")


def _spec_value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def _spec_context(value: str) -> int:
    """``context=`` of an inline spec: a whole number of positions (``8192``, ``1e5``) in ``[1, 2**53]``."""
    from ._checks import integer
    from .config import MAX_EXACT_POSITION

    v = _spec_value(value)
    if isinstance(v, (str, bool)):
        raise fail("context a whole number of positions", repr(value), "give the model's context length in tokens, e.g. context=131072")
    return integer("context", v, minimum=1, maximum=MAX_EXACT_POSITION,
                   fix="give the model's context length in tokens, e.g. context=131072 or context=1.28e5")


def _load_spec(spec: str) -> list:
    """``head_dim=128,base=1e4[,rotary_dim=..,layout=..,context=..,label=..]`` plus, with
    ``rope_type=<scheme>``, that scheme's parameters (``factor=4,original_max_position=4096``)."""
    from .config import RopeConfig
    from .scaling import Scaling

    kw: Dict[str, Any] = {}
    params: Dict[str, Any] = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not key or not value or (key not in _SPEC_KEYS and "rope_type" not in spec):
            raise fail(
                f"key=value pairs with keys {_SPEC_KEYS} (+ scheme parameters after rope_type=)",
                repr(part),
                "e.g. head_dim=128,base=500000,context=8192 or head_dim=128,rope_type=linear,factor=4",
            )
        (kw if key in _SPEC_KEYS else params)[key] = value
    try:
        head_dim = int(kw.pop("head_dim"))
        base = float(kw.pop("base", 10000.0))
        rotary = int(kw.pop("rotary_dim")) if "rotary_dim" in kw else None
    except KeyError:
        raise fail("head_dim in the spec", repr(spec), "e.g. head_dim=128,base=10000") from None
    except ValueError as e:
        raise fail("numbers for head_dim/base/rotary_dim", repr(spec), f"fix the value ({e})") from None
    context = _spec_context(kw.pop("context")) if "context" in kw else None
    scaling = None
    kind = kw.pop("rope_type", None)
    if kind is not None:
        try:
            scaling = Scaling.from_dict({"rope_type": kind, **{k: _spec_value(v) for k, v in params.items()}})
        except TypeError as e:
            raise fail(f"parameters of the {kind} scheme", repr(sorted(params)), f"check the names ({e})") from None
    cfg = RopeConfig(head_dim=head_dim, base=base, rotary_dim=rotary, layout=kw.pop("layout", "half"), scaling=scaling)
    label = kw.pop("label", f"d={head_dim} base={base:g}" + (f" r={rotary}" if rotary else "") + (f" {kind}" if kind else ""))
    return _models_from(label, cfg, context, "inline spec")


def _load_preset(name: str) -> list:
    presets = _presets()
    if presets is None:
        raise fail(
            "a preset name, a config.json path or head_dim=...,base=...",
            repr(name),
            "this build has no ropekit.presets; pass a config.json path or an inline spec",
        )
    names = list(presets.names())
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise fail(
            "a preset name, a config.json path or a model folder",
            repr(name) + " (no such preset or file)",
            hint + "run `ropekit list` for the presets",
        )
    info = presets.info(name)
    return _models_from(name, info["config"], info.get("context"), info.get("source"))


def load_models(spec: str) -> list:
    """Resolve one MODEL argument to a list of :class:`ropekit.analysis.Model` (one per
    layer type for per-layer configs such as Gemma 3). See the module docstring."""
    from .analysis import Model

    if not isinstance(spec, str) or not spec.strip():
        raise fail("a MODEL (preset name, config.json path or inline spec)", repr(spec), "see `ropekit list`")
    unscaled = spec.endswith(":unscaled")
    if unscaled:
        spec = spec[: -len(":unscaled")]
    if os.path.exists(spec):
        models = _load_path(Path(spec))
    elif "=" in spec:
        models = _load_spec(spec)
    else:
        models = _load_preset(spec)
    if unscaled:
        models = [Model(f"{m.label} unscaled", m.config.replace(scaling=None), m.original_context, m.source) for m in models]
    return models


def _load_all(specs: Sequence[str]) -> list:
    out: list = []
    for s in specs:
        out.extend(load_models(s))
    return out


def _default_models() -> list:
    p = _presets()
    if p is not None and DEFAULT_MODEL in p.names():
        return load_models(DEFAULT_MODEL)
    return [_builtin_default()]


# ----------------------------------------------------------------------------- formatting
def _num(x: Optional[float]) -> str:
    if x is None:
        return "∞"
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax >= 1e7 or ax < 1e-2:
        return f"{x:.3g}"
    if ax >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _range(lo: Optional[float], hi: Optional[float]) -> str:
    return _num(lo) if lo == hi else f"{_num(lo)} .. {_num(hi)}"


def _scaling_text(sc: Optional[dict]) -> str:
    if not sc:
        return "none"
    d = dict(sc)
    kind = d.pop("rope_type", "?")
    parts = []
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, list):
            v = f"[{len(v)} values {_num(min(v))}..{_num(max(v))}]" if v else "[]"
        elif isinstance(v, float):
            v = f"{v:g}"
        parts.append(f"{k}={v}")
    return kind + ("  " + " ".join(parts) if parts else "")


def format_summary(s: Dict[str, Any], *, pairs: bool = False) -> str:
    """The text table of ``ropekit inspect`` from :func:`ropekit.analysis.summary`."""
    c = s["config"]
    scaled = c["scaling"] is not None
    rows = [
        ("head dim / rotary dim", f"{c['head_dim']} / {c['rotary_dim']} ({s['n_pairs']} pairs)"),
        ("base", _num(c["base"])),
        ("layout", c["layout"] + (": pairs (i, i + r/2)" if c["layout"] == "half" else ": pairs (2i, 2i+1)")),
        ("scaling", _scaling_text(c["scaling"])),
        ("attention factor", f"{s['attention_factor']:.6g}" + (" (folded into cos/sin)" if s["attention_factor"] != 1 else "")),
    ]
    ctx, orig = s["context"], s["original_context"]
    if ctx:
        rows.append(("context", f"{ctx:,} positions" + (f" (original {orig:,})" if orig and orig != ctx else "")))
    else:
        rows.append(("context", "unknown"))
    t, w = s["theta"], s["wavelength"]
    if scaled:
        rows.append(("θ (rad/token)", f"{_range(*t['before'])} before scaling; {_range(*t['after'])} after"))
        rows.append(("wavelength (tokens)", f"{_range(*w['before'])} before; {_range(*w['after'])} after"))
    else:
        rows.append(("θ (rad/token)", _range(*t["before"])))
        rows.append(("wavelength (tokens)", _range(*w["before"])))
    if s.get("not_rotating"):
        rows.append(("not rotating", f"{s['not_rotating']} pairs have θ = 0 after scaling (identity)"))
    b = s.get("bands")
    if b:
        extra = f" (pairs <= {b['low']:.3g} / >= {b['high']:.3g})" if b["kind"] == "yarn" else ""
        rows.append(
            (f"bands ({b['kind']})", f"unchanged for λ < {_num(b['unchanged_below'])}, interpolated for λ > {_num(b['interpolated_above'])}{extra}")
        )
    cov = s.get("coverage")
    if cov:
        text = f"{cov['wrapped_in_training']} of {s['n_pairs']} pairs turn fully within {orig:,} tokens"
        n_out = len(cov["out_of_range"])
        if ctx and ctx != orig or scaled:
            if n_out:
                text += f"; at {ctx:,}, {n_out} pairs reach angles beyond training (up to {cov['max_angle_ratio']:.3g}x)"
            else:
                text += f"; at {ctx:,} every pair stays within the angles seen in training"
        rows.append(("coverage", text))
    elif scaled:
        rows.append(("coverage", "unknown: this scheme does not record the original (training) context"))
    width = max(len(k) for k, _ in rows) + 2
    head = s["label"] + (f"  ({s['source']})" if s.get("source") else "")
    lines = [head] + [f"  {k:<{width}}{v}" for k, v in rows]
    lines.append(f"  {'pairs':<{width}}{'class':<14}{'wavelength before':<22}{'after':<22}θ_before/θ_after")
    for r in s["runs"]:
        span = f"{r['first']}-{r['last']}" if r["first"] != r["last"] else f"{r['first']}"
        lines.append(
            f"    {span:<{width - 2}}{r['class']:<14}{_range(*r['wavelength_before']):<22}"
            f"{_range(*r['wavelength_after']):<22}{_range(*r['ratio'])}"
        )
    if pairs:
        lines.append(f"  {'pair':>6} {'θ before':>12} {'θ after':>12} {'λ before':>12} {'λ after':>12} {'factor':>8}  class")
        for p in s["pairs"]:
            lines.append(
                f"  {p['pair']:>6} {p['theta_before']:>12.5g} {p['theta_after']:>12.5g} {_num(p['wavelength_before']):>12}"
                f" {_num(p['wavelength_after']):>12} {_num(p['ratio']):>8}  {p['class']}"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- progress
class Progress:
    """A tiny progress bar (tqdm is not a dependency).

    On a terminal it redraws one line ``[#####.....] 3/10 label 1.2s``; otherwise (logs,
    pipes) it prints one line per step.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> with Progress(2, stream=out) as p:
        ...     p.update("a"); p.update("b")
        >>> out.getvalue().splitlines()[-1].startswith("[##############################] 2/2")
        True
    """

    def __init__(self, total: int, *, stream: Optional[TextIO] = None, width: int = 30) -> None:
        self.total, self.n, self.width = max(int(total), 1), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()

    def update(self, label: str = "") -> None:
        self.n += 1
        full = int(self.width * min(self.n, self.total) / self.total)
        line = f"[{'#' * full}{'.' * (self.width - full)}] {self.n}/{self.total} {label} {time.perf_counter() - self.t0:.1f}s"
        if self.tty:
            self.stream.write("\r" + line[: 120].ljust(120))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------- commands
def _cmd_list(args: argparse.Namespace) -> int:
    p = _presets()
    if p is None:
        raise fail("ropekit.presets", "not available in this build", "pass config.json paths or inline specs instead")
    names = list(p.names())
    w = max(len(n) for n in names) + 2
    for n in names:
        info = p.info(n)
        ctx = info.get("context")
        print(f"{n:<{w}}{(f'{ctx:,}' if ctx else '?'):>10}  {info.get('source', '')}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .analysis import summary

    models = load_models(args.model)
    sums = [summary(m) for m in models]
    if args.json:
        print(json.dumps({"model": args.model, "configs": sums}, indent=2, allow_nan=False))
        return 0
    print("\n\n".join(format_summary(s, pairs=args.pairs) for s in sums))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .analysis import plots

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise fail("--out FILE.png", repr(args.out), "give the output a .png name")
    models = _load_all(args.models)
    fn = plots.KINDS[args.kind]
    kw = {}
    if args.max_distance is not None:
        if args.kind not in ("decay", "scores"):
            raise fail("--max-distance with plot decay or scores", f"plot {args.kind}", "drop --max-distance (it sets the x range of decay/scores)")
        kw["max_distance"] = args.max_distance
    fn(models, str(out), **kw)
    print(f"wrote {out} ({args.kind}: {', '.join(m.label for m in models)})")
    return 0


def _prepare_triton() -> str:
    """Without CUDA, run Triton kernels in its CPU interpreter (must precede the import)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        return " (Triton runs in its CPU interpreter)"
    return ""


def _check_line(i: int, c: Any) -> str:
    status = "SKIP" if c.skipped else ("PASS" if c.passed else "FAIL")
    value = c.note if c.skipped else f"{c.value:.2e} <= {c.bound:.1e}" + (f"  ({c.note})" if c.note else "")
    return f"  [{i:>2}] {status}  {c.name:<78} {value}"


def _run_verify(models: list, names: Optional[List[str]], stream: Optional[TextIO] = None) -> list:
    from . import backends as _backends
    from .analysis.checks import backend_checks, property_checks

    stream = sys.stdout if stream is None else stream

    note = _prepare_triton()
    if names is None:
        names = _backends.available()
    else:
        for n in names:
            _backends.get(n)  # RopeError for unknown/unavailable
    print(f"backends on this machine: {', '.join(names)}{note if 'triton' in names else ''}", file=stream)
    results = []
    i = 0
    for m in models:
        sc = m.config.scaling
        print(
            f"{m.label}: head dim {m.config.head_dim}, rotary dim {m.config.rotary_dim}, {m.config.layout}, "
            f"scaling {sc.rope_type if sc is not None else 'none'}, context {m.context or 'unknown'}",
            file=stream,
        )
        for c in property_checks(m.config, context=m.context):
            i += 1
            results.append(c)
            print(_check_line(i, c), file=stream, flush=True)

        def show(c: Any) -> None:
            nonlocal i
            i += 1
            print(_check_line(i, c), file=stream, flush=True)

        results.extend(backend_checks(m.config, names, context=m.context, on_check=show))
    failed = [c for c in results if not c.passed]
    print(f"{len(results)} checks: {len(results) - len(failed)} passed, {len(failed)} failed", file=stream)
    return results


def _cmd_verify(args: argparse.Namespace) -> int:
    models = load_models(args.model) if args.model else _default_models()
    if not args.json:
        results = _run_verify(models, args.backend)
        return 0 if all(c.passed for c in results) else 1
    import io

    log = io.StringIO()  # the human-readable lines are not part of the JSON
    results = _run_verify(models, args.backend, stream=log)
    checks = [
        {"name": c.name, "value": c.value if math.isfinite(c.value) else str(c.value), "bound": c.bound,
         "passed": c.passed, "skipped": c.skipped, "note": c.note}
        for c in results
    ]
    print(json.dumps({"models": [m.label for m in models], "passed": all(c.passed for c in results),
                      "n_checks": len(checks), "n_failed": sum(not c["passed"] for c in checks), "checks": checks},
                     indent=2))
    return 0 if all(c.passed for c in results) else 1


def find_bench_script() -> Optional[Path]:
    """``benchmarks/bench_apply.py`` of a source checkout (``$ROPEKIT_BENCH`` overrides)."""
    env = os.environ.get("ROPEKIT_BENCH")
    cands = [Path(env)] if env else []
    cands += [Path(__file__).resolve().parents[2] / "benchmarks" / "bench_apply.py", Path.cwd() / "benchmarks" / "bench_apply.py"]
    for c in cands:
        if c.is_file():
            return c
    return None


def _cmd_bench(args: argparse.Namespace) -> int:
    """Run ``benchmarks/bench_apply.py`` in-process. Protocol, first match wins:

    - ``cases(quick: bool) -> list`` and ``run_case(case) -> dict`` (and optionally
      ``summary(rows) -> str``): ropekit drives the cases with :class:`Progress` and prints
      the summary (or a plain table of the row dicts);
    - ``main(argv)`` (optionally ``main(argv, progress=Progress)``), called with
      ``["--quick", *extra]`` (``--full`` drops ``--quick``).
    """
    script = find_bench_script()
    if script is None:
        raise fail(
            "benchmarks/bench_apply.py of a ropekit source checkout",
            "no such file (ropekit installed from a wheel?)",
            "clone the repository and run `ropekit bench` (or `make bench`) inside it; ROPEKIT_BENCH=path also works",
        )
    spec = importlib.util.spec_from_file_location("ropekit_bench_apply", script)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.path.insert(0, str(script.parent))
    try:
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
    finally:
        sys.path.remove(str(script.parent))
    extra = list(args.bench_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    argv = ([] if args.full else ["--quick"]) + extra
    print(f"ropekit bench: {script}{' --quick' if not args.full else ''}", flush=True)
    if hasattr(mod, "cases") and hasattr(mod, "run_case"):
        # the script exposes its cases: drive them with the progress bar and summarise here
        cases = list(mod.cases(quick=not args.full))
        rows = []
        with Progress(len(cases)) as bar:
            for case in cases:
                rows.append(mod.run_case(case))
                bar.update(str(getattr(case, "name", case))[:60])
        print(mod.summary(rows) if hasattr(mod, "summary") else _table(rows))
        return 0
    main_fn = getattr(mod, "main", None)
    if main_fn is None:
        raise fail("bench_apply.py defining main(argv)", f"{script} without main", "update the benchmark script")
    if hasattr(mod, "bench_case") and hasattr(mod, "table"):
        return _bench_apply_with_progress(mod, argv, verbose=args.verbose)
    kw = {}
    try:
        if "progress" in _inspect.signature(main_fn).parameters:
            kw["progress"] = Progress
    except (TypeError, ValueError):  # pragma: no cover - builtins without signature
        pass
    rc = main_fn(argv, **kw)
    return int(rc or 0)


def _opt(argv: List[str], name: str) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _bench_apply_with_progress(mod: Any, argv: List[str], *, verbose: bool) -> int:
    """Run bench_apply.main(argv) with a progress bar over its ``bench_case`` calls, its
    per-row lines hidden (``--verbose`` shows them), then print its summary table.

    Without ``--csv`` in ``argv`` the rows go to a temporary CSV, so a quick run never
    appends to the committed ``benchmarks/results/apply.csv``.
    """
    import contextlib
    import io
    import tempfile

    quick = "--quick" in argv
    cases = _opt(argv, "--cases")
    n_cases = len(cases.split(",")) if cases else (2 if quick else 3)
    n_dtypes = len((_opt(argv, "--dtypes") or "float32,bfloat16").split(","))
    with tempfile.TemporaryDirectory() as tmp:
        csv = user_csv = _opt(argv, "--csv")
        if csv is None:
            csv = str(Path(tmp) / "apply.csv")
            argv = argv + ["--csv", csv]
        real_case, real_first = mod.bench_case, getattr(mod, "first_call", None)
        with Progress(n_cases * n_dtypes + (1 if real_first else 0)) as bar:

            def case(b, s, hq, hk, d, dtype_name, *a, **k):
                rows = real_case(b, s, hq, hk, d, dtype_name, *a, **k)
                bar.update(f"{dtype_name} b={b} s={s}")
                return rows

            def first(*a, **k):
                rows = real_first(*a, **k)
                bar.update("first call (fresh process)")
                return rows

            mod.bench_case = case
            if real_first:
                mod.first_call = first
            sink = sys.stdout if verbose else io.StringIO()
            try:
                with contextlib.redirect_stdout(sink):
                    rc = mod.main(argv)
            finally:
                mod.bench_case = real_case
                if real_first:
                    mod.first_call = real_first
        print(mod.table(Path(csv)))
        if user_csv is not None:
            print(f"rows appended to {csv}")
    return int(rc or 0)


def _table(rows: List[Dict[str, Any]]) -> str:
    if not rows:
        return "(no results)"
    keys = list(rows[0])
    cells = [[str(r.get(k, "")) for k in keys] for r in rows]
    w = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w[i]) for i, k in enumerate(keys))]
    lines += ["  ".join(c[i].ljust(w[i]) for i in range(len(keys))) for c in cells]
    return "\n".join(lines)


_FIGURES = (
    ("decay", "Long-range decay bound",
     "RoFormer's bound (1/(r/2)) Σ_j |S_j| on the attention score vs relative distance (section 3.4.3). "
     "Lower frequencies (larger base, interpolation) keep the bound high over longer distances."),
    ("wavelengths", "Wavelength of each pair",
     "2π/θ_i per rotary pair before (dashed) and after (solid) scaling, against the original (dotted) and "
     "extended (dash-dot) context; shading: unchanged / in between / interpolated pairs of the scaled model."),
    ("frequencies", "Frequencies before and after scaling",
     "θ_i on a log axis and the per-pair factor θ_before/θ_after the scheme divides each frequency by."),
    ("scores", "Attention logit vs distance",
     "⟨f(q,m), f(k,n)⟩/√d for q = k, averaged over 64 standard normal vectors; it depends only on m - n."),
)


def _report_dir(path: str) -> Path:
    """``--out`` of the demo, created if missing; a RopeError naming the path if it cannot be."""
    out = Path(path)
    fix = "pass --out a folder that can be created and written"
    if out.exists() and not out.is_dir():
        raise fail("--out a folder (created if missing)", f"{str(out)!r}, an existing file", fix)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fail("--out a folder (created if missing)", f"{str(out)!r} ({e.strerror or e})", fix) from None
    if not os.access(out, os.W_OK):
        raise fail("--out a writable folder", f"{str(out)!r}, not writable", fix)
    return out


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import __version__
    from .analysis import Model, plots, summary
    from .config import RopeConfig

    t0 = time.perf_counter()
    out = _report_dir(args.out)  # before the checks: a bad --out fails at once, not after them
    models = load_models(args.model) if args.model else _default_models()
    name = args.model or models[0].label
    print(f"ropekit demo — {name}\n")
    sums = [summary(m) for m in models]
    tables = [format_summary(s) for s in sums]
    print("\n\n".join(tables) + "\n")

    print("verify:")
    results = _run_verify(models, None)
    print()

    # figures: the model, the same frequencies without scaling, and plain RoPE (base 1e4)
    compare = list(models)
    for m in models:
        if m.config.scaling is not None:
            compare.append(Model(f"{m.label} unscaled", m.config.replace(scaling=None), m.original_context, m.source))
    d = models[0].config.head_dim
    compare.append(Model("RoPE base 1e4 (RoFormer)", RopeConfig(head_dim=d, base=10000.0), 4096, "arXiv 2104.09864"))
    written = []
    for kind, _, _ in _FIGURES:
        path = out / f"{kind}.png"
        plots.KINDS[kind](compare, str(path))
        written.append(path)
        print(f"  wrote {path}")

    failed = [c for c in results if not c.passed]
    lines = [
        f"# ropekit report — {name}",
        "",
        f"ropekit {__version__}, torch {torch.__version__}. Reproduce with `ropekit demo"
        + (f" --model {args.model}" if args.model else "") + "` (or `make demo`).",
        "",
        "## Configuration (`ropekit inspect`)",
        "",
        "```",
        *"\n\n".join(tables).splitlines(),
        "```",
        "",
        "## Checks (`ropekit verify`)",
        "",
        f"{len(results)} checks, {len(results) - len(failed)} passed, {len(failed)} failed.",
        "",
        "| # | check | measured | bound | result |",
        "|---|---|---|---|---|",
    ]
    for i, c in enumerate(results, 1):
        val = c.note if c.skipped else f"{c.value:.2e}"
        res = "skip" if c.skipped else ("pass" if c.passed else "**FAIL**")
        lines.append(f"| {i} | {c.name.replace('|', chr(92) + '|')} | {val} | {c.bound:.1e} | {res} |")
    lines += ["", "## Figures", "", "Compared: " + ", ".join(m.label for m in compare) + ".", ""]
    for kind, title, text in _FIGURES:
        lines += [f"### {title}", "", text, "", f"![{title}]({kind}.png)", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    print(f"\nreport: {report.resolve()} with {len(written)} figures ({time.perf_counter() - t0:.1f}s)")
    return 0 if not failed else 1


# ----------------------------------------------------------------------------- parser
def _distance(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 (a distance in tokens), got {v!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ropekit",
        description="Rotary position embedding: inspect a model's RoPE, plot it, verify the kernels, benchmark them.",
        epilog="MODEL: a preset name (`ropekit list`), a config.json path, a HF model folder, or "
        "head_dim=128,base=500000[,rotary_dim=..,layout=..,context=..,label=..][,rope_type=yarn,factor=4,"
        "original_max_position=4096]; append :unscaled to drop the scaling.",
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"ropekit {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("inspect", help="table of a model's rotary settings, frequency bands and context coverage")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--json", action="store_true", help="print JSON (ropekit.analysis.summary) instead of the table")
    s.add_argument("--pairs", action="store_true", help="also list every rotary pair")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("plot", help="draw decay / wavelengths / frequencies / scores for one or more models into a PNG")
    s.add_argument("kind", choices=["decay", "wavelengths", "frequencies", "scores"])
    s.add_argument("models", metavar="MODEL", nargs="+")
    s.add_argument("--out", required=True, metavar="FILE.png")
    s.add_argument(
        "--max-distance", type=_distance, default=None, metavar="N",
        help="largest distance for decay/scores, an int >= 1 (default: the largest context)",
    )
    s.set_defaults(func=_cmd_plot)

    s = sub.add_parser("verify", help="property checks and agreement of every available backend; exit 1 on failure")
    s.add_argument("model", metavar="MODEL", nargs="?", help=f"default: {DEFAULT_MODEL}")
    s.add_argument("--backend", action="append", metavar="NAME", help="only this backend (repeatable); default: all available")
    s.add_argument("--json", action="store_true", help="print the checks as JSON (name, value, bound, passed, note)")
    s.set_defaults(func=_cmd_verify)

    s = sub.add_parser("bench", help="run benchmarks/bench_apply.py --quick (source checkout only)")
    s.add_argument("--full", action="store_true", help="the full benchmark instead of --quick")
    s.add_argument("--verbose", action="store_true", help="show the script's per-variant lines")
    s.add_argument("bench_args", nargs=argparse.REMAINDER, help="extra arguments passed to the script")
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("demo", help="tour of a model: inspect + verify + figures in ropekit-report/")
    s.add_argument("--model", default=None, metavar="MODEL", help=f"default: {DEFAULT_MODEL}")
    s.add_argument("--out", default="ropekit-report", metavar="DIR")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("list", help="the presets: name, context, source model")
    s.set_defaults(func=_cmd_list)

    s = sub.add_parser(
        "hf-sweep",
        help="every RoPE family of the installed transformers: from_hf exact?, path = object?, patch proven? "
        "(tiny configs, no downloads); exit 1 if anything is wrong",
    )
    s.add_argument("--only", action="append", metavar="MODEL_TYPE", help="only this model_type (repeatable)")
    s.add_argument("--no-models", action="store_true", help="config checks only (no model is built or patched)")
    s.add_argument("--no-generate", action="store_true", help="skip the greedy-generation comparison")
    s.add_argument("--out", metavar="FILE", help="write the table (.md) or the rows (.json) there")
    s.add_argument(
        "--docs", metavar="FILE", help="replace the table between the sweep markers of this markdown file "
        "(docs/transformers.md)",
    )
    s.add_argument("--quiet", action="store_true", help="no per-model line on stderr")
    s.add_argument(
        "--table",
        metavar="FILE.json",
        help="instead of the sweep: add the installed transformers' rows to the family table "
        "(src/ropekit/hf_families.json), each checked against the family's code",
    )
    s.set_defaults(func=_cmd_hf_sweep)

    # every argument goes to ropekit.experiment's own parser (prefix_chars="+" keeps argparse
    # from claiming --smoke etc. here)
    s = sub.add_parser(
        "experiment",
        add_help=False,
        prefix_chars="+",
        help="tiny byte-level LM on CPU: position encodings and length extrapolation (docs/evidence.md)",
    )
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_experiment)
    return p


SWEEP_BEGIN = "<!-- hf-sweep table: begin (ropekit hf-sweep --docs docs/transformers.md) -->"
SWEEP_END = "<!-- hf-sweep table: end -->"


def _check_model_types(only: Optional[List[str]]) -> None:
    """``--only`` names must be model types the installed transformers knows (a typo is a
    usage error, exit 2, not an "untested" row and exit 0)."""
    if not only:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    known = list(CONFIG_MAPPING_NAMES)
    for mt in only:
        if mt not in CONFIG_MAPPING_NAMES:
            close = difflib.get_close_matches(mt, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise _UsageError(
                f"--only {mt!r}: not a model_type of the installed transformers{hint} (a config.json's \"model_type\", "
                "e.g. llama, qwen2, gemma3_text)"
            )


def _cmd_hf_sweep(args: argparse.Namespace) -> int:
    from .integrations import hf_sweep

    _check_model_types(args.only)
    t0 = time.perf_counter()
    if args.table:
        def note(mt: str, row: Any) -> None:
            if not args.quiet:
                what = row.get("refuse") or row.get("code") or ("table" if row.get("components") or row.get("by_flag") else "config rules")
                print(f"{mt:40s} {str(what)[:110]}", file=sys.stderr)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = hf_sweep.write_table(args.table, args.only, progress=note)
        import transformers

        rows = data["rows"]
        here = [r for entries in rows.values() for r in entries if transformers.__version__ in r.get("verified", ())]
        print(
            f"transformers {transformers.__version__}: {len(here)} rows verified ({sum(bool(r.get('code')) for r in here)} "
            f"answered from the code, {sum(bool(r.get('refuse')) for r in here)} refused); {len(rows)} rows in "
            f"{args.table}, {time.perf_counter() - t0:.0f} s"
        )
        return 0

    def show(row: Any) -> None:
        if not args.quiet:
            note = "; ".join(t for t in (row.detail, row.patch_detail) if t)
            print(f"{row.model_type:40s} config {row.config:8s} patch {row.patch:9s} {note[:100]}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = hf_sweep.sweep(args.only, models=not args.no_models, generate=not args.no_generate, progress=show)
    summ = hf_sweep.summary(rows)
    import transformers

    head = (
        f"transformers {transformers.__version__}, torch {torch.__version__}; "
        f"{summ['model_types']} model types ({summ['families']} modeling modules) with a 1-D rotary class, "
        f"{time.perf_counter() - t0:.0f} s."
    )
    counts = "\n".join(f"- {k.replace('_', ' ')}: {v}" for k, v in summ.items())
    if args.out:
        hf_sweep.write(rows, args.out)
    if args.docs:
        path = Path(args.docs)
        text = path.read_text(encoding="utf-8")
        if SWEEP_BEGIN not in text or SWEEP_END not in text:
            raise _UsageError(f"{path} has no sweep markers ({SWEEP_BEGIN} ... {SWEEP_END})")
        a, rest = text.split(SWEEP_BEGIN, 1)
        _, b = rest.split(SWEEP_END, 1)
        block = f"{SWEEP_BEGIN}\n{head}\n\n{counts}\n\n{hf_sweep.format_table(rows)}\n{SWEEP_END}"
        path.write_text(a + block + b, encoding="utf-8")
    print(head)
    print(counts)
    bad = summ["config_wrong_model_types"] + summ["patch_wrong_model_types"]
    return 1 if bad else 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from .experiment import run

    return run(args.rest)


#: Exit status when the reader of stdout closes it early (``ropekit inspect ... | head``):
#: 128 + SIGPIPE, what a Unix tool killed by SIGPIPE reports. Nothing is printed.
EXIT_BROKEN_PIPE = 141


def _reader_went_away() -> int:
    # Point stdout at /dev/null so the interpreter's final flush does not fail again and
    # print "Exception ignored ... BrokenPipeError" (the recipe of Python's signal docs).
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # pragma: no cover - stdout without a file descriptor
        pass
    return EXIT_BROKEN_PIPE


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; returns the exit status (0 ok, 1 a verify check failed, 2 error)."""
    p = build_parser()
    try:
        args = p.parse_args(argv)
        if not getattr(args, "func", None):
            p.print_help()
            return 2
        return int(args.func(args) or 0)
    except SystemExit as e:  # --help
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except _UsageError as e:
        print(f"ropekit: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _reader_went_away()
    except (ValueError, OSError, ImportError) as e:  # RopeError and friends: one clear line, no traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"ropekit: error: {msg}", file=sys.stderr)
        return 2
