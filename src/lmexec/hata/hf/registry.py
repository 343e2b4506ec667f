"""Register an attention function with transformers' public interfaces, once per name.

The mask builder is transformers' own ``sdpa_mask``, so causality and padding behave as with ``sdpa``
(a new name without a mask function would get ``attention_mask=None``).
"""

from __future__ import annotations

from collections.abc import Callable

_registered: set[str] = set()


def register_attention(name: str, function: Callable) -> str:
    """Register ``function`` under ``name`` with ``AttentionInterface`` and ``AttentionMaskInterface``."""
    if name not in _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)
        _registered.add(name)
    return name
