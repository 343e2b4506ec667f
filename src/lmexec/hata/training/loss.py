"""Loss functions for the hash projections ``W [H_kv, d, r]`` of one layer.

* :func:`paper_loss` is the reference's objective term by term (docs/hata.md, section "Training"):
  ``eps * L_sim + lambda * L_bal + eta * ||W^T W - I||_F`` on relaxed codes ``tanh(sigma * x W / 2)``.
  It is computed on label matrices ``[B, H_q, P, T]`` instead of explicit (query, key) pair lists; the
  sums are identical (tests compare it with a pair-by-pair loop).
* :func:`ranking_loss` is this project's default: listwise distillation. Per KV head and query
  position it matches ``softmax(tau * sum_g q_g^ . k^ / r)`` over the visible keys to the group-summed
  attention distribution, i.e. the very quantity whose top-k the oracle selects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmexec.hata.training.data import LayerData


def relaxed_codes(x: torch.Tensor, w: torch.Tensor, sigma: float) -> torch.Tensor:
    """``tanh(sigma * x W / 2)`` for ``x [B, H_kv, N, d]``, ``W [H_kv, d, r]`` -> ``[B, H_kv, N, r]``."""
    return torch.tanh(0.5 * sigma * torch.einsum("bhnd,hdr->bhnr", x, w))


@dataclass(frozen=True)
class PaperTerms:
    """The three terms, already multiplied by their weights; ``total`` is their sum."""

    similarity: torch.Tensor
    balance: torch.Tensor
    decorrelation: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.similarity + self.balance + self.decorrelation


def _group_queries(queries: torch.Tensor, h_kv: int) -> torch.Tensor:
    """``[B, H_q, P, d]`` -> ``[B, H_kv, G * P, d]`` so query head ``h`` meets KV head ``h // G``."""
    b, h_q, p, d = queries.shape
    return queries.reshape(b, h_kv, (h_q // h_kv) * p, d)


def paper_loss(
    w: torch.Tensor,
    data: LayerData,
    labels: torch.Tensor,
    eps: float = 0.01,
    lam: float = 1.0,
    eta: float = 2.0,
    sigma: float = 0.1,
) -> PaperTerms:
    """Paper loss of ``W`` on ``data`` with ``labels [B, H_q, P, T]`` (0 = not a pair).

    With N pairs per query head (every visible (query, key)), per query head h:
    ``L_sim = eps/N * sum_h sum_i s_hi ||q^_hi - k^_hi||^2``,
    ``L_bal = lam * sum_h ||sum_i (q^_hi + k^_hi) / (N r)||^2``, ``L_dec = eta * ||W^T W - I||_F``.
    """
    b, h_q, p, _ = data.queries.shape
    h_kv, r = w.shape[0], w.shape[2]
    g = h_q // h_kv
    q_hat = relaxed_codes(_group_queries(data.queries, h_kv), w, sigma).reshape(b, h_q, p, r)
    k_hat = relaxed_codes(data.keys, w, sigma).repeat_interleave(g, dim=1)  # [B, H_q, T, r]
    valid = data.valid().expand(b, h_q, p, -1).float()
    n_pairs = valid[:, 0].sum()  # pairs per query head
    # sum_i s (|q|^2 + |k|^2 - 2 q.k) with i over (b, p, t):
    q_sq = (q_hat.square().sum(-1) * labels.sum(-1)).sum()
    k_sq = (k_hat.square().sum(-1) * labels.sum(-2)).sum()
    cross = (q_hat * torch.matmul(labels, k_hat)).sum()
    similarity = eps * (q_sq + k_sq - 2 * cross) / n_pairs
    # sum_i (q^ + k^) per query head: each query counts once per visible key, each key once per query seeing it
    code_sum = (q_hat * valid.sum(-1, keepdim=True)).sum(dim=(0, 2)) + (
        k_hat * valid.sum(-2).unsqueeze(-1)
    ).sum(dim=(0, 2))  # [H_q, r]
    balance = lam * (code_sum / (n_pairs * r)).square().sum()
    eye = torch.eye(r, dtype=w.dtype)
    decorrelation = eta * torch.linalg.matrix_norm(w.transpose(1, 2) @ w - eye).square().sum().sqrt()
    return PaperTerms(similarity, balance, decorrelation)


def attention_targets(data: LayerData, temperature: float = 1.0) -> torch.Tensor:
    """Group-summed softmax of ``q.k / (sqrt(d) * temperature)`` over visible keys, normalised -> ``[B, H_kv, P, T]``."""
    b, h_q, p, d = data.queries.shape
    h_kv = data.keys.shape[1]
    logits = data.raw_scores() / (d**0.5 * temperature)
    probs = torch.softmax(logits.masked_fill(~data.valid(), float("-inf")), dim=-1)
    return probs.reshape(b, h_kv, h_q // h_kv, p, -1).mean(dim=2)


def _direction_codes(
    x: torch.Tensor, unit_w: torch.Tensor, sharpness: float, straight_through: bool
) -> torch.Tensor:
    """Codes of ``x``'s direction: ``tanh(sharpness * sqrt(d) * x/|x| . w)``, ``sign`` forward if ``straight_through``.

    ``sign(x W)`` ignores ``|x|``, so the relaxation must too, or training rewards long keys through
    code magnitudes that the binary codes cannot express.
    """
    unit_x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    z = sharpness * x.shape[-1] ** 0.5 * torch.einsum("bhnd,hdr->bhnr", unit_x, unit_w)
    soft = torch.tanh(z)
    if straight_through:
        return soft + (torch.where(z >= 0, 1.0, -1.0) - soft).detach()
    return soft


def ranking_loss(
    w: torch.Tensor,
    data: LayerData,
    targets: torch.Tensor,
    log_tau: torch.Tensor,
    sharpness: float,
    straight_through: bool = True,
    balance: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of ``softmax(tau * sum_g q^_g . k^ / r)`` against ``targets [B, H_kv, P, T]``.

    ``q^ . k^ = r - 2 * Hamming`` for binary codes, so the logits are the (negated, scaled) group-summed
    Hamming distance that selection ranks by. Codes come from :func:`_direction_codes` with unit-norm
    columns of ``W`` (``sign`` ignores the scale of ``W`` too). ``balance`` adds the mean-bit penalty on
    key codes (a bit that is always set carries nothing).
    """
    b, h_q, p, d = data.queries.shape
    h_kv, r = w.shape[0], w.shape[2]
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    q_hat = _direction_codes(_group_queries(data.queries, h_kv), unit, sharpness, straight_through)
    q_sum = q_hat.reshape(b, h_kv, h_q // h_kv, p, r).sum(dim=2)  # [B, H_kv, P, r]
    k_hat = _direction_codes(data.keys, unit, sharpness, straight_through)
    logits = log_tau.exp() * torch.matmul(q_sum, k_hat.transpose(-1, -2)) / r
    valid = data.valid()
    log_probs = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    loss = -(targets * log_probs.masked_fill(~valid, 0.0)).sum(-1).mean()
    if balance:
        loss = loss + balance * k_hat.mean(dim=(0, 2)).square().mean()
    return loss
