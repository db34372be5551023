"""The checked-in family table: what each transformers model type does with RoPE, as data.

``hf_families.json`` (written by ``ropekit hf-sweep --table``, never by hand) holds one row per
``model_type`` that :func:`ropekit.hf.rope_config_from_hf` reads: per rotary component
(attention, indexer) the pairing, the direction, the head slice the RoPE function gets and where
the rotating span sits in it, the config flag that picks between functions (DeepSeek-V3's
``rope_interleave``), the config class defaults the config rules need, the layer types with
their own rope parameters, which q/k norms ``patch(fuse_qk_norm=True)`` can defer, what the
family's code does with a scaled rope type (``scaling``: ``"applied"``, ``"ignored"``,
``"unverified"``, or per rope type checked ``{"linear": "applied" | "ignored" | "refused: why" |
"code", ...}``; measured on linear and dynamic NTK scaled configs), and the transformers versions
the row was verified against (the sweep checks each row's answer against the family's own code
on several configs, scaled ones included, before writing it).

The base has no fact of its own: a row is verified on its config class default base, the
families whose code ignores the rope parameters (``scaling`` ``"ignored"``) answer any other base
from their code (GPT-J and CodeGen hard-code 10000), and every other row reads the config's base
(``.ci/sweep-transformers`` checks every family with its base tripled).

Nothing here imports transformers. The installed version is read from the package's
``__init__.py`` (``importlib.util.find_spec``; ``importlib.metadata`` costs ~100 ms).

A row answers only for the versions it was verified against; with another installed version
the family is checked against its code the first time it is used (:func:`verdict`,
:func:`record`), and the verdict is cached on disk per transformers version (under
``$ROPEKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ropekit``, else ``~/.cache/ropekit``), so later
processes answer from the table again without importing transformers — a per-process cache
would pay the ~seconds of importing transformers in every fresh process.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["table", "row", "installed_version", "verdict", "record", "cache_path", "TABLE_PATH"]

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_families.json")
_VERSION = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.M)


@functools.lru_cache(maxsize=1)
def table() -> Dict[str, Any]:
    """The parsed table (``{"format", "digest", "rows": {model_type: [row, ...]}}``)."""
    try:
        with open(TABLE_PATH, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:  # a source tree before the first `hf-sweep --table`
        return {"format": 2, "rows": {}}


def row(model_type: str, version: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The table's row of ``model_type`` for transformers ``version``: the row verified
    against it, else the row of the newest version (``None``: the table does not know the
    type). A model type whose RoPE facts changed between versions has one row per set of facts."""
    rows = table()["rows"].get(model_type)
    if not rows:
        return None
    for r in rows:
        if version in r.get("verified", ()):
            return r
    return max(rows, key=lambda r: max((version_key(v) for v in r.get("verified", ())), default=()))


def version_key(v: str) -> Tuple[int, ...]:
    return tuple(int(x) if x.isdigit() else -1 for x in v.split("."))


def installed_version() -> Optional[str]:
    """The installed transformers version without importing it; ``None`` if not installed."""
    mod = sys.modules.get("transformers")
    if mod is not None and isinstance(getattr(mod, "__version__", None), str):
        return mod.__version__
    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        with open(spec.origin, encoding="utf-8") as f:
            m = _VERSION.search(f.read(65536))
    except OSError:
        return None
    return m.group(1) if m else "unknown"


def cache_path(version: str) -> str:
    root = os.environ.get("ROPEKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ropekit"
    )
    return os.path.join(root, f"hf-families-{table().get('digest', 'none')}-transformers-{version}.json")


_MEMO: Dict[str, Dict[str, str]] = {}


def _verdicts(version: str) -> Dict[str, str]:
    if version not in _MEMO:
        try:
            with open(cache_path(version), encoding="utf-8") as f:
                data = json.load(f)
            _MEMO[version] = {k: v for k, v in data.items() if v in ("same", "differs")}
        except (OSError, ValueError, AttributeError):
            _MEMO[version] = {}
    return _MEMO[version]


def verdict(model_type: str, r: Mapping[str, Any], version: Optional[str], key: Optional[str] = None) -> str:
    """How to answer ``model_type`` with row ``r``: ``"table"`` (the row holds for this
    version, or transformers is not installed), ``"code"`` (the family's code differs from the
    row, or the row says to read the code) or ``"check"`` (not verified for this version yet).

    ``key``: a kind of input the sweep never verified the row on, even for a verified version
    (``"llama+partial:default"``: a partial rotary factor other than the class default, see
    :func:`ropekit.hf.rope_config_from_hf`), or a fact a version the row was not verified against
    may change (``"llama+scaled"``: a scaled rope type; ``"llama+theta"``: a base other than the
    class default): answered from the cached verdict of that key only."""
    if r.get("code"):
        return "code"
    if version is None or (key is None and version in r.get("verified", ())):
        return "table"
    v = _verdicts(version).get(key or model_type)
    return {"same": "table", "differs": "code"}.get(v or "", "check")


def record(model_type: str, version: str, same: bool) -> None:
    """Cache the result of checking ``model_type``'s row (or a :func:`verdict` ``key``) against
    transformers ``version``'s code (on disk; an unwritable cache dir leaves the per-process memo)."""
    v = _verdicts(version)
    v[model_type] = "same" if same else "differs"
    path = cache_path(version)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(v, f, indent=0, sort_keys=True)
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    except OSError:
        pass
