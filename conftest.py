"""Repo-wide pytest setup (also applies to the doctests under src/)."""

import os

# The Triton kernel runs on CPU tensors under the interpreter; this must be set before
# triton kernels are defined (module import), so it lives in the root conftest.
# ROPEKIT_TEST_DEVICE=cuda|cpu picks the device of tests/test_triton.py explicitly (default:
# cuda when available); cpu forces the interpreter even on a machine with a GPU.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
_test_device = os.environ.get("ROPEKIT_TEST_DEVICE", "")
if _test_device == "cpu" or (not _has_cuda and _test_device != "cuda"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The cpu backend normally runs eager while its kernel compiles in the background (first use
# with an empty cache); tests must see one path or the other deterministically, so they wait
# for the build (test_first_call_does_not_wait_for_the_compile switches this off itself).
