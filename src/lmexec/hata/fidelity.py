"""The fidelity experiment: how well each selection method matches dense attention on a real model.

One prefill per evaluation text captures post-RoPE q/k/v of every layer; decode steps are then replayed
at ``positions`` query positions spread over the last quarter of the context, each attending causally
to the keys before it. For every sparse layer (``>= dense_layers``), method and budget, the selection
is compared with dense attention on the same step (metrics in :mod:`lmexec.hata.metrics`); results are
averaged over layers, KV heads, positions and texts. Keys enter each method's cache by prefill plus
in-place appends, the same path a decode loop uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmexec.errors import UserError, check_distinct, check_seed
from lmexec.hata.attention import attention_logits, attention_probs, dense_attention, sparse_attention
from lmexec.hata.budget import Budget
from lmexec.hata.cache import LayerCache
from lmexec.hata.codes import check_bits, code_bytes
from lmexec.hata.metrics import mass_recall, output_error, topk_recall
from lmexec.hata.selection import (
    METHODS,
    Dense,
    Hata,
    Loki,
    Oracle,
    Quest,
    SelectionMethod,
    SimHash,
    SparQ,
    fit_basis,
    group_softmax_sum,
    top_k_indices,
)
from lmexec.hata.texts import KINDS, token_block
from lmexec.hata.weights import default_weights, load_for_model, load_hash_weights

DEFAULT_SWEEP = (64, 128, 256, 512, 1024)


@dataclass
class FidelityConfig:
    model: str = "smollm2"
    context: int = 4096
    budget: float = 256
    budgets: tuple[float, ...] = ()
    """Extra budgets for the sweep (the plot); ``budget`` is always included."""
    methods: tuple[str, ...] = ("dense", "oracle", "simhash", "loki", "quest", "sparq")
    bits: int = 128
    sink: int = 0
    recent: int = 1
    positions: int = 32
    dense_layers: int = 2
    texts: tuple[str, ...] = KINDS
    calibration_tokens: int = 1024
    """Tokens per text kind of calibration text (Loki's PCA); disjoint from the evaluation text."""
    hata_weights: str | None = None
    equal_bytes: bool = True
    """Also run Loki/SparQ/Quest at the hash methods' selection bytes (:func:`code_bytes`)."""
    element_bytes: int = 2
    """Bytes per stored K element used to count selection bytes (2: fp16/bf16 cache as deployed)."""
    seed: int = 0

    def validate(self) -> None:
        check_bits(self.bits)
        check_seed(self.seed)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise UserError(
                f"unknown method(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(METHODS)}"
            )
        if "hata" in self.methods and not self.hata_weights:
            shipped = default_weights(self.model, self.bits)
            if shipped is None:
                raise UserError(
                    f"method 'hata' has no shipped weights for model {self.model!r} at {self.bits} bits: "
                    "pass --hata-weights FILE made by `lmexec hata train`"
                )
            self.hata_weights = str(shipped)  # recorded in the result's config
        if self.hata_weights and not Path(self.hata_weights).is_file():
            raise UserError(
                f"hash weights file {self.hata_weights} does not exist (weights come from `lmexec hata train`)"
            )
        if self.context < 64:
            raise UserError(f"--context must be at least 64 tokens, got {self.context}")
        if not 1 <= self.positions <= self.context // 4:
            raise UserError(
                f"--positions must be between 1 and context/4 = {self.context // 4}, got {self.positions}"
            )
        if self.dense_layers < 0:
            raise UserError(f"--dense-layers must be >= 0, got {self.dense_layers}")
        check_distinct("--methods", self.methods)
        check_distinct("--texts", self.texts)
        bad = [t for t in self.texts if t not in KINDS]
        if bad or not self.texts:
            raise UserError(
                f"unknown text kind(s) {', '.join(bad) or '(none)'}: choose from {', '.join(KINDS)}"
            )
        for value in self.all_budgets():
            Budget(value, self.sink, self.recent)

    def all_budgets(self) -> list[float]:
        return sorted({self.budget, *self.budgets})


@dataclass
class Variant:
    """One table row: a method at one setting."""

    label: str
    method: SelectionMethod
    settings: str


@dataclass
class _Sums:
    """Running sums of the per-layer metrics of one (variant, budget)."""

    recall: dict[int, float] = field(default_factory=dict)
    mass: dict[int, float] = field(default_factory=dict)
    error: dict[int, float] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=dict)

    def add(self, layer: int, recall: torch.Tensor, mass: torch.Tensor, error: torch.Tensor) -> None:
        self.recall[layer] = self.recall.get(layer, 0.0) + recall.sum().item()
        self.mass[layer] = self.mass.get(layer, 0.0) + mass.sum().item()
        self.error[layer] = self.error.get(layer, 0.0) + error.sum().item()
        self.count[layer] = self.count.get(layer, 0) + recall.numel()


