"""``dense``: attend to every key; the reference every other method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmexec.hata.budget import Budget
from lmexec.hata.cache import LayerCache
from lmexec.hata.selection.base import SelectionMethod


@dataclass
class Dense(SelectionMethod):
    name = "dense"

    def scores(self, query: torch.Tensor, cache: LayerCache, layer: int) -> torch.Tensor:
        b, h_kv, n, _ = cache.keys.shape
        return torch.zeros(b, h_kv, n, device=query.device)

    def select(
        self,
        query: torch.Tensor,
        cache: LayerCache,
        layer: int,
        budget: Budget,
        scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Every position, whatever the budget."""
        b, h_kv, n, _ = cache.keys.shape
        return torch.arange(n, device=query.device).expand(b, h_kv, n)

    def selection_bytes_per_token(self, head_dim: int, element_bytes: int = 2) -> float | None:
        return None
