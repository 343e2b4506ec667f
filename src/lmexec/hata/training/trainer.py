"""``lmexec hata train``: capture calibration q/k once, then train and validate one layer at a time.

Resumable: every finished layer is written to ``<out>.partial/layer-<l>.safetensors`` (with its
validation numbers) before the next starts; a rerun with the same settings loads those layers and
carries on. Each layer's result depends only on the (deterministic) captured data and ``seed + layer``,
so a resumed run writes the same file as an uninterrupted one (same thread count: float reductions
may differ across thread counts).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmexec.errors import UserError
from lmexec.hata.budget import Budget
from lmexec.hata.codes import random_projection
from lmexec.hata.training.config import TrainConfig
from lmexec.hata.training.data import LayerData, capture_layers, sample_positions, text_blocks
from lmexec.hata.training.recipes import Recipe, Tick, train_layer
from lmexec.hata.training.validate import Recall, code_recall
from lmexec.hata.weights import model_signature, save_hash_weights


@dataclass
class LayerResult:
    layer: int
    learned: Recall
    simhash: Recall
    seconds: float
    final_loss: float
    resumed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "learned_recall": self.learned.recall,
            "learned_mass_recall": self.learned.mass,
            "simhash_recall": self.simhash.recall,
            "simhash_mass_recall": self.simhash.mass,
            "seconds": self.seconds,
            "final_loss": self.final_loss,
            "resumed": self.resumed,
        }


@dataclass
class Hooks:
    """Callbacks for the CLI: a phase message, a per-layer progress bar and the validation line."""

    message: Callable[[str], None] = lambda text: None
    layer_start: Callable[[int, int], Tick] = lambda layer, steps: lambda loss: None
    layer_done: Callable[[LayerResult], None] = lambda result: None


@dataclass
class TrainResult:
    path: Path
    config: TrainConfig
    layers: list[LayerResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Validation means over the trained layers."""
        n = max(1, len(self.layers))
        return {
            key: sum(getattr(getattr(r, side), attr) for r in self.layers) / n
            for key, side, attr in (
                ("learned_recall", "learned", "recall"),
                ("learned_mass_recall", "learned", "mass"),
                ("simhash_recall", "simhash", "recall"),
                ("simhash_mass_recall", "simhash", "mass"),
            )
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.path),
            "config": asdict(self.config),
            "layers": [r.as_dict() for r in self.layers],
            "summary": self.summary(),
            "timings": self.timings,
        }


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _layer_file(folder: Path, layer: int) -> Path:
    return folder / f"layer-{layer:03d}.safetensors"


def _save_layer(folder: Path, result: LayerResult, w: torch.Tensor, fingerprint: str) -> None:
    from safetensors.torch import save_file

    meta = {"fingerprint": fingerprint, "result": json.dumps(result.as_dict())}
    tmp = _layer_file(folder, result.layer).with_suffix(".tmp")
    save_file({"w": w.contiguous()}, str(tmp), metadata=meta)
    tmp.replace(_layer_file(folder, result.layer))  # atomic: a kill never leaves half a layer


def _load_layer(folder: Path, layer: int, fingerprint: str) -> tuple[torch.Tensor, LayerResult] | None:
    from safetensors import safe_open

    path = _layer_file(folder, layer)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            w = handle.get_tensor("w")
    except Exception:
        return None  # damaged: train the layer again
    if meta.get("fingerprint") != fingerprint:
        return None
    saved = json.loads(meta["result"])
    result = LayerResult(
        layer,
        Recall(saved["learned_recall"], saved["learned_mass_recall"]),
        Recall(saved["simhash_recall"], saved["simhash_mass_recall"]),
        saved["seconds"],
        saved["final_loss"],
        resumed=True,
    )
    return w, result


def _prepare_partial(folder: Path, config: TrainConfig, hooks: Hooks) -> None:
    """Create the partial folder; settings that differ from a previous run's start it afresh."""
    stamp = folder / "config.json"
    if folder.is_dir() and stamp.is_file():
        if json.loads(stamp.read_text()).get("fingerprint") == config.fingerprint():
            return
        hooks.message(f"settings changed since the partial run in {folder}: starting afresh")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"fingerprint": config.fingerprint(), "config": asdict(config)}, indent=2))


def calibration_data(
    model: Any, tokenizer: Any, config: TrainConfig, layers: list[int]
) -> dict[int, LayerData]:
    """Captured training data: ``texts`` calibration blocks with their own sampled query positions."""
    blocks = text_blocks(tokenizer, "calibration", config.texts, config.context)
    generator = torch.Generator().manual_seed(config.seed)
    positions = torch.stack(
        [sample_positions(config.context, config.positions, generator) for _ in range(config.texts)]
    )
    return capture_layers(model, blocks, layers, positions)


