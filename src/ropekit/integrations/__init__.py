"""Integrations with other libraries.

Nothing here is imported by ``import ropekit``; each submodule imports its library lazily:

- :mod:`ropekit.integrations.transformers` — a drop-in ``apply_rotary_pos_emb`` and
  ``patch(model)`` / ``unpatch(model)`` that route Hugging Face transformers models through
  ropekit's exact tables and fused apply.
"""

__all__ = ["transformers"]
