"""One call that turns a transformers causal LM into a HATA decoder: :func:`enable`.

    handle = lmexec.hata.enable(model, budget=1/16)          # learned weights shipped for SmolLM2
    out = model.generate(**inputs, cache=handle.cache())     # or handle.generate(**inputs)

``enable`` validates everything up front (model family, budget, weights against the model's shape),
registers the ``hata`` attention + mask functions and switches the model to them with the public
``model.set_attn_implementation``. Decoding only goes sparse with a :class:`HataCache` (a fresh one per
``generate`` call, from :meth:`HataHandle.cache`); without one the model decodes densely.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmexec.errors import UserError
from lmexec.hata.budget import Budget
from lmexec.hata.codes import check_bits
from lmexec.hata.hf.attention import register
from lmexec.hata.hf.cache import HataCache, HataSettings
from lmexec.hata.selection import METHODS, Hata, SelectionMethod, SimHash
from lmexec.hata.weights import default_weights

DEFAULT_BITS = 128  # the paper's code width, and the shipped weights'

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
"""``config.model_type`` values whose attention layers follow the q/k/v -> RoPE -> cache -> interface path."""


@dataclass(frozen=True)
class ModelShape:
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int


def model_shape(model: Any) -> ModelShape:
    """The attention geometry of ``model``; UserError for a family this integration does not support."""
    return config_shape(getattr(model, "config", None))


def config_shape(config: Any) -> ModelShape:
    """:func:`model_shape` from a transformers config alone (checked before any weight is loaded)."""
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise UserError(
            f"model family {family!r} is not supported by the HATA integration; supported: "
            f"{', '.join(SUPPORTED_FAMILIES)} (Llama-architecture models such as SmolLM2, Mistral, Qwen2)"
        )
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        # Mistral's window is on whenever sliding_window is set; Qwen2's only with use_sliding_window
        raise UserError(
            f"{family} with a sliding attention window is not supported (the selection would pick keys the "
            "window hides); set sliding_window=None (Qwen2: use_sliding_window=False)"
        )
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return ModelShape(family, config.num_hidden_layers, n_heads, n_kv, head_dim)


def default_weights_file(model: Any, bits: int | None = None) -> Path | None:
    """The learned projections shipped for this model (``hata/data/<name>-<bits>.safetensors``, ``bits``
    default 128), if any."""
    bits = DEFAULT_BITS if bits is None else bits
    return default_weights(str(getattr(model.config, "name_or_path", "") or ""), bits)


def make_method(
    method: str | SelectionMethod,
    shape: ModelShape,
    dense_layers: int,
    weights: str | Path | dict[int, torch.Tensor] | None = None,
    bits: int | None = None,
    model: Any = None,
) -> SelectionMethod:
    """A selection method instance by name (``hata`` loads and checks its weights).

    ``bits`` (default 128) is SimHash's width and picks the shipped file; a weights file given with
    explicit ``bits`` must hold that width, and without them its own width is used."""
    if isinstance(method, SelectionMethod):
        if weights is not None:
            raise UserError("pass weights inside the method instance, not beside it")
        if isinstance(method, Hata):  # its projections are checked against the model like a file's
            _check_layers(method, shape, dense_layers)
        method.check_model(shape.n_kv_heads, shape.head_dim)
        return method
    if method not in METHODS:
        raise UserError(f"unknown selection method {method!r}: use one of {', '.join(METHODS)}")
    if method != "hata":
        if weights is not None:
            raise UserError(f"weights only apply to method 'hata', not {method!r}")
        return (
            SimHash(bits=DEFAULT_BITS if bits is None else bits) if method == "simhash" else METHODS[method]()
        )
    if weights is None:
        weights = default_weights_file(model, bits) if model is not None else None
        if weights is None:
            raise UserError(
                "method 'hata' needs learned hash weights: pass weights=FILE (on the command line "
                "--hata-weights FILE; files come from `lmexec hata train`) or use method simhash"
            )
    if isinstance(weights, str | Path):
        from lmexec.hata.weights import load_for_model, load_hash_weights

        weights = (  # a file for another model or bit width is refused, never silently used
            load_for_model(weights, model.config, bits)
            if model is not None
            else load_hash_weights(weights, shape.n_layers, shape.n_kv_heads, shape.head_dim, bits)
        )
    if not isinstance(weights, dict):
        raise UserError(f"weights must be a file path or {{layer: tensor}}, got {type(weights).__name__}")
    hata = Hata(
        dict(weights), bits=0 if bits is None else check_bits(bits)
    )  # explicit bits must match the projections' width
    _check_layers(hata, shape, dense_layers)
    return hata


def _check_layers(hata: Hata, shape: ModelShape, dense_layers: int) -> None:
    """Every sparse layer has a projection of the model's shape (the error names the mismatch)."""
    weights = hata.weights
    every_layer = isinstance(weights, torch.Tensor)  # one W for every layer
    missing = (
        []
        if every_layer
        else [layer for layer in range(dense_layers, shape.n_layers) if layer not in weights]
    )
    if missing:
        raise UserError(
            f"hash weights have no projection for sparse layer(s) {missing[:8]} (dense_layers={dense_layers})"
        )
    for layer in range(dense_layers, shape.n_layers):
        hata.projection(layer, shape.n_kv_heads, shape.head_dim)


