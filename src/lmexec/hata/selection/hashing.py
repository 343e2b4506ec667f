"""Shared machinery of the hash-code methods (``simhash``, ``hata``): codes kept beside the cache.

Key codes are encoded once when keys enter the cache and stored in a preallocated int64 buffer (on
CPU also in the numba kernel's transposed block layout, which it scans about 3x faster); a decode step
encodes the query heads with their KV head's ``W`` and scores ``-sum_g Hamming``.
Encoding, scoring and the fused score + top-k go through :mod:`lmexec.hata.kernels` (numba on CPU,
Triton on CUDA, torch reference otherwise).
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from lmexec.hata import kernels
from lmexec.hata.budget import Budget
from lmexec.hata.cache import GrowableBuffer, LayerCache
from lmexec.hata.codes import code_bytes, n_words
from lmexec.hata.selection.base import SelectionMethod, padding_mask


class HashSelection(SelectionMethod):
    """Top-k by smallest group-summed Hamming distance between packed codes."""

    bits: int

    @abstractmethod
    def projection(self, layer: int, kv_heads: int, head_dim: int) -> torch.Tensor:
        """``W [H_kv, d, bits]`` of ``layer``."""

    def projection_on(self, layer: int, kv_heads: int, head_dim: int, device: torch.device) -> torch.Tensor:
        """:meth:`projection` on ``device``, copied there once and kept: a decode step on a GPU must not
        copy W from host memory (a transfer and a synchronisation) every layer."""
        copies: dict[tuple, tuple[torch.Tensor, int, torch.Tensor]] = self.__dict__.setdefault("_copies", {})
        key = (layer, kv_heads, head_dim, torch.device(device))
        source = self.projection(layer, kv_heads, head_dim)
        entry = copies.get(key)
        if entry is None or entry[0] is not source or entry[1] != source._version:  # W edited in place
            entry = copies[key] = (source, source._version, source.to(device))
        return entry[2]

    def _codes(self, cache: LayerCache):
        return cache.extra(f"{self.name}_codes", n_words(self.bits), torch.int64)

    @property
    def _blocks_name(self) -> str:
        return f"{self.name}_code_blocks"

    def _code_blocks(self, cache: LayerCache) -> GrowableBuffer:
        """The same codes, transposed in blocks of ``CODE_BLOCK_KEYS`` keys (one buffer row per block;
        whole int64 words, so 32-bit codes take 8 bytes per key too)."""
        width = kernels.code_block_bytes(n_words(self.bits))
        return cache.extra(self._blocks_name, width, torch.uint8, rows_per_token=1 / kernels.CODE_BLOCK_KEYS)

    def on_append(self, cache: LayerCache, layer: int, start: int) -> None:
        keys = cache.key_buffer
        rows = self._codes(cache)
        length = rows.make_room(start, keys.length)
        blocks = self._code_blocks(cache) if kernels.code_blocks_wanted(rows.data) else None
        n_blocks = -(-length // kernels.CODE_BLOCK_KEYS)
        if blocks is not None:
            blocks.reserve(n_blocks)
        w = self.projection_on(layer, keys.data.shape[1], keys.data.shape[3], keys.data.device)
        kernels.append_codes(keys, start, w, rows, blocks)  # codes of keys start..keys.length
        rows.length = length
        if blocks is not None:
            blocks.length = n_blocks

    def query_codes(self, query: torch.Tensor, layer: int, kv_heads: int) -> torch.Tensor:
        """Codes of decode queries ``[B, H_q, d]`` -> ``[B, H_kv, G, words]`` (head h uses KV head h // G)."""
        b, h_q, d = query.shape
        w = self.projection_on(layer, kv_heads, d, query.device)
        return kernels.encode(query.reshape(b, kv_heads, h_q // kv_heads, d), w)

    def scores(self, query: torch.Tensor, cache: LayerCache, layer: int) -> torch.Tensor:
        key_codes = self._codes(cache).view()
        return -kernels.hamming_scores(self.query_codes(query, layer, key_codes.shape[1]), key_codes).float()

    def select(
        self,
        query: torch.Tensor,
        cache: LayerCache,
        layer: int,
        budget: Budget,
        scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fused score + top-k (no score tensor, no sort) unless ``scores`` are given; ties go to the
        earlier key and indices come in position order."""
        if scores is not None:
            return super().select(query, cache, layer, budget, scores)
        codes, valid, blocks = self._key_inputs(cache)
        key_codes = codes.view()
        query_codes = self.query_codes(query, layer, key_codes.shape[1])
        n = key_codes.shape[2]
        return kernels.hamming_topk(
            query_codes, key_codes, budget.tokens(n), budget.sink, budget.recent, valid,
            key_blocks=blocks.view() if blocks is not None else None,
        )  # fmt: skip

    def attend(
        self, query: torch.Tensor, cache: LayerCache, layer: int, budget: Budget, scale: float | None = None
    ) -> torch.Tensor:
        """Encode + select + attend in one fused kernel where there is one (CPU). The cache's buffers go
        to the kernel as they are (not views), so the CPU kernel reuses its handle on them every step."""
        codes, valid, blocks = self._key_inputs(cache)
        w = self.projection_on(layer, codes.data.shape[1], query.shape[2], query.device)
        return kernels.hamming_topk_attention(
            query, w, codes, cache.key_buffer, cache.value_buffer, budget.tokens(codes.length), budget.sink,
            budget.recent, valid, scale, key_blocks=blocks,
        )  # fmt: skip

    def _key_inputs(
        self, cache: LayerCache
    ) -> tuple[GrowableBuffer, torch.Tensor | None, GrowableBuffer | None]:
        """The key code buffer, the validity mask (padding) and the code block buffer (None where absent)."""
        return (
            self._codes(cache),
            padding_mask(cache),
            cache.extras.get(self._blocks_name),  # absent where blocks are not kept
        )

    def selection_bytes_per_token(self, head_dim: int, element_bytes: int = 2) -> float | None:
        return code_bytes(self.bits)

    def describe(self) -> str:
        return f"{self.name} {self.bits}-bit"
