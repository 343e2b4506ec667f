"""``loki``: score keys in their top-r principal dimensions (Loki, NeurIPS 2024).

Per layer and KV head a basis ``P [d, d]`` (eigenvectors of the keys' second-moment matrix, largest
first) is fitted on calibration keys, or on the prefill keys when none are given. Keys are stored
already projected onto the first ``r`` directions; a decode query is projected the same way, and
``softmax(q_r . k_r / sqrt(d))`` is summed over the GQA group. Uncentered moments are used because
dot products, not differences, are approximated (the key mean carries much of q.k).
Usual setting ``r = d / 4`` (32 of 128 in the papers' runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lmexec.hata.cache import LayerCache
from lmexec.hata.selection.base import SelectionMethod, group_softmax_sum, padding_mask, reduced_rank


def fit_basis(keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Principal directions of keys ``[B, H_kv, T, d]`` -> ``[H_kv, d, d]`` (columns by decreasing variance);
    keys where ``valid [B, T]`` is False (padding) are left out."""
    keys = keys.float()
    count = keys.shape[0] * keys.shape[2]
    if valid is not None:
        keys = keys * valid[:, None, :, None]  # a zero key adds nothing to the moment
        count = max(1, int(valid.sum()))
    flat = keys.transpose(0, 1).reshape(keys.shape[1], -1, keys.shape[3])  # [H_kv, B*T, d]
    moment = flat.transpose(1, 2) @ flat / count
    _, vectors = torch.linalg.eigh(moment)  # ascending eigenvalues
    return vectors.flip(-1)


@dataclass
class Loki(SelectionMethod):
    name = "loki"
    rank: int | None = None
    """Principal dimensions kept (default ``head_dim // 4``)."""
    bases: dict[int, torch.Tensor] = field(default_factory=dict)
    """Calibrated ``{layer: P [H_kv, d, d]}``; layers without one are fitted on their prefill keys."""
    fitted: set[int] = field(default_factory=set, repr=False)
    """Layers whose basis was fitted here on prefill keys (refitted without padding once it is known)."""

    def _rank(self, head_dim: int) -> int:
        return reduced_rank(self.name, self.rank, head_dim)

    def check_model(self, n_kv_heads: int, head_dim: int) -> None:
        self._rank(head_dim)

    def _projection(self, layer: int, head_dim: int) -> torch.Tensor:
        return self.bases[layer][:, :, : self._rank(head_dim)]

    def prepare(self, cache: LayerCache, layer: int) -> None:
        if layer not in self.bases:
            self.bases[layer] = fit_basis(cache.keys)
            self.fitted.add(layer)
        self.on_append(cache, layer, 0)

    def on_padding(self, cache: LayerCache, layer: int) -> None:
        if layer in self.fitted:  # a calibrated basis never saw this batch's padding
            self.bases[layer] = fit_basis(cache.keys, padding_mask(cache))
        self.on_append(cache, layer, 0)

    def on_append(self, cache: LayerCache, layer: int, start: int) -> None:
        keys = cache.keys[:, :, start:]
        p = self._projection(layer, keys.shape[-1]).to(keys.device)
        reduced = torch.einsum("bhnd,hdr->bhnr", keys.float(), p).to(keys.dtype)
        cache.extra(self.name, p.shape[-1], keys.dtype).write(start, reduced)

    def scores(self, query: torch.Tensor, cache: LayerCache, layer: int) -> torch.Tensor:
        d = query.shape[-1]
        p = self._projection(layer, d).to(query.device)
        h_kv = p.shape[0]
        grouped = query.reshape(query.shape[0], h_kv, -1, d).float()
        q_reduced = torch.einsum("bhgd,hdr->bhgr", grouped, p)
        logits = q_reduced @ cache.extras[self.name].view().float().transpose(-1, -2) / math.sqrt(d)
        return group_softmax_sum(logits, padding_mask(cache))

    def selection_bytes_per_token(self, head_dim: int, element_bytes: int = 2) -> float | None:
        return float(self._rank(head_dim) * element_bytes)

    def describe(self) -> str:
        return f"loki r={self.rank}" if self.rank else "loki r=d/4"
