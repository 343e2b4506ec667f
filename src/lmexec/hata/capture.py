"""Capture post-RoPE queries, keys and values of every layer during one prefill.

Uses the public ``AttentionInterface`` of transformers 5.x: an attention function registered under
``lmexec_capture`` records what it is given (q/k after RoPE, exactly what a decode-time selection sees)
and then delegates to the stock SDPA implementation, so the model's output is unchanged. Its mask
function is registered as ``sdpa_mask`` so causality and padding behave as with ``sdpa``. Nothing in
transformers is patched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from lmexec.hata.hf.registry import register_attention

ATTENTION_NAME = "lmexec_capture"
_recorder: _Recorder | None = None


@dataclass
class _Recorder:
    layers: set[int]
    query_positions: torch.Tensor | None
    keep_values: bool = True
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder, layer = _recorder, getattr(module, "layer_idx", None)
    if recorder is not None and layer in recorder.layers:
        if recorder.query_positions is not None:
            recorder.queries[layer] = query[:, :, recorder.query_positions].detach().clone()
        recorder.keys[layer] = key.detach().clone()
        if recorder.keep_values:
            recorder.values[layer] = value.detach().clone()
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@dataclass
class Capture:
    """Per layer: ``queries [B, H_q, P, d]`` at the requested positions, ``keys/values [B, H_kv, T, d]``."""

    queries: dict[int, torch.Tensor]
    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    query_positions: torch.Tensor | None


@torch.no_grad()
def capture(
    model: Any,
    input_ids: torch.Tensor,
    layers: Iterable[int],
    query_positions: torch.Tensor | None = None,
    keep_values: bool = True,
) -> Capture:
    """Run one prefill of ``input_ids [B, T]`` and return the captured q/k/v of ``layers``."""
    global _recorder
    register_attention(ATTENTION_NAME, _capture_attention)
    previous = model.config._attn_implementation
    recorder = _Recorder(set(layers), query_positions, keep_values)
    model.set_attn_implementation(ATTENTION_NAME)
    _recorder = recorder
    try:
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        _recorder = None
        model.set_attn_implementation(previous)
    return Capture(recorder.queries, recorder.keys, recorder.values, query_positions)
