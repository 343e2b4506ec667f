"""Training data for learning-to-hash: post-RoPE queries at sampled positions, their causal keys, labels.

Per text, one prefill captures every layer's keys ``k_0..k_{T-1}`` and the queries at ``P`` sampled
positions; a query at position ``t`` is paired with keys ``0..t`` (causal). Pairs are never
materialised: the loss works on ``[P, T]`` label matrices (0 outside the causal window), which holds
the same information as the reference's pair lists with far less memory.

Labels follow the paper (docs/hata.md, Training -> Data): per query head, the top ``top_frac`` of its
causal keys by raw ``q.k`` get ordinal weights falling linearly from 20 (best) to 1, every other
causal key gets -1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmexec.errors import UserError
from lmexec.hata.texts import KINDS, documents


@dataclass
class LayerData:
    """One layer's training tensors (fp32).

    ``queries [B, H_q, P, d]``, ``keys [B, H_kv, T, d]``, ``positions [B, P]`` (query ``p`` of text
    ``b`` sits at ``positions[b, p]`` and sees keys ``0..positions[b, p]``).
    """

    queries: torch.Tensor
    keys: torch.Tensor
    positions: torch.Tensor

    @property
    def group(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    def select(self, texts: torch.Tensor) -> LayerData:
        """The texts ``texts`` (indices) only."""
        return LayerData(self.queries[texts], self.keys[texts], self.positions[texts])

    def valid(self) -> torch.Tensor:
        """Bool ``[B, 1, P, T]``: key ``t`` is visible to query ``p`` (``t <= position``)."""
        t = torch.arange(self.keys.shape[2])
        return (t[None, None, :] <= self.positions[:, :, None]).unsqueeze(1)

    def raw_scores(self) -> torch.Tensor:
        """``q.k`` per query head ``[B, H_q, P, T]`` (query head ``h`` uses KV head ``h // G``)."""
        keys = self.keys.repeat_interleave(self.group, dim=1)
        return torch.einsum("bhpd,bhtd->bhpt", self.queries.float(), keys.float())


def paper_labels(scores: torch.Tensor, valid: torch.Tensor, top_frac: float = 0.1) -> torch.Tensor:
    """Ordinal labels ``[..., P, T]``: top ``top_frac`` of the visible keys 20 -> 1 linearly, others -1, invisible 0.

    The number of positives per query is ``max(1, round(top_frac * visible))``.
    """
    valid = valid.expand_as(scores)
    visible = valid.sum(dim=-1, keepdim=True)  # [..., P, 1]
    n_pos = (visible.float() * top_frac).round().clamp_min(1)
    order = scores.masked_fill(~valid, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order))
    ranks = ranks.float()
    step = 19.0 / (n_pos - 1).clamp_min(1)
    positive = 20.0 - step * ranks
    labels = torch.where(ranks < n_pos, positive, torch.full_like(positive, -1.0))
    return labels.masked_fill(~valid, 0.0)


def sample_positions(
    length: int, count: int, generator: torch.Generator, low_frac: float = 0.25
) -> torch.Tensor:
    """``count`` distinct sorted positions drawn uniformly from ``[low_frac * length, length)``."""
    low = int(length * low_frac)
    span = length - low
    if not 1 <= count <= span:
        raise UserError(f"--positions must be between 1 and {span} for {length}-token texts, got {count}")
    return (torch.randperm(span, generator=generator)[:count] + low).sort().values


def text_blocks(
    tokenizer: Any, split: str, count: int, length: int, kinds: tuple[str, ...] = KINDS
) -> torch.Tensor:
    """``count`` distinct blocks of ``length`` tokens from ``split`` text, alternating kinds -> ``[count, length]``.

    Each kind's documents are joined by blank lines and cut into consecutive blocks; block ``i`` comes
    from kind ``kinds[i % len(kinds)]``. Deterministic.
    """
    per_kind = {kind: len(range(i, count, len(kinds))) for i, kind in enumerate(kinds)}
    blocks: dict[str, list[torch.Tensor]] = {}
    for kind, need in per_kind.items():
        ids: list[int] = []
        for text in documents(kind, split):
            ids.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
            if len(ids) >= need * length:
                break
        if len(ids) < need * length:
            raise UserError(
                f"the {split} {kind} text holds {len(ids)} tokens, fewer than {need} x {length} asked for"
            )
        flat = torch.tensor(ids[: need * length], dtype=torch.long)
        blocks[kind] = list(flat.view(need, length))
    order = [blocks[kinds[i % len(kinds)]].pop(0) for i in range(count)]
    return torch.stack(order)


@torch.no_grad()
def capture_layers(
    model: Any, blocks: torch.Tensor, layers: list[int], positions: torch.Tensor
) -> dict[int, LayerData]:
    """One prefill per block (so each text has its own positions) -> ``{layer: LayerData}``."""
    from lmexec.hata.capture import capture

    queries: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for b in range(blocks.shape[0]):
        got = capture(model, blocks[b : b + 1], layers, positions[b], keep_values=False)
        for layer in layers:
            queries[layer].append(got.queries[layer][0].float())
            keys[layer].append(got.keys[layer][0].float())
        del got
    return {
        layer: LayerData(torch.stack(queries[layer]), torch.stack(keys[layer]), positions.clone())
        for layer in layers
    }
