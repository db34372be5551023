"""The Triton kernels compiled ahead of time for sm_80, sm_90 and sm_100, without a GPU.

What the launcher asks for is recorded, not copied: the op impls
(:mod:`ropekit.backends._triton_ops`) run on meta tensors with the kernels replaced by
recorders (the CUDA branch of the host code: positions checked in the kernel). Each
recorded launch is then handed to the JIT-compiled kernel's own ``run(..., warmup=True)``
under a stand-in driver that names the target: Triton's binder picks the specialisation it
would pick at launch (16-divisible pointers and strides, unit strides as constants, i64 for
strides past 2^31), compiles with its bundled ptxas and returns the compiled kernel without
launching it. Meta tensors have address 0: as aligned as every CUDA allocation (256 bytes).

Asserted from the PTX and the cubin (cuobjdump resource usage) of every specialisation:
it compiles; no local memory (no spills, no stack); 128-bit global loads and stores
(``ld.global.v4`` / ``st.global.v4``) on contiguous 16-byte-aligned rows; no ``fma.rn``
in the rotation kernel (launched with ``enable_fp_fusion=False``); 64-bit address
arithmetic, with 64-bit stride parameters on the large-tensor path. ``ROPEKIT_AOT_REPORT=path``
writes the table (kernel x target: registers, spills, vector widths, FMA count) as markdown.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from ropekit import ops  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.LOADED, reason="the ops need ropekit._C")

ARCHS = (80, 90, 100)
META = "meta"


class _TargetDriver:
    """The three calls JITFunction.run makes of the active driver, answering for ``arch``."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 1000 + self.arch  # one kernel cache per target

    def get_current_stream(self, device=None):
        return 0


def _record(monkeypatch, call):
    """The launches (kernel name, grid, args, kwargs) ``call()`` makes through the CUDA branch."""
    from ropekit.backends import _triton_kernels as K
    from ropekit.backends import triton as tb

    launches = []

    class _Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((self.name, grid, a, kw))

    for name in ("rope_kernel", "qk_norm_fwd_kernel", "qk_norm_bwd_kernel"):
        monkeypatch.setattr(K, name, _Recorder(name))
    monkeypatch.setattr(tb, "_device_side_checks", lambda t: True)
    call()
    return launches


def _t(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device=META)