def build_variants(
    config: FidelityConfig,
    head_dim: int,
    n_layers: int,
    n_kv_heads: int,
    loki_bases: dict[int, torch.Tensor],
    model_config: Any = None,
) -> list[Variant]:
    """The methods to compare, with the extra equal-selection-bytes rows for Loki, SparQ and Quest."""
    target = code_bytes(config.bits)  # bytes per token of a hash code
    elem = config.element_bytes
    variants: list[Variant] = []
    for name in config.methods:
        if name == "dense":
            variants.append(Variant("dense", Dense(), "all tokens"))
        elif name == "oracle":
            variants.append(Variant("oracle", Oracle(), "exact top-k"))
        elif name == "simhash":
            variants.append(
                Variant("simhash", SimHash(config.bits, config.seed), f"{config.bits} random bits")
            )
        elif name == "hata":
            assert config.hata_weights
            weights = (
                load_hash_weights(config.hata_weights, n_layers, n_kv_heads, head_dim, config.bits)
                if model_config is None
                else load_for_model(config.hata_weights, model_config, config.bits)  # also checks the model
            )
            method = Hata(weights)
            variants.append(Variant("hata", method, f"{config.bits} learned bits"))
        elif name in ("loki", "sparq"):
            cls: Callable[..., SelectionMethod] = Loki if name == "loki" else SparQ
            extra = {"bases": dict(loki_bases)} if name == "loki" else {}
            usual = max(1, head_dim // 4)
            variants.append(Variant(name, cls(rank=usual, **extra), f"r={usual} (d/4)"))
            equal = max(1, int(target // elem))
            if config.equal_bytes and equal != usual:
                extra = {"bases": dict(loki_bases)} if name == "loki" else {}
                variants.append(Variant(f"{name}@{target:g}B", cls(rank=equal, **extra), f"r={equal}"))
        elif name == "quest":
            variants.append(Variant("quest", Quest(16), "page=16"))
            page = max(1, round(2 * head_dim * elem / target))
            if config.equal_bytes and page != 16:
                variants.append(Variant(f"quest@{target:g}B", Quest(page), f"page={page}"))
    return variants


def query_positions(context: int, count: int) -> torch.Tensor:
    """``count`` distinct positions spread evenly over the last quarter of the context."""
    start = context - context // 4
    return torch.linspace(start, context - 1, count).round().long().unique()


def run_fidelity(
    config: FidelityConfig, progress: Callable[[str, int], Callable[[], None]] | None = None
) -> dict[str, Any]:
    """Run the experiment and return a JSON-ready result (see docs/hata.md for the keys)."""
    from lmexec.hata.capture import capture
    from lmexec.hata.models import check_positions, load_model

    config.validate()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tokenizer = load_model(config.model)
    cfg = model.config
    n_layers, h_q, h_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // h_q
    check_positions(model, config.context, "--context")
    if config.dense_layers >= n_layers:
        raise UserError(f"--dense-layers {config.dense_layers} leaves no sparse layer of {n_layers}")
    layers = list(range(config.dense_layers, n_layers))
    timings["load_s"] = time.perf_counter() - t0

    loki_bases: dict[int, torch.Tensor] = {}
    if "loki" in config.methods:
        t = time.perf_counter()
        calib = torch.stack(
            [token_block(tokenizer, kind, "calibration", config.calibration_tokens) for kind in config.texts]
        )
        keys = capture(model, calib, layers, keep_values=False).keys
        loki_bases = {layer: fit_basis(keys[layer]) for layer in layers}
        del keys
        timings["calibration_s"] = time.perf_counter() - t
    variants = build_variants(config, head_dim, n_layers, h_kv, loki_bases, cfg)

    t = time.perf_counter()
    ids = torch.stack([token_block(tokenizer, kind, "evaluation", config.context) for kind in config.texts])
    positions = query_positions(config.context, config.positions)
    captured = capture(model, ids, layers, positions)
    timings["capture_s"] = time.perf_counter() - t

    budgets = [Budget(v, config.sink, config.recent) for v in config.all_budgets()]
    sums = {(v.label, b.value): _Sums() for v in variants for b in budgets}
    t = time.perf_counter()
    tick = progress("selection", len(layers)) if progress else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: one thread is faster and steadier on a busy 2-core machine
    try:
        for layer in layers:
            queries, keys, values = captured.queries[layer], captured.keys[layer], captured.values[layer]
            _evaluate_layer(layer, queries, keys, values, positions, variants, budgets, sums)
            del captured.keys[layer], captured.values[layer]
            if tick:
                tick()
    finally:
        torch.set_num_threads(threads)
    timings["selection_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return _result(config, variants, budgets, sums, layers, positions, head_dim, h_q, h_kv, n_layers, timings)


def _evaluate_layer(
    layer: int,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    variants: Sequence[Variant],
    budgets: Sequence[Budget],
    sums: dict[tuple[str, float], _Sums],
) -> None:
    """Replay the decode steps of one layer for every variant and budget."""
    h_kv = keys.shape[1]
    steps = []  # dense reference per position: (n, query, probs, output, {budget: oracle set})
    for i, pos in enumerate(positions.tolist()):
        n = pos + 1
        q, k, v = queries[:, :, i], keys[:, :, :n], values[:, :, :n]
        oracle_scores = group_softmax_sum(attention_logits(q, k))  # what Oracle.scores computes
        oracle_sets = {b.value: top_k_indices(oracle_scores, b) for b in budgets}
        steps.append((n, q, attention_probs(q, k), dense_attention(q, k, v), oracle_sets))
    first = steps[0][0]
    for variant in variants:
        cache = LayerCache.from_prefill(keys[:, :, :first], values[:, :, :first], capacity=keys.shape[2])
        variant.method.prepare(cache, layer)
        for n, q, probs, dense_out, oracle_sets in steps:
            if n > cache.length:
                start = cache.append(keys[:, :, cache.length : n], values[:, :, cache.length : n])
                variant.method.on_append(cache, layer, start)
            scores = variant.method.scores(q, cache, layer)
            for budget in budgets:
                idx = variant.method.select(q, cache, layer, budget, scores=scores)
                out = sparse_attention(q, cache.keys, cache.values, idx)
                sums[variant.label, budget.value].add(
                    layer,
                    topk_recall(idx, oracle_sets[budget.value], n),
                    mass_recall(probs, idx),
                    output_error(out, dense_out, h_kv),
                )


def _result(
    config: FidelityConfig,
    variants: Sequence[Variant],
    budgets: Sequence[Budget],
    sums: dict[tuple[str, float], _Sums],
    layers: list[int],
    positions: torch.Tensor,
    head_dim: int,
    h_q: int,
    h_kv: int,
    n_layers: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    results = []
    for variant in variants:
        for budget in budgets:
            s = sums[variant.label, budget.value]
            per_layer = {
                name: [getattr(s, attr)[layer] / s.count[layer] for layer in layers]
                for name, attr in (("recall", "recall"), ("mass_recall", "mass"), ("output_error", "error"))
            }
            total = sum(s.count.values())
            results.append(
                {
                    "label": variant.label,
                    "method": variant.method.name,
                    "settings": variant.settings,
                    "selection_bytes_per_token": variant.method.selection_bytes_per_token(
                        head_dim, config.element_bytes
                    ),
                    "budget": budget.value,
                    "budget_tokens": config.context
                    if variant.method.name == "dense"
                    else budget.tokens(config.context),
                    "recall": sum(s.recall.values()) / total,
                    "mass_recall": sum(s.mass.values()) / total,
                    "output_error": sum(s.error.values()) / total,
                    "samples": total,
                    "per_layer": per_layer,
                }
            )
    return {
        "config": asdict(config),
        "model": {
            "name": config.model,
            "layers": n_layers,
            "heads": h_q,
            "kv_heads": h_kv,
            "head_dim": head_dim,
        },
        "layers": layers,
        "positions": positions.tolist(),
        "table": [r for r in results if r["budget"] == config.budget],
        "results": results,
        "timings": timings,
    }