@dataclass
class HataHandle:
    """What :func:`enable` returns: a factory of caches for ``generate`` plus the settings."""

    model: Any
    shape: ModelShape
    method: SelectionMethod
    budget: Budget
    dense_layers: int
    capacity: int = 0
    record_recall: bool = False
    previous_attention: str | None = None

    def settings(self, method: SelectionMethod | None = None, budget: Budget | None = None) -> HataSettings:
        """Fresh per-cache settings (the method is copied: Loki fits its basis per prompt)."""
        return HataSettings(
            method=copy.deepcopy(method or self.method),
            budget=budget or self.budget,
            dense_layers=self.dense_layers,
            capacity=self.capacity,
            record_recall=self.record_recall,
        )

    def cache(self) -> HataCache:
        """A new, empty cache for one ``generate`` call (``generate(..., cache=handle.cache())``)."""
        return HataCache(self.settings(), self.shape.n_layers)

    def generate_kwargs(self) -> dict[str, Any]:
        return {"cache": self.cache()}

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` with a fresh HATA cache, unless one is passed (``cache=`` or
        ``past_key_values=``)."""
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs["cache"] = self.cache()
        return self.model.generate(*args, **kwargs)

    def disable(self) -> None:
        """Switch the model back to the attention implementation it had."""
        self.model.set_attn_implementation(self.previous_attention or "sdpa")


def make_budget(budget: float | Budget, sink: int = 0, recent: int = 1) -> Budget:
    return budget if isinstance(budget, Budget) else Budget(budget, sink, recent)


def enable(
    model: Any,
    weights: str | Path | dict[int, torch.Tensor] | None = None,
    budget: float | Budget = 0.0625,
    dense_layers: int = 2,
    method: str | SelectionMethod = "hata",
    sink: int = 0,
    recent: int = 1,
    bits: int | None = None,
    capacity: int = 0,
    record_recall: bool = False,
) -> HataHandle:
    """Make ``model`` decode with top-k sparse attention chosen by ``method``.

    ``budget`` is a ratio of the context (< 1) or a token count (>= 1); ``sink``/``recent`` tokens are
    always attended and count inside it. The first ``dense_layers`` layers stay dense. ``weights`` (a
    file from ``lmexec hata train`` or ``{layer: W [H_kv, d, bits]}``) is for ``method='hata'``;
    without it the file shipped for the model is used (SmolLM2). ``bits`` (default 128) is the code
    width of ``simhash`` and of the shipped file; a weights file must hold it when it is given. Returns a :class:`HataHandle`; pass
    ``handle.cache()`` to ``generate`` as ``cache=`` (or ``past_key_values=``).
    """
    shape = model_shape(model)
    if (
        isinstance(dense_layers, bool)
        or not isinstance(dense_layers, int)
        or not 0 <= dense_layers <= shape.n_layers
    ):
        raise UserError(
            f"dense_layers must be a whole number between 0 and {shape.n_layers}, got {dense_layers!r}"
        )
    budget_obj = make_budget(budget, sink, recent)
    selection = make_method(method, shape, dense_layers, weights, bits, model)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise UserError(
            f"capacity must be a whole number of tokens >= 0 (0: grow as needed), got {capacity!r}"
        )
    previous = getattr(model.config, "_attn_implementation", None)
    name = register()
    if previous != name:
        model._lmexec_attention_before = previous  # what disable() restores, however often enable() runs
        model.set_attn_implementation(name)
    return HataHandle(
        model=model,
        shape=shape,
        method=selection,
        budget=budget_obj,
        dense_layers=dense_layers,
        capacity=capacity,
        record_recall=record_recall,
        previous_attention=getattr(model, "_lmexec_attention_before", None),
    )
