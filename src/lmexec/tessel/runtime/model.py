"""A small GPT-style decoder and its split into pipeline stages.

Stages are plain ``nn.Module`` objects taking one tensor and returning one tensor (token ids ->
hidden -> ... -> logits), which is what ``torch.distributed.pipelining.PipelineStage`` wants. Every
process builds the *whole* model from the same seed and keeps the stages it owns, so a pipeline run
and a single-process run start from bit-identical weights (the correctness tests rely on it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmexec.errors import UserError


@dataclass(frozen=True)
class GPTConfig:
    """Model shape; ``seq_len`` is the training sequence length (positions are learned)."""

    layers: int = 8
    hidden: int = 256
    heads: int = 4
    vocab: int = 512
    seq_len: int = 64
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for key in ("layers", "hidden", "heads", "vocab", "seq_len", "mlp_ratio"):
            if getattr(self, key) < 1:
                raise UserError(f"model {key} must be positive, got {getattr(self, key)}")
        if self.hidden % self.heads:
            raise UserError(f"hidden size {self.hidden} is not a multiple of the head count {self.heads}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class DecoderLayer(nn.Module):
    """Pre-norm transformer layer: causal self-attention then an MLP, each with a residual."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.hidden)
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.norm2 = nn.LayerNorm(cfg.hidden)
        self.up = nn.Linear(cfg.hidden, cfg.mlp_ratio * cfg.hidden)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, h))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Embedding(nn.Module):
    """Token plus learned position embedding."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab, cfg.hidden)
        self.positions = nn.Embedding(cfg.seq_len, cfg.hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))


class Head(nn.Module):
    """Final norm and LM head (untied: tying would couple the first and last stage)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


class GPTStage(nn.Module):
    """One pipeline stage: optional embedding, a run of decoder layers, optional head."""

    def __init__(self, layers: Sequence[nn.Module], embed: nn.Module | None, head: nn.Module | None) -> None:
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        if self.head is not None:
            x = self.head(x)
        return x


def _init(module: nn.Module, cfg: GPTConfig) -> None:
    """GPT-2 style init (small normal weights, residual projections scaled by depth)."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight", "down.weight")) else 0.02
            nn.init.normal_(p, 0.0, std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


def split_layers(
    num_layers: int, num_stages: int, layers_per_stage: Sequence[int] | None = None
) -> list[int]:
    """Decoder layers per stage: the user's list, or as even as possible (earlier stages get fewer
    when uneven, since stage 0 also holds the embedding and the last stage the head)."""
    if layers_per_stage is not None:
        counts = [int(c) for c in layers_per_stage]
        if len(counts) != num_stages:
            raise UserError(f"layer split lists {len(counts)} stages but the placement has {num_stages}")
        if any(c < 0 for c in counts) or sum(counts) != num_layers:
            raise UserError(f"layer split {counts} must be non-negative and add up to {num_layers} layers")
        empty = [s for s in range(1, num_stages - 1) if counts[s] == 0]
        if empty:
            raise UserError(
                f"layer split {counts} leaves stage(s) {empty} without a layer, hence without parameters "
                "(only the first and last stages hold the embedding and the head)"
            )
        return counts
    if num_stages > num_layers + 2:
        raise UserError(f"{num_stages} stages need at least {num_stages - 2} layers; got {num_layers}")
    if num_layers < num_stages:  # one layer per middle stage first: a stage needs parameters
        return [0] + [1] * (num_stages - 2) + [num_layers - (num_stages - 2)]
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s >= num_stages - extra else 0) for s in range(num_stages)]


def build_gpt_stages(
    cfg: GPTConfig, num_stages: int, split: Sequence[int] | None = None, seed: int = 0
) -> list[nn.Module]:
    """The whole model, initialised from ``seed`` (same weights in every process), cut into stages."""
    counts = split_layers(cfg.layers, num_stages, split)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        embed, layers, head = Embedding(cfg), [DecoderLayer(cfg) for _ in range(cfg.layers)], Head(cfg)
        for module in (embed, *layers, head):
            _init(module, cfg)
    stages: list[nn.Module] = []
    first = 0
    for s, count in enumerate(counts):
        last = s == num_stages - 1
        stages.append(
            GPTStage(layers[first : first + count], embed if s == 0 else None, head if last else None)
        )
        first += count
    return stages


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of one (micro-)batch."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def synthetic_batch(
    cfg: GPTConfig, batch: int, step: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences of arithmetic progressions mod vocab (learnable, so the loss goes down)."""
    g = torch.Generator().manual_seed(seed * 7919 + step)
    start = torch.randint(0, cfg.vocab, (batch, 1), generator=g)
    stride = torch.randint(1, 8, (batch, 1), generator=g)
    seq = (start + stride * torch.arange(cfg.seq_len + 1)) % cfg.vocab
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
