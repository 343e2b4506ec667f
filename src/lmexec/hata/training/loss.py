"""Loss functions for the hash projections ``W [H_kv, d, r]`` of one layer.

* :func:`paper_loss` is the reference's objective term by term (docs/hata.md, section "Training"):
  ``eps * L_sim + lambda * L_bal + eta * ||W^T W - I||_F`` on relaxed codes ``tanh(sigma * x W / 2)``.
  It is computed from label matrices ``[B, H_q, P, T]`` instead of explicit (query, key) pair lists
  (the positive labels as a sparse matrix, the -1 of every other visible pair as a prefix sum); the
  sums are identical (tests compare it with a pair-by-pair loop).
* :func:`ranking_loss` is this project's default: listwise distillation. Per KV head and query
  position it matches ``softmax(tau * sum_g q_g^ . k^ / r)`` over the visible keys to the group-summed
  attention distribution, i.e. the very quantity whose top-k the oracle selects.
"""

from __future__ import annotations

import warnings
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


@dataclass(frozen=True)
class PaperTargets:
    """The paper's labels in the form the loss needs, built once per layer (they never change).

    With ``V`` the visibility mask, ``labels = A - V`` on visible pairs (labels of invisible pairs are
    ignored: they are not pairs): ``A = labels + V`` is sparse for the paper's labels, ``label + 1`` on the
    positives (about ``top_frac`` of the pairs) and 0 on the ``-1`` pairs, so ``sum_t labels[p, t] k_t = A k - sum_{t <= pos_p} k_t``:
    one sparse product plus prefix sums of the keys at the query positions, instead of a dense
    ``[P, T] x [T, r]`` product per query head. Sums that only weigh keys are folded over the GQA group
    (the heads of a group share their keys), so nothing of size ``[B, H_q, T, r]`` is formed.
    """

    positive: torch.Tensor
    """Sparse CSR ``[(B * H_q * P), (B * H_kv * T)]``: row of query (b, h, p), column of key (b, h // G, t)."""
    row_sums: torch.Tensor
    """``labels.sum(-1)`` ``[B, H_q, P]``."""
    key_weights: torch.Tensor
    """``labels.sum(-2)`` summed over each GQA group ``[B, H_kv, T]``."""
    segment: torch.Tensor
    """``[B * T]``: key (b, t) -> slot ``b * (P + 1) + i``, ``i`` = the first query (in position order) that sees
    it, ``P`` if none; prefix sums over the slots give ``sum_{t <= pos} k_t`` at every query."""
    order: torch.Tensor
    """``[B, P]``: the queries of each text in position order."""
    visible: torch.Tensor
    """``[B, P]``: keys each query sees (``position + 1``)."""
    seen_by: torch.Tensor
    """``[B, T]``: queries that see each key."""

    @classmethod
    def build(cls, labels: torch.Tensor, data: LayerData) -> PaperTargets:
        b, h_q, p, t = labels.shape
        h_kv = data.keys.shape[1]
        g = h_q // h_kv
        valid = data.valid()
        shifted = (labels + valid).masked_fill(~valid, 0.0)  # A = labels + V on visible pairs
        bi, hi, pi, ti = shifted.nonzero(as_tuple=True)  # paper labels: only the positives (-1 + 1 = 0)
        rows = (bi * h_q + hi) * p + pi
        cols = (bi * h_kv + hi // g) * t + ti
        coo = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), shifted[bi, hi, pi, ti], (b * h_q * p, b * h_kv * t),
            check_invariants=False,
        ).coalesce()  # fmt: skip
        with warnings.catch_warnings():  # "sparse CSR support is in beta": products with it are what we use
            warnings.simplefilter("ignore", UserWarning)
            positive = coo.to_sparse_csr()
        sorted_pos, order = data.positions.sort(dim=1)
        first_seer = torch.searchsorted(sorted_pos, torch.arange(t).expand(b, t).contiguous())  # [B, T]
        segment = (first_seer + torch.arange(b)[:, None] * (p + 1)).reshape(-1)
        return cls(
            positive,
            labels.sum(-1),
            labels.sum(-2).reshape(b, h_kv, g, t).sum(2),
            segment,
            order,
            (data.positions + 1).to(labels.dtype),
            (p - first_seer).to(labels.dtype),
        )


def paper_loss(
    w: torch.Tensor,
    data: LayerData,
    labels: torch.Tensor | PaperTargets,
    eps: float = 0.01,
    lam: float = 1.0,
    eta: float = 2.0,
    sigma: float = 0.1,
) -> PaperTerms:
    """Paper loss of ``W`` on ``data`` with ``labels [B, H_q, P, T]`` (0 = not a pair), or the same
    labels prepared by :meth:`PaperTargets.build` (what training passes: built once per layer).

    With N pairs per query head (every visible (query, key)), per query head h:
    ``L_sim = eps/N * sum_h sum_i s_hi ||q^_hi - k^_hi||^2``,
    ``L_bal = lam * sum_h ||sum_i (q^_hi + k^_hi) / (N r)||^2``, ``L_dec = eta * ||W^T W - I||_F``.
    """
    tg = labels if isinstance(labels, PaperTargets) else PaperTargets.build(labels, data)
    b, h_q, p, _ = data.queries.shape
    h_kv, r = w.shape[0], w.shape[2]
    g = h_q // h_kv
    t = data.keys.shape[2]
    q_hat = relaxed_codes(_group_queries(data.queries, h_kv), w, sigma).reshape(b, h_q, p, r)
    k_hat = relaxed_codes(data.keys, w, sigma)  # [B, H_kv, T, r]: shared by the group's query heads
    n_pairs = tg.visible.sum()  # pairs per query head
    # sum_i s (|q|^2 + |k|^2 - 2 q.k) with i over (b, p, t):
    q_sq = (q_hat.square().sum(-1) * tg.row_sums).sum()
    k_sq = (k_hat.square().sum(-1) * tg.key_weights).sum()
    positive = (tg.positive @ k_hat.reshape(b * h_kv * t, r)).reshape(b, h_q, p, r)
    slots = torch.zeros(h_kv, b * (p + 1), r, dtype=k_hat.dtype)
    slots = slots.index_add(1, tg.segment, k_hat.transpose(0, 1).reshape(h_kv, b * t, r))
    prefix = slots.reshape(h_kv, b, p + 1, r).cumsum(dim=2)[:, :, :p].transpose(0, 1)  # [B, H_kv, P, r]
    in_order = q_hat.gather(2, tg.order[:, None, :, None].expand(b, h_q, p, r))
    cross = (q_hat * positive).sum() - (in_order.reshape(b, h_kv, g, p, r) * prefix[:, :, None]).sum()
    similarity = eps * (q_sq + k_sq - 2 * cross) / n_pairs
    # sum_i (q^ + k^) per query head: each query counts once per visible key, each key once per query seeing it
    key_sum = (k_hat * tg.seen_by[:, None, :, None]).sum(dim=(0, 2))  # [H_kv, r]
    code_sum = (q_hat * tg.visible[:, None, :, None]).sum(dim=(0, 2)) + key_sum.repeat_interleave(g, dim=0)
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
