"""Shared machinery of the hash-code methods (``simhash``, ``hata``): codes kept beside the cache.

Key codes are encoded once when keys enter the cache and stored in a preallocated int64 buffer; a
decode step encodes the query heads with their KV head's ``W`` and scores ``-sum_g Hamming``.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from lmexec.hata.cache import LayerCache
from lmexec.hata.codes import encode, encode_queries, hamming, n_words
from lmexec.hata.selection.base import SelectionMethod


class HashSelection(SelectionMethod):
    """Top-k by smallest group-summed Hamming distance between packed codes."""

    bits: int

    @abstractmethod
    def projection(self, layer: int, kv_heads: int, head_dim: int) -> torch.Tensor:
        """``W [H_kv, d, bits]`` of ``layer``."""

    def _codes(self, cache: LayerCache):
        return cache.extra(f"{self.name}_codes", n_words(self.bits), torch.int64)

    def on_append(self, cache: LayerCache, layer: int, start: int) -> None:
        keys = cache.keys[:, :, start:]
        w = self.projection(layer, keys.shape[1], keys.shape[3]).to(keys.device)
        self._codes(cache).write(start, encode(keys, w))

    def scores(self, query: torch.Tensor, cache: LayerCache, layer: int) -> torch.Tensor:
        key_codes = self._codes(cache).view()
        w = self.projection(layer, key_codes.shape[1], query.shape[-1]).to(query.device)
        return -hamming(encode_queries(query, w), key_codes).float()

    def selection_bytes_per_token(self, head_dim: int, element_bytes: int = 2) -> float | None:
        return self.bits / 8

    def describe(self) -> str:
        return f"{self.name} {self.bits}-bit"
