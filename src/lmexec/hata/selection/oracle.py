"""``oracle``: exact top-k by attention weight (softmax of q.k/sqrt(d) summed over the GQA group).

The ceiling for every approximate method: it reads all of K to choose, so it saves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmexec.hata.attention import attention_logits
from lmexec.hata.cache import LayerCache
from lmexec.hata.selection.base import SelectionMethod, group_softmax_sum, padding_mask


@dataclass
class Oracle(SelectionMethod):
    name = "oracle"

    def scores(self, query: torch.Tensor, cache: LayerCache, layer: int) -> torch.Tensor:
        return group_softmax_sum(attention_logits(query, cache.keys), padding_mask(cache))

    def selection_bytes_per_token(self, head_dim: int, element_bytes: int = 2) -> float | None:
        return float(head_dim * element_bytes)
