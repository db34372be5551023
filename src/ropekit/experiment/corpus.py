"""The corpus every machine with Python has: the standard library's own ``.py`` files.

Files are found at run time with :mod:`sysconfig` (``site-packages`` and ``__pycache__``
excluded), sorted by path, and read as raw bytes (vocabulary 256). The last 5% of the
files (by that order) are held out. Absolute numbers therefore depend on the Python
version; orderings between position encodings and scaling schemes should not.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sysconfig
from typing import List, Optional

import torch

from .._errors import fail

__all__ = ["Corpus", "stdlib_files", "load_corpus", "unigram_bits_per_byte"]


def stdlib_files(root: Optional[str] = None) -> List[pathlib.Path]:
    """Sorted ``.py`` files of the standard library under ``root`` (default: ``sysconfig``'s
    ``stdlib`` path), excluding anything under ``site-packages`` or ``__pycache__``."""
    base = pathlib.Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise fail("the standard library directory", f"{base} (not a directory)", "pass root= an existing directory")
    out = [
        p
        for p in base.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts and "__pycache__" not in p.parts and p.is_file()
    ]
    return sorted(out, key=lambda p: p.as_posix())


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Byte streams of the train and held-out files.

    Attributes:
        train: uint8 ``[n_train]``, the first 95% of the files concatenated in path order.
        heldout: uint8 ``[n_heldout]``, the last 5% of the files.
        n_files: ``(train files, held-out files)``.
        root: where the files came from.
    """

    train: torch.Tensor
    heldout: torch.Tensor
    n_files: tuple
    root: str

    def describe(self) -> str:
        return (
            f"corpus: {self.n_files[0] + self.n_files[1]} stdlib .py files under {self.root}; "
            f"train {self.n_files[0]} files / {self.train.numel():,} bytes, "
            f"held out {self.n_files[1]} files / {self.heldout.numel():,} bytes"
        )


def _cat(files: List[pathlib.Path]) -> torch.Tensor:
    data = b"".join(p.read_bytes() for p in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def load_corpus(root: Optional[str] = None, heldout_fraction: float = 0.05) -> Corpus:
    """Read the stdlib corpus; the last ``heldout_fraction`` of the files are held out."""
    root = root if root is not None else sysconfig.get_paths()["stdlib"]
    files = stdlib_files(root)
    if len(files) < 2:
        raise fail("at least 2 .py files in the corpus root", f"{len(files)} under {root}", "point root= at a Python stdlib")
    n_held = max(1, int(math.ceil(len(files) * heldout_fraction)))
    train, held = files[:-n_held], files[-n_held:]
    return Corpus(_cat(train), _cat(held), (len(train), len(held)), str(root))


def unigram_bits_per_byte(train: torch.Tensor, heldout: torch.Tensor) -> float:
    """Cross-entropy (bits per byte) of ``heldout`` under the byte frequencies of ``train``
    with add-one smoothing: what a model that uses no context at all achieves.

    Example:
        >>> t = torch.tensor([0, 0, 1, 1], dtype=torch.uint8)
        >>> round(unigram_bits_per_byte(t, t), 3)  # p = 3/260 for both bytes: log2(260/3)
        6.437
    """
    counts = torch.bincount(train.long(), minlength=256).double() + 1.0  # [256]
    logp = torch.log2(counts / counts.sum())
    return float(-logp[heldout.long()].mean())
