"""Fidelity of a selection against dense attention on the same decode step, per KV head.

* top-k recall: ``|S ∩ S*| / |S*|`` with ``S*`` the oracle set (exact top-k of the group-summed
  softmax, same budget and forced tokens);
* attention-mass recall: share of the dense softmax mass that falls inside ``S`` (mean over the query
  heads of the group);
* output error: ``||o_S - o|| / ||o||`` of the renormalised sparse attention output vs dense
  (mean over the query heads of the group).
"""

from __future__ import annotations

import torch


def membership(indices: torch.Tensor, n: int) -> torch.Tensor:
    """Bool ``[B, H_kv, N]``: True where a position is in ``indices [B, H_kv, k]``."""
    mask = torch.zeros(*indices.shape[:2], n, dtype=torch.bool, device=indices.device)
    return mask.scatter_(2, indices.long(), True)


def topk_recall(selected: torch.Tensor, reference: torch.Tensor, n: int) -> torch.Tensor:
    """Fraction of ``reference`` positions also in ``selected`` -> ``[B, H_kv]``."""
    inside = membership(selected, n).gather(2, reference.long())
    return inside.float().mean(dim=-1)


def mass_recall(probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Dense softmax mass ``probs [B, H_kv, G, N]`` inside the selection -> ``[B, H_kv]``."""
    mask = membership(selected, probs.shape[-1]).unsqueeze(2)
    return (probs * mask).sum(dim=-1).mean(dim=2)


def output_error(sparse: torch.Tensor, dense: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Relative L2 error per query head ``[B, H_q, d]``, averaged over each GQA group -> ``[B, H_kv]``."""
    diff = (sparse.float() - dense.float()).norm(dim=-1)
    rel = diff / dense.float().norm(dim=-1).clamp_min(1e-30)
    return rel.reshape(rel.shape[0], kv_heads, -1).mean(dim=2)
