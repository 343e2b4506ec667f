"""``quest``: page-level selection from per-channel key minima and maxima (Quest, ICML 2024).

Keys are grouped into pages of ``page`` tokens (16 by default); each page stores the per-channel min and
max of its keys, kept up to date in place as keys are appended; padding keys (known at decode, see
``on_padding``) are left out of both and pages of padding alone out of the softmax. A page's score is the upper bound
``sum_j max(q_j min_j, q_j max_j)`` of q.k over the page; bounds go through a softmax (scaled by
1/sqrt(d)) per query head and are summed over the GQA group. Every token takes its page's score, so
the top-k fills whole pages in page order (the last page may be cut at the budget). Selection bytes:
``2 * d * element_bytes / page`` per token (16 B at d = 64, fp16, page 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmexec.errors import UserError
from lmexec.hata.cache import LayerCache
from lmexec.hata.selection.base import SelectionMethod, group_softmax_sum, padding_mask


def page_bounds(query: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor) -> torch.Tensor:
    """Upper bounds of q.k per page: ``[B, H_kv, G, d]`` vs ``[B, H_kv, P, d]`` -> ``[B, H_kv, G, P]``."""
    q = query.float().unsqueeze(3)  # [B, H_kv, G, 1, d]
    lo, hi = page_min.float().unsqueeze(2), page_max.float().unsqueeze(2)  # [B, H_kv, 1, P, d]
    return torch.maximum(q * lo, q * hi).sum(-1)


@dataclass
class Quest(SelectionMethod):
    name = "quest"
    page: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.page, bool) or not isinstance(self.page, int) or self.page < 1:
            raise UserError(f"quest page size must be a whole number >= 1, got {self.page!r}")

    def on_append(self, cache: LayerCache, layer: int, start: int) -> None:
        keys = cache.keys
        d = keys.shape[-1]
        lo_buf = cache.extra("quest_min", d, keys.dtype, rows_per_token=1 / self.page)
        hi_buf = cache.extra("quest_max", d, keys.dtype, rows_per_token=1 / self.page)
        first_page = start // self.page  # the last page may have been partial: recompute it
        first = first_page * self.page
        chunk = keys[:, :, first:]
        b, h, t, _ = chunk.shape
        n_pages = -(-t // self.page)
        real = self._real(cache, first, t)  # [B, pages * page]: a key counts unless it is padding
        lo = chunk.new_full((b, h, n_pages * self.page, d), math.inf)
        hi = chunk.new_full((b, h, n_pages * self.page, d), -math.inf)
        lo[:, :, :t] = chunk.masked_fill(~real[:, None, :t, None], math.inf)
        hi[:, :, :t] = chunk.masked_fill(~real[:, None, :t, None], -math.inf)
        lo = lo.reshape(b, h, n_pages, self.page, d).amin(dim=3)
        hi = hi.reshape(b, h, n_pages, self.page, d).amax(dim=3)
        empty = ~real.reshape(b, 1, n_pages, self.page, 1).any(dim=3)  # all padding: scored -inf anyway
        lo_buf.write(first_page, lo.masked_fill(empty, 0))
        hi_buf.write(first_page, hi.masked_fill(empty, 0))

    def on_padding(self, cache: LayerCache, layer: int) -> None:
        self.on_append(cache, layer, 0)  # every page again, its padding keys left out

    def _real(self, cache: LayerCache, first: int, t: int) -> torch.Tensor:
        """Whether each of keys ``first..first+t`` (padded to whole pages with False) is a real key."""
        n_pages = -(-t // self.page)
        real = torch.zeros(
            cache.keys.shape[0], n_pages * self.page, dtype=torch.bool, device=cache.keys.device
        )
        real[:, :t] = True
        valid = padding_mask(cache)
        if valid is not None:  # the mask may lag the keys by the token being appended: that one is real
            known = valid[:, first : first + t]
            real[:, : known.shape[1]] = known
        return real

    def scores(self, query: torch.Tensor, cache: LayerCache, layer: int) -> torch.Tensor:
        keys = cache.keys
        b, h_kv, n, d = keys.shape
        grouped = query.reshape(b, h_kv, -1, d)
        bounds = page_bounds(grouped, cache.extras["quest_min"].view(), cache.extras["quest_max"].view())
        real_pages = None
        if padding_mask(cache) is not None:  # pages of padding alone stay out of the softmax
            real_pages = self._real(cache, 0, n).reshape(b, -1, self.page).any(dim=2)
        page_scores = group_softmax_sum(bounds / math.sqrt(d), real_pages)  # [B, H_kv, P]
        page_of_token = torch.arange(n, device=keys.device) // self.page
        return page_scores[:, :, page_of_token]

    def selection_bytes_per_token(self, head_dim: int, element_bytes: int = 2) -> float | None:
        return 2 * head_dim * element_bytes / self.page

    def describe(self) -> str:
        return f"quest page={self.page}"
