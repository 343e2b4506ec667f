"""HATA: hash-aware top-k attention for LLM decoding (Gong et al., ACL Findings 2025).

Modules: ``codes`` (hash codes, Hamming), ``budget``, ``cache`` (in-place K/V/code buffers),
``selection`` (dense, oracle, simhash, hata, loki, quest, sparq), ``attention`` (sparse decode
attention), ``metrics``, ``weights``, ``models`` (SmolLM2, offline), ``capture``, ``texts``,
``fidelity`` and ``cli``. See docs/hata.md. Submodules are imported on use so the CLI starts fast.
"""

__all__ = ["enable"]


def __getattr__(name: str):
    """``lmexec.hata.enable`` without importing transformers at package import time."""
    if name == "enable":
        from lmexec.hata.hf.enable import enable

        return enable
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
