"""Build of ropekit's compiled operators (``ropekit._C``, the ``torch.ops.ropekit`` ops).

Install with torch already present and without build isolation, so the build sees that
torch (an isolated build would fetch another one)::

    pip install torch==2.13.0
    pip install --no-build-isolation -e .

The extension is optional: without torch at build time, or when the compiler fails (or is
missing), the pure-Python package installs and the ``cpu`` backend is not available
(``ropekit.backends.available()`` omits it; CPU calls run ``eager`` after one warning).

The SIMD kernel (``csrc/kernel.cpp``, no torch headers) is compiled once per
instruction-set level with that level's flags; ``csrc/ops.cpp`` (the operators) picks the
level at load time from the CPU's features, as ATen's CPU capability dispatch does, so a
build copied to another x86-64 machine never runs an instruction its CPU lacks.
"""

import os
import platform

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # no torch in the build environment: the pure-Python package
    BuildExtension = CppExtension = None

# -ffp-contract=off: no FMA contraction, so every level (and the eager formula) gives the same bits
KERNEL_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-Wno-psabi", "-Wno-maybe-uninitialized"]
X86 = platform.machine().lower() in ("x86_64", "amd64")
LEVELS = {"default": []}
if X86:
    LEVELS["avx2"] = ["-mavx2", "-mfma", "-mf16c"]
    LEVELS["avx512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]
    # avx512 plus VCVTNE(2)PS2BF16 for the float32 -> bfloat16 narrowing (same bits)
    LEVELS["avx512bf16"] = LEVELS["avx512"] + ["-mavx512bf16"]

if BuildExtension is not None:

    class build_ext(BuildExtension):
        """BuildExtension plus one object of ``csrc/kernel.cpp`` per level, linked into ``_C``."""

        def build_extension(self, ext):
            objects = []
            for level, flags in LEVELS.items():
                objects += self.compiler.compile(
                    [os.path.join("csrc", "kernel.cpp")],
                    output_dir=os.path.join(self.build_temp, "level-" + level),
                    macros=[("RK_LEVEL", level)],
                    include_dirs=["csrc"],
                    extra_postargs=KERNEL_FLAGS + flags,
                )
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    ext_modules = [
        CppExtension(
            "ropekit._C",
            [os.path.join("csrc", "ops.cpp")],
            include_dirs=["csrc"],
            # the per-level kernel objects are linked in: a change to them must relink _C
            depends=[os.path.join("csrc", "kernel.cpp"), os.path.join("csrc", "kernel.h")],
            # -fopenmp: at::parallel_for is inline in ATen's headers and, in torch's OpenMP build,
            # runs its pragma only when this file is compiled with OpenMP (else it runs serially).
            # The libgomp.so.1 this links resolves to the one torch has already loaded.
            extra_compile_args=["-O2", "-ffp-contract=off", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
    cmdclass = {"build_ext": build_ext.with_options(use_ninja=False)}
else:
    ext_modules, cmdclass = [], {}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
