"""The Triton kernel of ``ropekit::rotary_cache_`` compiled ahead of time for sm_80, sm_90 and
sm_100, without a GPU (the method of tests/test_triton_aot.py).

The op impl (:func:`ropekit.backends._triton_cache.rotary_cache_`) runs on meta tensors with
the launch replaced by a recorder (the CUDA branch of the host code: values checked in the
kernel); each recorded launch is handed to the JIT kernel's ``run(..., warmup=True)`` under a
stand-in driver naming the target, which compiles the specialisation a launch would pick.
Asserted from the PTX and the cubin: it compiles; no local memory (spills, stack); no
``fma.rn`` (launched with ``enable_fp_fusion=False``: the CPU op's rounding); 128-bit global
loads on the 16-byte-aligned rows; 64-bit address arithmetic; the device-side checks compiled in.
"""

from __future__ import annotations

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


class _TargetDriver:
    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 2000 + self.arch

    def get_current_stream(self, device=None):
        return 0


def _t(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _cases():
    """name -> args of the impl (decode and prefill shapes of common models)."""
    i64 = torch.int64
    out = {}
    # Llama-like decode, paged NHD, bf16, k and v: [t, h, d]
    out["decode bf16 half d128 nhd kv"] = (
        _t(8, 32, 128), _t(8, 8, 128), _t(4096, 64, dtype=torch.float32), _t(4096, 64, dtype=torch.float32),
        _t(8, dtype=i64), _t(64, 16, 8, 128), _t(8, dtype=i64), _t(8, 8, 128), _t(64, 16, 8, 128), None, "nhd", "half")
    # GPT-J-like partial rotary, interleaved, HND, fp16, rotated k returned too
    out["prefill fp16 interleaved d256 r64 hnd k_out"] = (
        _t(512, 16, 256, dtype=torch.float16), _t(512, 16, 256, dtype=torch.float16),
        _t(2048, 32, dtype=torch.float32), _t(2048, 32, dtype=torch.float32), _t(512, dtype=i64),
        _t(128, 16, 16, 256, dtype=torch.float16), _t(512, dtype=i64), None, None, _t(512, 16, 256, dtype=torch.float16),
        "hnd", "interleaved")
    return out


def _record(call_args):
    from ropekit.backends import _triton_cache as TC
    from ropekit.backends import _triton_cache_kernels as K

    launches = []

    class _Recorder:  # stands in for the JIT kernel: kernel[grid](*args, **kwargs) is recorded
        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((grid, a, kw))

    mp = pytest.MonkeyPatch()
    with mp.context() as m:
        m.setattr(K, "rope_cache_kernel", _Recorder())
        m.setattr(TC, "_device_side_checks", lambda t: True)
        m.setattr(TC, "_check_values_device", lambda sl: None)  # torch.sort has no meta-free answer here
        TC.rotary_cache_(*call_args)
    return launches


def _res_usage(cubin: bytes) -> dict:
    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def _run_all() -> dict:
    from ropekit.backends import _triton_cache_kernels as K

    jit = K.rope_cache_kernel
    assert type(jit).__name__ == "JITFunction"
    results = {}
    for case, args in _cases().items():
        try:
            rows = []
            for grid, a, kw in _record(args):
                for arch in ARCHS:
                    old = driver._active
                    driver.set_active(_TargetDriver(arch))
                    try:
                        ck = jit.run(*a, grid=grid, warmup=True, **kw)
                    finally:
                        driver._active = old
                    ptx = ck.asm["ptx"]
                    body = ptx[ptx.index("{"):]
                    rows.append({
                        "arch": arch, "fusion": kw.get("enable_fp_fusion"), "check": bool(kw.get("CHECK")),
                        "res": _res_usage(ck.asm["cubin"]),
                        "ld128": len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", body)),
                        "st128": len(re.findall(r"st\.global(?:\.\w+)*\.v4\.b32", body)),
                        "fma": len(re.findall(r"\bfma\.rn", body)),
                        "mul64": len(re.findall(r"\b(?:mul|mad)\.(?:lo|wide)\.[su](?:64|32)\b", body)),
                        "local": ".local" in body,
                        "assert": "__assertfail" in ptx,
                    })
            results[case] = {"rows": rows}
        except Exception as e:  # reported per case by the test
            results[case] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
    return results


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(_cases()))
def test_rotary_cache_kernel_compiles_clean(case, compiled):
    res = compiled[case]
    assert "error" not in res, res.get("error")
    assert len(res["rows"]) == len(ARCHS), "one launch per call"
    for r in res["rows"]:
        arch, u = r["arch"], r["res"]
        assert r["fusion"] is False
        assert not r["local"] and u.get("LOCAL", 0) == 0 and u.get("STACK", 0) == 0, f"{case} sm_{arch}: spills"
        assert r["fma"] == 0, f"{case} sm_{arch}: {r['fma']} fma.rn in the rotation"
        assert r["ld128"] > 0 and r["st128"] > 0, f"{case} sm_{arch}: no 128-bit global loads/stores"
        assert r["mul64"] > 0, f"{case} sm_{arch}: no 64-bit address arithmetic"
        assert r["check"] and r["assert"], f"{case} sm_{arch}: the device-side checks are not compiled in"


if __name__ == "__main__":
    print(json.dumps(_run_all()))
