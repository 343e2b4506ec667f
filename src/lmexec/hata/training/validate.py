"""Held-out check of one layer's codes: top-k recall and attention-mass recall against the oracle.

The same metrics as ``lmexec hata fidelity`` (``hata.metrics``), computed without values or outputs so
the trainer can print one line per layer cheaply: per evaluation position, the keys with the smallest
group-summed Hamming distance vs the exact top-k of the group-summed softmax, same budget and forced
tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmexec.hata.attention import attention_logits
from lmexec.hata.budget import Budget
from lmexec.hata.codes import encode, encode_queries, hamming
from lmexec.hata.metrics import mass_recall, topk_recall
from lmexec.hata.selection import group_softmax_sum, top_k_indices
from lmexec.hata.training.data import LayerData


@dataclass(frozen=True)
class Recall:
    """Mean top-k recall and mass recall over texts, positions and KV heads."""

    recall: float
    mass: float


@torch.no_grad()
def code_recall(w: torch.Tensor, data: LayerData, budget: Budget) -> Recall:
    """Recall of Hamming top-k under ``W`` on ``data`` (queries at ``data.positions``, keys up to each)."""
    key_codes = encode(data.keys, w)
    recall = mass = 0.0
    count = 0
    for b in range(data.queries.shape[0]):
        for i, pos in enumerate(data.positions[b].tolist()):
            n = pos + 1
            q = data.queries[b : b + 1, :, i]  # [1, H_q, d]
            logits = attention_logits(q, data.keys[b : b + 1, :, :n])  # [1, H_kv, G, n]
            oracle = top_k_indices(group_softmax_sum(logits), budget)
            scores = -hamming(encode_queries(q, w), key_codes[b : b + 1, :, :n]).float()
            chosen = top_k_indices(scores, budget)
            probs = torch.softmax(logits.float(), dim=-1)
            recall += topk_recall(chosen, oracle, n).sum().item()
            mass += mass_recall(probs, chosen).sum().item()
            count += chosen.shape[1]
    return Recall(recall / count, mass / count)