def validation_data(
    model: Any, tokenizer: Any, config: TrainConfig, layers: list[int]
) -> dict[int, LayerData]:
    """Held-out data: one evaluation block per text kind, positions spread over its last quarter."""
    from lmexec.hata.fidelity import query_positions
    from lmexec.hata.texts import KINDS

    blocks = text_blocks(tokenizer, "evaluation", len(KINDS), config.val_context)
    positions = query_positions(config.val_context, config.val_positions)
    return capture_layers(model, blocks, layers, positions.expand(len(KINDS), -1).contiguous())


def train(config: TrainConfig, out: str | Path, hooks: Hooks | None = None) -> TrainResult:
    """Train every sparse layer of ``config.model`` and write the weights file ``out``."""
    from lmexec.hata.models import check_positions, load_model

    hooks = hooks or Hooks()
    config.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    t0 = time.perf_counter()
    try:
        model, tokenizer = load_model(config.model)
        cfg = model.config
        n_layers = cfg.num_hidden_layers
        if config.dense_layers >= n_layers:
            raise UserError(f"--dense-layers {config.dense_layers} leaves no sparse layer of {n_layers}")
        check_positions(model, config.context, "--context")
        check_positions(model, config.val_context, "--val-context")
        load_s = time.perf_counter() - t0

        def capture(todo: list[int]) -> tuple[dict[int, LayerData], dict[int, LayerData]]:
            hooks.message(
                f"capturing q/k: {config.texts} calibration texts x {config.context} tokens, "
                f"2 held-out texts x {config.val_context} tokens"
            )
            return (
                calibration_data(model, tokenizer, config, todo),
                validation_data(model, tokenizer, config, todo),
            )

        result = train_layers(config, capture, n_layers, model_signature(cfg), out, hooks)
    finally:
        torch.set_num_threads(threads)
    result.timings["load_s"] = load_s
    result.timings["total_s"] = time.perf_counter() - t0
    return result


Capture = Callable[[list[int]], tuple[dict[int, LayerData], dict[int, LayerData]]]
"""Given the layers still to train -> (calibration data, held-out data) per layer."""


def train_layers(
    config: TrainConfig, capture: Capture, n_layers: int, signature: str, out: str | Path, hooks: Hooks
) -> TrainResult:
    """Train the layers ``dense_layers..n_layers-1`` missing from the partial folder, then write ``out``."""
    recipe = config.validate()
    out = Path(out)
    result = TrainResult(out, config)
    layers = list(range(config.dense_layers, n_layers))
    folder = partial_dir(out)
    _prepare_partial(folder, config, hooks)
    fingerprint = config.fingerprint()
    done = {layer: got for layer in layers if (got := _load_layer(folder, layer, fingerprint))}
    todo = [layer for layer in layers if layer not in done]
    if done:
        hooks.message(f"resuming: {len(done)} of {len(layers)} layers already trained in {folder}")
    t = time.perf_counter()
    train_data, val_data = capture(todo) if todo else ({}, {})
    result.timings["capture_s"] = time.perf_counter() - t
    t = time.perf_counter()
    budget = Budget(config.val_budget, 0, 1)
    weights: dict[int, torch.Tensor] = {}
    for layer in layers:
        if layer in done:
            weights[layer], layer_result = done[layer]
        else:
            weights[layer], layer_result = _train_one(
                recipe, config, layer, train_data.pop(layer), val_data.pop(layer), budget, hooks
            )
            _save_layer(folder, layer_result, weights[layer], fingerprint)
        result.layers.append(layer_result)
        hooks.layer_done(layer_result)
    result.timings["train_s"] = time.perf_counter() - t
    extra = {
        "model_config": signature,
        "recipe": json.dumps(recipe.describe(), sort_keys=True),
        "training": json.dumps(
            {k: v for k, v in asdict(config).items() if k not in ("model", "bits", "recipe", "epochs")},
            sort_keys=True,
        ),
        "validation": json.dumps(result.summary(), sort_keys=True),
    }
    save_hash_weights(
        out, weights, n_layers, model=config.model, dense_layers=config.dense_layers, extra=extra
    )
    shutil.rmtree(folder, ignore_errors=True)
    return result


def _train_one(
    recipe: Recipe,
    config: TrainConfig,
    layer: int,
    data: LayerData,
    held_out: LayerData,
    budget: Budget,
    hooks: Hooks,
) -> tuple[torch.Tensor, LayerResult]:
    """Train, then validate learned codes against same-bits SimHash on held-out text."""
    started = time.perf_counter()
    losses: list[float] = []
    tick = hooks.layer_start(layer, recipe.steps(data.keys.shape[0]))

    def record(loss: float) -> None:
        losses.append(loss)
        tick(loss)

    w = train_layer(recipe, data, config.bits, config.seed + layer, record)
    simhash = random_projection(w.shape[0], w.shape[1], config.bits, config.seed + layer)
    result = LayerResult(
        layer,
        code_recall(w, held_out, budget),
        code_recall(simhash, held_out, budget),
        time.perf_counter() - started,
        losses[-1] if losses else float("nan"),
    )
    return w, result
