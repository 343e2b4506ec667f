"""The one interface every selection method implements (one small class per method, like kvpress presses).

Call shape, per layer and decode step::

    method.prepare(cache, layer)              # after prefill: fit per-layer parameters, build key features
    start = cache.append(k, v)
    method.on_append(cache, layer, start)     # features of the new keys only, written in place
    scores = method.scores(query, cache, layer)        # [B, H_kv, N], higher = keep
    indices = method.select(query, cache, layer, budget)   # [B, H_kv, k], one list per KV head
    out = method.attend(query, cache, layer, budget)       # [B, H_q, d]: select + sparse attention

Scores are per KV head (summed over the query heads of its GQA group) so the group shares one index
list. ``selection_bytes_per_token`` is what scoring reads per cached token and KV head, so methods can
be compared at equal selection traffic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from lmexec.errors import UserError
from lmexec.hata.budget import Budget
from lmexec.hata.cache import LayerCache


def top_k_indices(scores: torch.Tensor, budget: Budget, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``[B, H_kv, k]`` of the best scores; sink/recent forced in, counted inside ``k``.

    ``valid`` (bool ``[B, N]``, optional) marks real tokens; invalid ones (padding) are never chosen
    while enough valid tokens remain.
    """
    n = scores.shape[-1]
    k = budget.tokens(n)
    ranked = scores.float().masked_fill(budget.forced_mask(n, scores.device), float("inf"))
    if valid is not None:
        ranked = ranked.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.topk(ranked, k, dim=-1, sorted=False).indices


def reduced_rank(method: str, rank: int | None, head_dim: int) -> int:
    """Channels a low-rank score reads per key: ``rank``, or ``head_dim // 4`` by default, in 1..head_dim."""
    chosen = max(1, head_dim // 4) if rank is None else rank  # 0 is a mistake, not the default
    if not 1 <= chosen <= head_dim:
        raise UserError(f"{method} rank must be between 1 and head_dim={head_dim}, got {chosen}")
    return chosen


VALID_STATE = "valid"
"""``LayerCache.state`` key of an optional bool ``[B, N]`` mask of real (non-padding) keys, set by callers
that decode padded batches (the transformers integration); softmax-based scores then ignore padding."""


def padding_mask(cache: LayerCache) -> torch.Tensor | None:
    """The cache's padding mask (see :data:`VALID_STATE`), if it has one."""
    valid = cache.state.get(VALID_STATE)
    return valid if isinstance(valid, torch.Tensor) else None


def group_softmax_sum(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, H_kv, G, N]`` logits -> ``[B, H_kv, N]``: softmax per query head, summed over the group.

    ``valid`` (bool ``[B, N]``, optional) leaves padding out of the softmax normalisation.
    """
    logits = logits.float()
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=2)


class SelectionMethod(ABC):
    """Base class: subclasses set ``name`` and implement :meth:`scores` and :meth:`selection_bytes_per_token`."""

    name: ClassVar[str]

    def prepare(self, cache: LayerCache, layer: int) -> None:
        """Called once after prefill; the default builds features for every cached key."""
        self.on_append(cache, layer, 0)

    def on_append(self, cache: LayerCache, layer: int, start: int) -> None:  # noqa: B027 - optional hook
        """Called after keys ``start:`` were appended; methods with key features extend them here."""

    def on_padding(self, cache: LayerCache, layer: int) -> None:  # noqa: B027 - optional hook
        """Called once the cache's padding mask (``cache.state[VALID_STATE]``) is known or has grown by
        more than the decoded token: decode knows the padding, prefill (which called :meth:`prepare`) did
        not. Methods whose features summarise several keys (pages, a fitted basis) rebuild them here
        without the padding keys, whose values (any pad token's) must not move the selection."""

    @abstractmethod
    def scores(self, query: torch.Tensor, cache: LayerCache, layer: int) -> torch.Tensor:
        """Selection scores ``[B, H_kv, N]`` for decode queries ``[B, H_q, d]``; higher = keep."""

    def select(
        self,
        query: torch.Tensor,
        cache: LayerCache,
        layer: int,
        budget: Budget,
        scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Indices ``[B, H_kv, k]`` to attend to (pass ``scores`` to reuse them across budgets); padding
        (``cache.state[VALID_STATE]``) is not chosen while enough real keys remain."""
        scores = self.scores(query, cache, layer) if scores is None else scores
        return top_k_indices(scores, budget, padding_mask(cache))

    def attend(
        self, query: torch.Tensor, cache: LayerCache, layer: int, budget: Budget, scale: float | None = None
    ) -> torch.Tensor:
        """Decode attention ``[B, H_q, d]`` over the rows :meth:`select` picks (what a model's decode step
        needs); padding (``cache.state[VALID_STATE]``) is never attended, even where a budget larger than
        the real tokens selects it. Methods with a fused select + attend kernel override it with the
        same result."""
        from lmexec.hata import kernels

        indices = self.select(query, cache, layer, budget)
        return kernels.gather_attention(
            query, cache.keys, cache.values, indices, scale, valid=padding_mask(cache)
        )

    def check_model(self, n_kv_heads: int, head_dim: int) -> None:  # noqa: B027 - optional hook
        """Refuse (UserError) a model this instance cannot serve; ``enable`` calls it before any decode."""

    @abstractmethod
    def selection_bytes_per_token(self, head_dim: int, element_bytes: int = 2) -> float | None:
        """Bytes read per cached token and KV head to score it (None: no selection step)."""

    def describe(self) -> str:
        """Short label with the settings, for tables."""
        return self.name
