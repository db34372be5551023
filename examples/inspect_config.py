"""Load a Hugging Face config.json and inspect its rotary embedding.

Writes a config.json with the public Llama 3.1 8B RoPE settings (rope_theta 500000,
llama3 scaling factor 8 / low 1 / high 4 / original 8192, 131072 positions) to a
temporary folder, then:

1. builds a RopeConfig from it (``RopeConfig.from_hf`` takes a dict, a path or a
   transformers ``PretrainedConfig``);
2. asks :mod:`ropekit.analysis` which rotary pairs the scaling leaves unchanged,
   interpolates or blends, and how the decay bound changes;
3. prints the same table as the command ``ropekit inspect PATH``.

Run: python examples/inspect_config.py   (CPU, ~1 s; no network, no weights)
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import ropekit
from ropekit import analysis
from ropekit.cli import main as ropekit_cli

CONFIG = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}


def main() -> None:
    folder = Path(tempfile.mkdtemp()) / "my-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))

    cfg = ropekit.RopeConfig.from_hf(folder / "config.json")
    print(cfg, "\n")

    classes = analysis.classify_pairs(cfg)
    print("pairs per class:", dict(Counter(classes)))
    before, after = analysis.wavelengths(cfg)
    i = classes.index("interpolated")
    print(f"first interpolated pair {i}: wavelength {before[i]:,.0f} -> {after[i]:,.0f} tokens")

    plain = cfg.replace(scaling=None)
    for dist in (1000, 100_000):
        b_plain = float(analysis.decay_bound(plain, [dist])[0])
        b_scaled = float(analysis.decay_bound(cfg, [dist])[0])
        print(f"decay bound at distance {dist:>7,}: {b_plain:5.2f} unscaled, {b_scaled:5.2f} with llama3 scaling")
    print()

    rc = ropekit_cli(["inspect", str(folder)])  # the same as `ropekit inspect <folder>`
    assert rc == 0
    assert analysis.relative_position_error(cfg) < 1e-12


if __name__ == "__main__":
    main()
