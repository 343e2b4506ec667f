"""Real text that every Python installation ships, split into disjoint calibration and evaluation sets.

* ``prose``: the English reference topics of ``pydoc_data.topics`` (about 465K characters);
* ``code``: the top-level modules of the standard library (``<stdlib>/*.py``).

Distinct documents are split deterministically by a CRC of their text (even -> evaluation, odd ->
calibration; some pydoc topics repeat under two names, so the split is by content, not by name),
so methods calibrated on one split (Loki's PCA, HATA's training) never see the text they are measured
on. Nothing is downloaded.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path
from typing import Any

import torch

from lmexec.errors import UserError

KINDS = ("prose", "code")
SPLITS = ("calibration", "evaluation")


def _prose() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def _code() -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    return [(f.name, f.read_text(encoding="utf-8", errors="replace")) for f in files]


def documents(kind: str, split: str) -> list[str]:
    """The documents of one kind and split, in a fixed order."""
    if kind not in KINDS:
        raise UserError(f"unknown text kind {kind!r}: use one of {', '.join(KINDS)}")
    if split not in SPLITS:
        raise UserError(f"unknown text split {split!r}: use one of {', '.join(SPLITS)}")
    docs = _prose() if kind == "prose" else _code()
    want = 0 if split == "evaluation" else 1
    distinct = list(dict.fromkeys(text for _, text in docs))
    return [text for text in distinct if zlib.crc32(text.encode()) % 2 == want]


def token_block(tokenizer: Any, kind: str, split: str, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` token ids of the split's documents joined by blank lines -> ``[n_tokens]``."""
    ids: list[int] = []
    for text in documents(kind, split):
        ids.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            return torch.tensor(ids[:n_tokens], dtype=torch.long)
    raise UserError(
        f"the {split} {kind} text holds only {len(ids)} tokens, fewer than the {n_tokens} asked for"
    )
