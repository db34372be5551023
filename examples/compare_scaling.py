"""Compare RoPE settings in figures: base 1e4 vs 5e5, and Qwen2.5-7B with and without YaRN.

Equivalent to
    ropekit plot decay llama-2-7b llama-3.1-8b:unscaled llama-3.1-8b --out decay.png
    ropekit plot wavelengths qwen2.5-7b qwen2.5-7b-yarn --out wavelengths.png

Run: python examples/compare_scaling.py [OUT_DIR]   (needs matplotlib; ~5 s)

The two PNGs go into OUT_DIR, created if needed; default ``ropekit-figures`` in the current
folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = "ropekit-figures"

from ropekit import RopeConfig
from ropekit.analysis import Model, decay_bound
from ropekit.analysis.plots import plot_decay, plot_wavelengths
from ropekit.cli import load_models


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # models by preset name (ropekit list), or built by hand
    base_1e4 = Model("base 1e4, 4k", RopeConfig(head_dim=128, base=1e4), context=4096)
    llama = load_models("llama-3.1-8b")[0]
    llama_plain = load_models("llama-3.1-8b:unscaled")[0]
    for m in (base_1e4, llama_plain, llama):
        print(f"{m.label:<24} decay bound at 32k: {float(decay_bound(m.config, [32768])[0]):.2f}")
    print("wrote", plot_decay([base_1e4, llama_plain, llama], str(out / "decay.png")))
    qwen = load_models("qwen2.5-7b") + load_models("qwen2.5-7b-yarn")
    print("wrote", plot_wavelengths(qwen, str(out / "wavelengths.png")))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Draw decay.png and wavelengths.png comparing RoPE settings.")
    parser.add_argument(
        "out", nargs="?", default=DEFAULT_OUT, metavar="OUT_DIR",
        help=f"folder for the PNGs, created if needed (default: ./{DEFAULT_OUT})",
    )
    main(Path(parser.parse_args().out))
