"""Hash projection files: one safetensors tensor ``layers.{l}.hash_weight [H_kv, d, bits]`` per sparse layer.

Metadata (strings, as safetensors requires): ``format`` = ``lmexec-hata-weights``, ``bits``,
``bit_order_version``, ``n_layers``, ``n_kv_heads``, ``head_dim`` and optionally ``model`` and
``dense_layers``. Loading checks every field against the model and fails with a UserError naming the
mismatch; the trainer (``lmexec hata train``, issue 5) writes these files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from lmexec.errors import UserError
from lmexec.hata.codes import BIT_ORDER_VERSION, check_bits, check_projection

FORMAT = "lmexec-hata-weights"
_NAME = re.compile(r"^layers\.(\d+)\.hash_weight$")


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
    path: str | Path, n_layers: int, n_kv_heads: int, head_dim: int, bits: int | None = None
) -> dict[int, torch.Tensor]:
    """Read and validate a projection file -> ``{layer: W [H_kv, d, bits]}`` (fp32)."""
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
    expected = {"n_layers": n_layers, "n_kv_heads": n_kv_heads, "head_dim": head_dim}
    if bits is not None:
        expected["bits"] = check_bits(bits)
    for key, value in expected.items():
        if metadata.get(key) != str(value):
            raise UserError(
                f"hash weights {path} were made for {key}={metadata.get(key)}, but the model has {key}={value}"
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
        weights[int(match.group(1))] = check_projection(tensor, n_kv_heads, head_dim, int(metadata["bits"]))
    if not weights:
        raise UserError(f"hash weights {path} hold no layers")
    return weights
