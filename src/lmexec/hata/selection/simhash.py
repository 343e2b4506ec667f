"""``simhash``: random-hyperplane LSH, i.e. HATA with an untrained Gaussian ``W`` (the baseline it must beat)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmexec.hata.codes import check_bits, random_projection
from lmexec.hata.selection.hashing import HashSelection


@dataclass
class SimHash(HashSelection):
    """``W ~ N(0, 1)`` per layer, seeded by ``seed + layer`` so runs repeat exactly."""

    name = "simhash"
    bits: int = 128
    seed: int = 0
    _cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_bits(self.bits)

    def projection(self, layer: int, kv_heads: int, head_dim: int) -> torch.Tensor:
        w = self._cache.get(layer)
        if w is None or w.shape[:2] != (kv_heads, head_dim):
            w = self._cache[layer] = random_projection(kv_heads, head_dim, self.bits, self.seed + layer)
        return w
