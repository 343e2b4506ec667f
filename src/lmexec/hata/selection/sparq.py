"""``sparq``: approximate scores from the query's largest-magnitude channels (SparQ Attention).

Per KV head, the ``r`` channels with the largest ``sum_g |q_g|`` over its group are read from every
key; ``q_r . k_r / sqrt(d * |q_r|_1 / |q|_1)`` (SparQ's temperature correction) goes through a softmax
per query head and is summed over the group. The mean-V reallocation of the original SparQ changes the
output, not the selection, so it is not part of a selection method. Usual setting ``r = d / 4``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmexec.hata.cache import LayerCache
from lmexec.hata.selection.base import SelectionMethod, group_softmax_sum, padding_mask, reduced_rank


@dataclass
class SparQ(SelectionMethod):
    name = "sparq"
    rank: int | None = None
    """Query channels read per key (default ``head_dim // 4``)."""

    def _rank(self, head_dim: int) -> int:
        return reduced_rank(self.name, self.rank, head_dim)

    def check_model(self, n_kv_heads: int, head_dim: int) -> None:
        self._rank(head_dim)

    def scores(self, query: torch.Tensor, cache: LayerCache, layer: int) -> torch.Tensor:
        keys = cache.keys
        b, h_kv, _, d = keys.shape
        r = self._rank(d)
        grouped = query.reshape(b, h_kv, -1, d).float()  # [B, H_kv, G, d]
        channels = grouped.abs().sum(dim=2).topk(r, dim=-1).indices  # [B, H_kv, r]
        q_r = torch.gather(grouped, 3, channels[:, :, None, :].expand(-1, -1, grouped.shape[2], -1))
        k_r = torch.gather(keys, 3, channels[:, :, None, :].expand(-1, -1, keys.shape[2], -1)).float()
        share = q_r.abs().sum(-1, keepdim=True) / grouped.abs().sum(-1, keepdim=True).clamp_min(1e-30)
        logits = (q_r @ k_r.transpose(-1, -2)) / torch.sqrt(d * share).clamp_min(1e-30)
        return group_softmax_sum(logits, padding_mask(cache))

    def selection_bytes_per_token(self, head_dim: int, element_bytes: int = 2) -> float | None:
        return float(self._rank(head_dim) * element_bytes)

    def describe(self) -> str:
        return f"sparq r={self.rank}" if self.rank else "sparq r=d/4"
