"""Build and load the CPU kernel: ``_cpu_kernel.cpp`` compiled by the system C++ compiler
at first use, cached on disk, loaded with :mod:`ctypes`.

Why plain C++ + ctypes (see ``KERNELS.md``): it needs no torch headers, so a cold build
takes about a second of CPU (most of it in <immintrin.h> and -O2) and a cached load ~15 ms, against seconds for numba or
``torch.utils.cpp_extension`` and a recompile per shape for ``torch.compile``.

Cache: ``$ROPEKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ropekit``, else ``~/.cache/ropekit``.
The file name hashes the kernel source, the compiler (path, size, mtime), the flags and
the CPU identity (``-march=native`` code is never reused on another CPU). Builds go to a
temporary file in the cache directory that is renamed into place, so concurrent
processes never load a half-written library.

Compiler: ``$ROPEKIT_CXX``, else ``$CXX``, else the first of ``c++``, ``g++``, ``clang++``
on ``PATH``. When none works, :func:`load` returns ``None`` and warns once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

__all__ = ["load", "cache_dir", "find_compiler", "library_path", "reset"]

_SRC = Path(__file__).with_name("_cpu_kernel.cpp")
_ABI = 7  # rk_abi() of _cpu_kernel.cpp: the packed argument format
# -ffp-contract=off: no FMA contraction, so results do not depend on the CPU's FMA support
_BASE_FLAGS = ["-O2", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-math-errno"]
_ARCH_FLAGS = (["-march=native"], ["-mcpu=native"], [])

_lock = threading.Lock()
_start_lock = threading.Lock()  # starts the background build (load(wait=False))
_state: dict = {}  # "lib": CDLL | None once tried; "warned": bool


def cache_dir() -> Path:
    """Directory of built kernels (created on demand)."""
    env = os.environ.get("ROPEKIT_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ropekit"


def find_compiler() -> Optional[str]:
    """Path of the C++ compiler to use, or ``None``."""
    for env in ("ROPEKIT_CXX", "CXX"):
        v = os.environ.get(env)
        if v:
            return shutil.which(v)  # None when missing: an explicit choice is not overridden
    for name in ("c++", "g++", "clang++"):
        p = shutil.which(name)
        if p:
            return p
    return None


def _cpu_identity() -> str:
    """CPU model and feature flags (what ``-march=native`` depends on)."""
    ident = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            keep = ("vendor_id", "model name", "cpu family", "model\t", "flags", "Features", "CPU implementer", "CPU part")
            seen = set()
            for line in f:
                key = line.split(":", 1)[0]
                if line.startswith(keep) and key not in seen:
                    seen.add(key)
                    ident.append(line.strip())
                if not line.strip() and seen:
                    break  # first processor block is enough
    except OSError:
        pass
    return "\n".join(ident)


def _key(compiler: str, flags: List[str]) -> str:
    st = os.stat(compiler)
    h = hashlib.sha256()
    for part in (_SRC.read_bytes(), compiler.encode(), f"{st.st_size}:{st.st_mtime_ns}".encode(), " ".join(flags).encode(), _cpu_identity().encode(), str(_ABI).encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:24]


def library_path(compiler: str, flags: List[str]) -> Path:
    """Cache path of the library built by ``compiler`` with ``flags`` on this CPU."""
    return cache_dir() / f"ropekit_cpu_{_key(compiler, flags)}.so"


def _compile(compiler: str, flags: List[str], dest: Path) -> Tuple[bool, str]:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
        os.close(fd)
    except OSError as e:  # unwritable cache directory: eager fallback with the reason
        return False, f"cache directory {dest.parent}: {e} (set ROPEKIT_CACHE_DIR)"
    try:
        proc = subprocess.run(
            [compiler, *flags, str(_SRC), "-o", tmp], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            return False, proc.stderr[-2000:]
        os.replace(tmp, dest)  # atomic: readers see the old file, no file, or the whole new one
        return True, ""
    except (OSError, subprocess.SubprocessError) as e:
        return False, str(e)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path):
    lib = ctypes.CDLL(str(path))
    if lib.rk_abi() != _ABI:
        raise OSError(f"{path}: ABI {lib.rk_abi()} != {_ABI}")
    lib.rk_rotate.argtypes = [ctypes.c_char_p]
    lib.rk_rotate.restype = ctypes.c_int
    lib.rk_run.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lib.rk_run.restype = ctypes.c_int
    lib.rk_use_openmp.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.rk_use_openmp.restype = ctypes.c_int
    lib.rk_advise_huge.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.rk_advise_huge.restype = ctypes.c_int
    return lib


def _build() -> Tuple[Optional[ctypes.CDLL], str]:
    compiler = find_compiler()
    if compiler is None:
        return None, "no C++ compiler found (set ROPEKIT_CXX or CXX, or install g++)"
    errors = []
    for arch in _ARCH_FLAGS:
        flags = _BASE_FLAGS + arch
        path = library_path(compiler, flags)
        if not path.exists():
            ok, err = _compile(compiler, flags, path)
            if not ok:
                errors.append(f"{compiler} {' '.join(flags)}: {err.strip()}")
                continue
        try:
            return _open(path), ""
        except OSError as e:
            errors.append(str(e))
    return None, "; ".join(errors)[-2000:]


def _cached() -> bool:
    """Whether the library for this compiler and CPU is already in the cache (a ~15 ms load)."""
    compiler = find_compiler()
    return compiler is None or library_path(compiler, _BASE_FLAGS + _ARCH_FLAGS[0]).exists()


def load(wait: bool = True) -> Optional[ctypes.CDLL]:
    """The kernel library, built on first use; ``None`` (with one warning) if it cannot be built.

    ``wait=False``: when it still has to be compiled (~1-2 s), start that in a background
    thread and return ``None`` at once — the caller runs the eager path meanwhile and gets the
    library from a later call. A cached library, or no compiler at all, is answered at once.
    """
    try:
        return _state["lib"]
    except KeyError:
        pass
    if not wait and not _cached():
        with _start_lock:  # not _lock: the build holds that for its whole compile
            t = _state.get("thread")
            if "lib" not in _state and (t is None or not t.is_alive()):
                t = threading.Thread(target=load, name="ropekit-cpu-build", daemon=True)
                _state["thread"] = t
                t.start()
        return _state.get("lib")
    with _lock:
        if "lib" not in _state:
            lib, why = _build()
            _state["lib"] = lib
            if lib is None and not _state.get("warned"):
                _state["warned"] = True
                warnings.warn(
                    f"ropekit: the fast CPU kernel could not be built ({why}); "
                    'backend "cpu" falls back to the eager torch path (correct, slower).',
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _state["lib"]


def reset() -> None:
    """Forget the loaded library and the warning (tests; a new compiler or cache dir)."""
    t = _state.get("thread")
    if t is not None and t is not threading.current_thread():
        t.join()  # a background build finishes first (it takes _lock itself)
    with _lock:
        _state.clear()