def _cases():
    """name -> a call of an op impl (the launcher's common cases)."""
    from ropekit.backends import _triton_ops as T

    out = {}
    for d in (64, 128, 256):
        for dt, tag in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32"), (torch.float64, "fp64")):
            if d != 128 and dt != torch.bfloat16:
                continue
            tdt = torch.float64 if dt == torch.float64 else torch.float32
            for layout in ("half", "interleaved"):
                lay = "half" if layout == "half" else "inter"
                q, k = _t(4, 512, 32, d, dtype=dt), _t(4, 512, 8, d, dtype=dt)
                c, s = _t(512, 1, d // 2, dtype=tdt), _t(512, 1, d // 2, dtype=tdt)
                out[f"rotary_qk_ {tag} {lay} d{d}"] = functools.partial(T.rotary_qk_, q, k, c, s, layout)
                if d == 128:
                    out[f"rotary {tag} {lay} d{d}"] = functools.partial(T.rotary, q, c, s, layout)
        c, s = _t(512, 1, 32, dtype=torch.float32), _t(512, 1, 32, dtype=torch.float32)
        x = _t(4, 512, 32, d)
        if d == 128:
            out["rotary bf16 half d128 r64 (partial)"] = functools.partial(T.rotary, x, c, s, "half")
            out["rotary_ bf16 half d128 r64 (partial)"] = functools.partial(T.rotary_, x, c, s, "half")
    ct, st = _t(4096, 64, dtype=torch.float32), _t(4096, 64, dtype=torch.float32)
    q, k = _t(8, 1, 32, 128), _t(8, 1, 8, 128)
    pos = torch.empty(8, dtype=torch.int64, device=META)
    out["rotary_gather_ bf16 half d128 decode"] = functools.partial(T.rotary_gather_, q, k, ct, st, pos, "bshd", "half")
    q, k = _t(4, 512, 32, 128), _t(4, 512, 8, 128)
    pos = torch.empty(4, 512, dtype=torch.int64, device=META)
    out["rotary_gather bf16 inter d128"] = functools.partial(T.rotary_gather, q, k, ct, st, pos, "bshd", "interleaved")
    wq, wk = _t(128), _t(128)
    c, s = _t(512, 1, 64, dtype=torch.float32), _t(512, 1, 64, dtype=torch.float32)
    out["qk_norm_rotary_fwd bf16 half d128"] = functools.partial(T.qk_norm_rotary_fwd, q, k, wq, wk, c, s, 1e-6, 0.0, "half")
    out["qk_norm_rotary_ bf16 inter d128"] = functools.partial(T.qk_norm_rotary_, q, k, wq, wk, c, s, 1e-6, 0.0,
                                                               "interleaved")
    rq, rk = _t(4, 512, 32, dtype=torch.float32), _t(4, 512, 8, dtype=torch.float32)
    out["qk_norm_rotary_bwd bf16 half d128"] = functools.partial(T.qk_norm_rotary_bwd, q, k, q, k, wq, wk, rq, rk, c, s,
                                                                 0.0, "half")
    # large-tensor path: 3 * 2^31 elements, stride(0) = 2^31 (an i64 argument)
    big = _t(3, 1 << 21, 8, 128)
    c, s = _t(1 << 21, 1, 64, dtype=torch.float32), _t(1 << 21, 1, 64, dtype=torch.float32)
    out["rotary_ bf16 half d128 LARGE"] = functools.partial(T.rotary_, big, c, s, "half")
    return out


def _res_usage(cubin: bytes, arch: int) -> dict:
    """REG/STACK/SHARED/LOCAL of the cubin's kernel (Triton's bundled cuobjdump)."""
    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


_COMPILED: dict = {}


def _compile(name, grid, args, kwargs, arch):
    key = (name, arch, repr([(a.dtype, a.shape, a.stride()) if isinstance(a, torch.Tensor) else a for a in args]),
           repr(sorted(kwargs.items())))
    if key not in _COMPILED:
        jit = _JIT[name]
        old = driver._active  # None here: no GPU driver is ever created
        driver.set_active(_TargetDriver(arch))
        try:
            ck = jit.run(*args, grid=grid, warmup=True, **kwargs)
        finally:
            driver._active = old
        ptx = ck.asm["ptx"]
        body = ptx[ptx.index("{"):]
        _COMPILED[key] = {
            "ptx": ptx,
            "res": _res_usage(ck.asm["cubin"], arch),
            "ld128": len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", body)) + len(re.findall(r"ld\.global(?:\.\w+)*\.v2\.b64", body)),
            "st128": len(re.findall(r"st\.global(?:\.\w+)*\.v4\.b32", body)) + len(re.findall(r"st\.global(?:\.\w+)*\.v2\.b64", body)),
            "ld_scalar": len(re.findall(r"ld\.global(?:\.\w+)*\.(?:b16|b32|u16|f32)\b(?!\.)", body)),
            "fma": len(re.findall(r"\bfma\.rn", body)),
            "mul64": len(re.findall(r"\b(?:mul|mad)\.(?:lo|wide)\.[su](?:64|32)\b", body)),
            "local": ".local" in body,
            "params64": len(re.findall(r"\.param \.u64 \w+_param_\d+", ptx)),
            "assert": "__assertfail" in ptx,
        }
    return _COMPILED[key]


_JIT: dict = {}


def _run_all() -> dict:
    """Record and compile every case for every target (in a process without the interpreter:
    Triton's own library functions, e.g. tl.sum's combine, are interpreter objects otherwise)."""
    import ropekit.backends._triton_kernels as K

    _JIT.update({n: getattr(K, n) for n in ("rope_kernel", "qk_norm_fwd_kernel", "qk_norm_bwd_kernel")})
    assert all(type(k).__name__ == "JITFunction" for k in _JIT.values())
    archs = tuple(int(a) for a in os.environ.get("ROPEKIT_AOT_ARCHS", "").split(",") if a) or ARCHS
    results = {}
    mp = pytest.MonkeyPatch()
    for case, call in _cases().items():
        try:
            with mp.context() as m:
                launches = _record(m, call)
            rows = []
            for name, grid, args, kwargs in launches:
                for arch in archs:
                    r = dict(_compile(name, grid, args, kwargs, arch))
                    r.pop("ptx")
                    rows.append({"kernel": name, "arch": arch, "fusion": kwargs.get("enable_fp_fusion"),
                                 "check_pos": bool(kwargs.get("CHECK_POS")), **r})
            results[case] = {"rows": rows}
        except Exception as e:  # reported per case by the test
            results[case] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
    return results


@pytest.fixture(scope="module")
def compiled():
    """Every case compiled for every target: one process per target, run side by side (a cold
    Triton cache makes this the slow part: ~80 compiles)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, __file__], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "ROPEKIT_AOT_ARCHS": str(arch)}) for arch in ARCHS]
    merged: dict = {}
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        for case, res in json.loads(out.strip().splitlines()[-1]).items():
            have = merged.setdefault(case, {"rows": []})
            if "error" in res:
                have["error"] = res["error"]
            else:
                have["rows"] += res["rows"]
    for res in merged.values():  # rows in target order within each launch, as one process gives them
        res["rows"].sort(key=lambda r: ARCHS.index(r["arch"]))
    return merged


ROWS: list = []


@pytest.mark.parametrize("case", list(_cases()))
def test_every_specialisation_compiles_clean(case, compiled):
    res = compiled[case]
    assert "error" not in res, res.get("error")
    assert res["rows"], "the impl launched nothing"
    for r in res["rows"]:
        arch, name, u = r["arch"], r["kernel"], r["res"]
        assert r["fusion"] is False
        ROWS.append((case, name, arch, u.get("REG"), u.get("LOCAL"), u.get("STACK"), r["ld128"], r["st128"], r["fma"],
                     r["params64"]))
        assert not r["local"] and u.get("LOCAL", 0) == 0 and u.get("STACK", 0) == 0, f"{case} sm_{arch}: spills"
        if name == "rope_kernel":
            assert r["fma"] == 0, f"{case} sm_{arch}: {r['fma']} fma.rn in the rotation"
        # contiguous 16-byte-aligned rows: 128-bit accesses
        assert r["ld128"] > 0 and r["st128"] > 0, f"{case} sm_{arch}: no 128-bit global loads/stores"
        assert r["mul64"] > 0, f"{case} sm_{arch}: no 64-bit address arithmetic"
        if r["check_pos"]:
            assert r["assert"], f"{case} sm_{arch}: the position check is not compiled in"
        if "LARGE" in case:
            assert r["params64"] >= 1, f"{case}: strides past 2^31 should be 64-bit parameters"


def test_zz_report():
    """Writes the table when ROPEKIT_AOT_REPORT names a file (runs last in this module)."""
    path = os.environ.get("ROPEKIT_AOT_REPORT")
    if not path or not ROWS:
        pytest.skip("set ROPEKIT_AOT_REPORT=path to write the table")
    lines = ["| case | kernel | target | registers | local (spill) bytes | stack | 128-bit ld | 128-bit st | fma.rn | u64 params |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        lines.append("| " + " | ".join(str(v) for v in row[:2]) + f" | sm_{row[2]} | " + " | ".join(str(v) for v in row[3:]) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    print(json.dumps(_run_all()))
