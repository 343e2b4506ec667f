"""``hata``: learned projections ``W_l [H_kv, d, bits]`` (trained by ``lmexec hata train``, issue 5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmexec.errors import UserError
from lmexec.hata.codes import check_bits, check_projection
from lmexec.hata.selection.hashing import HashSelection
from lmexec.hata.weights import load_hash_weights


@dataclass
class Hata(HashSelection):
    """Hash selection with given per-layer projections (``{layer: W}``, or one ``W`` for every layer)."""

    name = "hata"
    weights: dict[int, torch.Tensor] | torch.Tensor | None = None
    bits: int = 0
    _checked: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    """Validated fp32 projections by (layer, kv_heads, head_dim): a decode step must not re-check W."""

    def __post_init__(self) -> None:
        if self.weights is None:
            raise UserError(
                "the 'hata' method needs learned hash weights (weights=, on the command line "
                "--hata-weights FILE); they come from `lmexec hata train`"
            )
        if isinstance(self.weights, dict) and not self.weights:
            raise UserError("hash weights hold no layers: give {layer: W [n_kv_heads, head_dim, bits]}")
        values = list(self.weights.values()) if isinstance(self.weights, dict) else [self.weights]
        if not all(isinstance(w, torch.Tensor) for w in values):
            kinds = sorted({type(w).__name__ for w in values if not isinstance(w, torch.Tensor)})
            raise UserError(f"hash weights must be torch tensors, got {', '.join(kinds)}")
        first = values[0]
        if first.dim() != 3:
            raise UserError(
                f"hash projection must be [n_kv_heads, head_dim, bits], got shape {list(first.shape)}"
            )
        bits = check_bits(int(first.shape[2]))
        if self.bits and self.bits != bits:
            raise UserError(
                f"hash weights have {bits} bits but {self.bits} were requested (bits=, or --bits)"
            )
        self.bits = bits

    @classmethod
    def from_file(
        cls, path: str | Path, n_layers: int, n_kv_heads: int, head_dim: int, bits: int | None = None
    ) -> Hata:
        return cls(load_hash_weights(path, n_layers, n_kv_heads, head_dim, bits))

    def projection(self, layer: int, kv_heads: int, head_dim: int) -> torch.Tensor:
        checked = self._checked.get((layer, kv_heads, head_dim))
        if checked is not None:
            return checked
        if isinstance(self.weights, torch.Tensor):
            w = self.weights
        else:
            assert self.weights is not None
            if layer not in self.weights:
                raise UserError(f"hash weights have no projection for layer {layer}")
            w = self.weights[layer]
        checked = self._checked[(layer, kv_heads, head_dim)] = check_projection(
            w, kv_heads, head_dim, self.bits
        )
        return checked
