"""Exact softmax attention for one decode step, dense or over gathered K/V rows (GQA-aware).

Query head ``h`` belongs to KV head ``h // G`` with ``G = H_q / H_kv`` (the transformers ``repeat_kv``
convention). Queries are viewed as ``[B, H_kv, G, d]`` so the heads of a group share the gathered rows
without copying K/V per query head. Arithmetic runs in fp32 and the result is cast back to the query
dtype, so fp16/bf16 caches lose nothing beyond their storage precision.
"""

from __future__ import annotations

import math

import torch


def group_queries(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, H_q, d]`` -> ``[B, H_kv, G, d]`` (a view)."""
    b, h_q, d = query.shape
    if h_q % kv_heads:
        raise ValueError(f"{h_q} query heads are not a multiple of {kv_heads} KV heads")
    return query.reshape(b, kv_heads, h_q // kv_heads, d)


def attention_logits(query: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Scaled scores ``q . k * scale`` in fp32: ``[B, H_q, d]`` x ``[B, H_kv, N, d]`` -> ``[B, H_kv, G, N]``."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    grouped = group_queries(query, keys.shape[1]).float()
    return torch.matmul(grouped, keys.float().transpose(-1, -2)) * scale


def attention_probs(query: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Dense softmax weights ``[B, H_kv, G, N]`` (fp32)."""
    return torch.softmax(attention_logits(query, keys, scale), dim=-1)


def grouped_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention of ``query [B, H_q, d]`` over all rows of ``keys/values [B, H_kv, N, d]`` -> ``[B, H_q, d]``."""
    probs = attention_probs(query, keys, scale)
    out = torch.matmul(probs, values.float())  # [B, H_kv, G, d]
    return out.reshape(query.shape[0], query.shape[1], values.shape[-1]).to(query.dtype)


def gather_rows(rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``[B, H_kv, N, d]`` at ``indices [B, H_kv, k]`` -> ``[B, H_kv, k, d]`` (reads only k rows)."""
    index = indices.long().unsqueeze(-1).expand(-1, -1, -1, rows.shape[-1])
    return torch.gather(rows, 2, index)


def sparse_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact attention restricted to the selected rows; one index list per KV head, shared by its group.

    Runs the fused gather-attention kernel of the tensors' device (:mod:`lmexec.hata.kernels`: reads
    only the selected rows, online softmax); the torch reference is ``grouped_attention`` over
    ``gather_rows``.
    """
    from lmexec.hata import kernels

    return kernels.gather_attention(query, keys, values, indices, scale)


def dense_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Attention over every cached row (the reference the sparse path is measured against)."""
    return grouped_attention(query, keys, values, scale)
