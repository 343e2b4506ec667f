"""The ``hata`` attention function and mask function registered with transformers.

``hata_attention`` follows the ``AttentionInterface`` signature. Prefill (more than one query), the
first ``dense_layers`` layers, the ``dense`` method and any call whose keys are not a
:class:`~lmexec.hata.hf.cache.HataLayer` buffer go to the stock SDPA function unchanged. A decode step
of a sparse layer scores every cached key with the layer's selection method (one score per KV head,
summed over its GQA group), keeps the top-k *valid* keys and computes exact softmax attention over the
gathered rows.

Validity comes from the attention mask: the mask function is transformers' own ``sdpa_mask``, which
gives ``None`` when nothing is masked and a boolean ``[B, 1, 1, N]`` mask at a decode step of a padded
batch, so left padding is never selected. Budgets, sink and recent windows count *valid* tokens per
row, and ranking is a stable sort, so a padded row selects exactly what the same sequence alone would.
"""

from __future__ import annotations

import warnings

import torch

from lmexec.hata import kernels
from lmexec.hata.budget import Budget
from lmexec.hata.hf.cache import HataLayer, take_current
from lmexec.hata.hf.registry import register_attention
from lmexec.hata.selection.base import VALID_STATE
from lmexec.hata.selection.hashing import HashSelection

ATTENTION_NAME = "hata"
PADDING_SEEN_STATE = "padding_seen"
"""``LayerCache.state`` key: the key count when the method last rebuilt its features without padding."""
_warned = False


def valid_positions(attention_mask: torch.Tensor | None, batch: int, n: int) -> torch.Tensor | None:
    """Bool ``[B, N]`` of keys the current (last) query may attend to, or None when all may."""
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, -1, -n:]
    if last.dtype != torch.bool:  # additive float mask: 0 keeps, a large negative drops
        last = last > torch.finfo(last.dtype).min / 2
    valid = last.expand(batch, n)
    return None if bool(valid.all()) else valid


def select_valid(
    scores: torch.Tensor, budget: Budget, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top-k of ``scores [B, H_kv, N]`` among valid keys -> (indices ``[B, H_kv, K]`` in position order,
    keep ``[B, K]`` or None).

    Row ``b`` keeps ``budget.tokens(n_b)`` keys, ``n_b`` its valid count; its first ``sink`` and last
    ``recent`` valid keys are always kept (inside the budget). Ties go to the earlier key (stable sort),
    so the choice does not depend on how much padding precedes the row.
    """
    b, _, n = scores.shape
    ranked = scores.float()
    if valid is None:
        counts = [n] * b
        rank = torch.arange(n, device=scores.device).expand(b, n)
    else:
        rank = valid.long().cumsum(dim=-1) - 1  # index among the row's valid keys
        counts = valid.sum(dim=-1).tolist()
    total = torch.tensor(counts, device=scores.device)[:, None]
    forced = (rank < budget.sink) | (rank >= total - budget.recent)
    if valid is not None:
        forced &= valid
    ranked = ranked.masked_fill(forced[:, None, :], float("inf"))
    if valid is not None:
        ranked = ranked.masked_fill(~valid[:, None, :], float("-inf"))
    per_row = [budget.tokens(max(1, c)) for c in counts]
    k = max(per_row)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :k]
    keep = None
    if min(per_row) < k:
        keep = (
            torch.arange(k, device=scores.device)[None, :]
            < torch.tensor(per_row, device=scores.device)[:, None]
        )
        order = torch.where(keep[:, None, :], order, n)  # unused slots sort last, then are masked
    indices = order.sort(dim=-1).values  # position order: gathers read memory forward
    if keep is not None:
        keep = (indices < n)[:, 0, :]  # every head of a row keeps the same count
        indices = indices.clamp_max(n - 1)
    return indices, keep


def _is_our_buffer(layer: HataLayer, key: torch.Tensor) -> bool:
    storage = layer.storage
    return (
        storage is not None
        and key.data_ptr() == storage.key_buffer.data.data_ptr()
        and key.shape[2] == storage.length
    )


def _record_recall(
    layer: HataLayer, query: torch.Tensor, key: torch.Tensor, indices, keep, valid, scale
) -> None:
    from lmexec.hata.attention import attention_logits
    from lmexec.hata.metrics import topk_recall
    from lmexec.hata.selection import group_softmax_sum

    settings = layer.settings
    exact = group_softmax_sum(attention_logits(query, key, scale), valid)
    ref, ref_keep = select_valid(exact, settings.budget, valid)
    if keep is None and ref_keep is None:
        recall = topk_recall(indices, ref, key.shape[2]).mean()
    else:  # rows with different budgets: count per row
        values = []
        for b in range(key.shape[0]):
            sel = indices[b : b + 1] if keep is None else indices[b : b + 1][:, :, keep[b]]
            rb = ref[b : b + 1] if ref_keep is None else ref[b : b + 1][:, :, ref_keep[b]]
            values.append(topk_recall(sel, rb, key.shape[2]).mean())
        recall = torch.stack(values).mean()
    settings.stats["recall_sum"] += float(recall)
    settings.stats["recall_n"] += 1


def hata_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """``AttentionInterface`` function: dense SDPA for prefill, top-k sparse attention for decode."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer_idx = getattr(module, "layer_idx", None)
    layer = take_current(layer_idx) if layer_idx is not None else None
    if (
        query.shape[2] != 1
        or layer is None
        or not layer.settings.sparse(layer_idx)
        or not _is_our_buffer(layer, key)
    ):
        if layer is None and query.shape[2] == 1 and layer_idx is not None:
            _warn_no_cache()
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    settings = layer.settings
    storage = layer.storage
    assert storage is not None
    scale = module.scaling if scaling is None else scaling
    q = query[:, :, 0, :]  # [B, H_q, d]
    valid = valid_positions(attention_mask, key.shape[0], key.shape[2])
    if valid is None:
        storage.state.pop(VALID_STATE, None)
    else:
        storage.state[VALID_STATE] = valid
        seen = storage.state.get(PADDING_SEEN_STATE)
        if seen is None or valid.shape[1] - seen > 1:  # first decode step, or a new (padded) prompt
            settings.method.on_padding(storage, layer_idx)
            storage.state[PADDING_SEEN_STATE] = valid.shape[1]
    settings.stats["steps"] += 1
    if valid is None and isinstance(settings.method, HashSelection):
        # no padding: the fused score + top-k kernel, same choice as select_valid (ties to the earlier
        # key, sink/recent forced, position order) without a score tensor or a sort
        if not settings.record_recall:  # select + attend fused where the backend has it
            return settings.method.attend(q, storage, layer_idx, settings.budget, scale)[:, None], None
        indices, keep = settings.method.select(q, storage, layer_idx, settings.budget), None
    else:
        scores = settings.method.scores(q, storage, layer_idx)
        indices, keep = select_valid(scores, settings.budget, valid)
    out = kernels.gather_attention(q, key, value, indices, scale, keep, valid)
    if settings.record_recall:
        _record_recall(layer, q, key, indices, keep, valid, scale)
    return out[:, None, :, :], None  # [B, T_q=1, H_q, d]


def _warn_no_cache() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "attn_implementation 'hata' without a HataCache: decoding densely. Pass the cache from "
            "lmexec.hata.enable(...).cache() to generate(cache=...).",
            stacklevel=3,
        )


def register() -> str:
    """Register ``hata`` with ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent)."""
    return register_attention(ATTENTION_NAME, hata_attention)
