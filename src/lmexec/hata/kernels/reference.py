"""Reference (plain torch) implementations of the HATA kernels: the definition the fast paths must equal.

* :func:`encode` packed ``sign(x @ W[kv_head])`` codes (``codes.encode``);
* :func:`hamming_scores` group-summed Hamming distance (``codes.hamming``);
* :func:`hamming_topk` the ``k`` keys of smallest distance per (batch, KV head): sink/recent forced in,
  padding (``valid`` False) taken last, ties to the earlier key, indices returned in position order;
* :func:`gather_attention` exact softmax attention over the selected rows, GQA-aware, fp32 math.
"""

from __future__ import annotations

import math

import torch

from lmexec.hata import codes


def encode(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return codes.pack_bits(codes.sign_bits(x, w))


def hamming_scores(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    return codes.hamming(query_codes, key_codes)


def rank_keys(
    distance: torch.Tensor, sink: int, recent: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Selection rank of every key (smaller = taken first): forced keys 0, others ``1 + distance``,
    padding after everything else. ``distance [B, H_kv, N]`` -> int64 ``[B, H_kv, N]``."""
    n = distance.shape[-1]
    positions = torch.arange(n, device=distance.device)
    forced = (positions < sink) | (positions >= n - recent)
    rank = torch.where(forced, torch.zeros_like(distance), distance.long() + 1)
    if valid is not None:
        rank = torch.where(valid[:, None, :], rank, torch.iinfo(torch.int64).max)
    return rank


def hamming_topk(
    query_codes: torch.Tensor,
    key_codes: torch.Tensor,
    k: int,
    sink: int = 0,
    recent: int = 1,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices ``[B, H_kv, k]`` (int64, ascending positions) of the keys to attend to."""
    rank = rank_keys(hamming_scores(query_codes, key_codes), sink, recent, valid)
    k = min(k, rank.shape[-1])
    chosen = torch.sort(rank, dim=-1, stable=True).indices[..., :k]
    return chosen.sort(dim=-1).values


def gather_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
    keep: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of ``query [B, H_q, d]`` over rows ``indices [B, H_kv, K]`` of ``keys/values
    [B, H_kv, N, d]`` -> ``[B, H_q, d]`` in the query dtype. ``keep [B, K]`` drops index slots,
    ``valid [B, N]`` drops keys (padding)."""
    b, h_q, d = query.shape
    h_kv = keys.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    grouped = query.reshape(b, h_kv, h_q // h_kv, d).float()
    index = indices.long()
    k_rows = torch.gather(keys, 2, index.unsqueeze(-1).expand(-1, -1, -1, d)).float()
    v_rows = torch.gather(values, 2, index.unsqueeze(-1).expand(-1, -1, -1, values.shape[-1])).float()
    logits = torch.matmul(grouped, k_rows.transpose(-1, -2)) * scale  # [B, H_kv, G, K]
    drop = None
    if keep is not None:
        drop = ~keep[:, None, None, :]
    if valid is not None:
        bad = ~torch.gather(valid[:, None, :].expand(-1, h_kv, -1), 2, index)[:, :, None, :]
        drop = bad if drop is None else drop | bad
    if drop is not None:
        logits = logits.masked_fill(drop, float("-inf"))
    out = torch.matmul(torch.softmax(logits, dim=-1), v_rows)
    return out.reshape(b, h_q, values.shape[-1]).to(query.dtype)
