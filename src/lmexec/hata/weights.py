"""Hash projection files: one safetensors tensor ``layers.{l}.hash_weight [H_kv, d, bits]`` per sparse layer.

Metadata (strings, as safetensors requires): ``format`` = ``lmexec-hata-weights``, ``bits``,
``bit_order_version``, ``n_layers``, ``n_kv_heads``, ``head_dim`` and optionally ``model``,
``dense_layers``, ``model_config`` (:func:`model_signature`: architecture and shapes, so a file made for
one model is refused by another of the same head shape), ``recipe`` and ``training`` (JSON of the
training settings) and ``validation`` (JSON of held-out recall). Loading checks every field it is given
against the model and fails with a UserError naming the mismatch; files without the optional fields
(older ones) still load. The trainer (``lmexec hata train``) writes these files; trained weights for
the default model ship in ``hata/data/`` (:func:`default_weights`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lmexec.errors import UserError
from lmexec.hata.codes import BIT_ORDER_VERSION, check_bits, check_projection

FORMAT = "lmexec-hata-weights"
_NAME = re.compile(r"^layers\.(\d+)\.hash_weight$")
DATA_DIR = Path(__file__).with_name("data")
SHIPPED = {("smollm2", 128): "smollm2-128.safetensors"}
"""Weights shipped in the package: (model name, bits) -> file in ``hata/data``."""


def default_weights(model: str, bits: int) -> Path | None:
    """The shipped weights file for ``model`` (a name like ``smollm2``, or a model folder whose name
    holds one, e.g. our converted copy) at ``bits``, or None when there is none."""
    folder = Path(str(model)).name.lower()
    for name, file_bits in SHIPPED:
        if file_bits == bits and (folder == name or name in folder):
            path = DATA_DIR / SHIPPED[(name, file_bits)]
            return path if path.is_file() else None
    return None


def model_signature(config: Any) -> str:
    """Architecture and the shapes that decide q/k (a transformers config) as one comparable string."""
    h_q = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // h_q
    arch = config.model_type  # not ``architectures``: a converted GGUF config has none, a Hub one has it
    rope = getattr(config, "rope_theta", None)
    if rope is None:
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    return (
        f"{arch} layers={config.num_hidden_layers} hidden={config.hidden_size} heads={h_q} "
        f"kv_heads={config.num_key_value_heads} head_dim={head_dim} vocab={config.vocab_size} rope_theta={rope}"
    )


def _same_model(made_for: str, signature: str, aliases: tuple[str, ...]) -> bool:
    """Equal shapes, and the file's architecture is the model's type or one of its other names."""
    file_arch, _, file_shapes = made_for.partition(" ")
    arch, _, shapes = signature.partition(" ")
    return file_shapes == shapes and (file_arch == arch or file_arch in aliases)


def tensor_name(layer: int) -> str:
    return f"layers.{layer}.hash_weight"


def save_hash_weights(
    path: str | Path,
    weights: Mapping[int, torch.Tensor],
    n_layers: int,
    model: str = "",
    dense_layers: int = 0,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write per-layer projections with the metadata :func:`load_hash_weights` checks."""
    from safetensors.torch import save_file

    if not weights:
        raise UserError("no hash projections to save")
    first = next(iter(weights.values()))
    n_kv_heads, head_dim, bits = first.shape
    tensors = {
        tensor_name(layer): check_projection(w, n_kv_heads, head_dim, bits).contiguous()
        for layer, w in weights.items()
    }
    metadata = {
        "format": FORMAT,
        "bits": str(bits),
        "bit_order_version": str(BIT_ORDER_VERSION),
        "n_layers": str(n_layers),
        "n_kv_heads": str(n_kv_heads),
        "head_dim": str(head_dim),
        "model": model,
        "dense_layers": str(dense_layers),
        **(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_hash_weights(
    path: str | Path,
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    bits: int | None = None,
    signature: str | None = None,
    aliases: tuple[str, ...] = (),
) -> dict[int, torch.Tensor]:
    """Read and validate a projection file -> ``{layer: W [H_kv, d, bits]}`` (fp32).

    ``signature`` (:func:`model_signature` of the model) is compared with the file's ``model_config``
    when both exist; ``aliases`` are other names of the model's architecture (its ``architectures``),
    which files written before the signature used ``model_type`` may name instead.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"hash weights file {path} does not exist (weights come from `lmexec hata train`)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises several types for damaged files
        raise UserError(f"hash weights file {path} is not a readable safetensors file: {error}") from None
    if metadata.get("format") != FORMAT:
        raise UserError(
            f"{path} is not an lmexec HATA weights file (metadata format={metadata.get('format')!r})"
        )
    try:
        file_bits = int(metadata.get("bits", ""))
    except ValueError:
        raise UserError(
            f"hash weights {path}: metadata bits={metadata.get('bits')!r} is not a bit width"
        ) from None
    expected = {"n_layers": n_layers, "n_kv_heads": n_kv_heads, "head_dim": head_dim}
    if bits is not None and metadata.get("bits") != str(check_bits(bits)):
        raise UserError(
            f"hash weights {path} hold {metadata.get('bits')}-bit codes, but {bits} bits were asked for: "
            "ask for the file's bit width (bits=, on the command line --bits)"
        )
    for key, value in expected.items():
        if metadata.get(key) != str(value):
            raise UserError(
                f"hash weights {path} were made for {key}={metadata.get(key)}, but the model has {key}={value}"
            )
    made_for = metadata.get("model_config")
    if signature is not None and made_for and not _same_model(made_for, signature, aliases):
        raise UserError(
            f"hash weights {path} were trained for another model ({made_for}); this model is "
            f"{signature}. Train weights for it with `lmexec hata train --model ...`"
        )
    if metadata.get("bit_order_version") != str(BIT_ORDER_VERSION):
        raise UserError(
            f"hash weights {path} use bit order version {metadata.get('bit_order_version')}, expected {BIT_ORDER_VERSION}"
        )
    weights: dict[int, torch.Tensor] = {}
    for name, tensor in tensors.items():
        match = _NAME.match(name)
        if not match or int(match.group(1)) >= n_layers:
            raise UserError(f"hash weights {path} hold an unexpected tensor {name!r}")
        weights[int(match.group(1))] = check_projection(tensor, n_kv_heads, head_dim, file_bits)
    if not weights:
        raise UserError(f"hash weights {path} hold no layers")
    return weights


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a weights file (no validation), e.g. to show its training recipe."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:
        raise UserError(f"hash weights file {path} is not a readable safetensors file: {error}") from None


def load_for_model(path: str | Path, config: Any, bits: int | None = None) -> dict[int, torch.Tensor]:
    """:func:`load_hash_weights` with every check taken from a transformers ``config``."""
    h_q = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // h_q
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    aliases = (
        ",".join(getattr(config, "architectures", None) or []),
        str(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "")),
    )
    return load_hash_weights(
        path,
        config.num_hidden_layers,
        config.num_key_value_heads,
        head_dim,
        bits,
        model_signature(config),
        aliases,
    )
