"""Offline evaluation tasks with fixed seeds: ``passkey``, ``niah`` and ``lm``.

* ``passkey``: a 5-digit pass key stated once at a given depth of repeated filler sentences, asked for
  at the end; the prompt ends with "The pass key is" so the answer is the next tokens.
* ``niah``: a needle sentence ("The special magic number for <city> is: <7 digits>.") hidden at a
  depth of real prose (the English topics of ``pydoc_data.topics``, evaluation split of
  :mod:`lmexec.hata.texts`), asked for at the end.
* ``lm``: held-out prose (same split), a prefix of ``context`` tokens followed by teacher-forced tokens.

Prompts are built at the token level so that each one is at most ``context`` tokens long; nothing is
downloaded, and a (context, depth, seed) triple always gives the same prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from lmexec.errors import UserError

TASKS = ("passkey", "niah", "lm")
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
CITIES = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Dakar", "Bergen", "Cusco", "Hanoi")


@dataclass
class Sample:
    """One prompt: ``input_ids [T]`` and the expected answer string (empty for ``lm``)."""

    task: str
    context: int
    depth: float
    input_ids: torch.Tensor
    answer: str
    max_new_tokens: int
    targets: torch.Tensor | None = None
    """``lm`` only: the teacher-forced continuation ``[M]``."""

    @property
    def label(self) -> str:
        return f"{self.task}@{self.context} depth {self.depth:g}"


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _assemble(
    tokenizer: Any, head: str, haystack: list[int], needle: str, question: str, context: int, depth: float
) -> torch.Tensor:
    head_ids, needle_ids, question_ids = (
        _ids(tokenizer, head),
        _ids(tokenizer, needle),
        _ids(tokenizer, question),
    )
    room = context - len(head_ids) - len(needle_ids) - len(question_ids)
    if room < 16:
        raise UserError(
            f"context {context} is too short for the task prompt (needs > {context - room + 16} tokens)"
        )
    if len(haystack) < room:
        raise UserError(f"the haystack holds {len(haystack)} tokens, fewer than the {room} needed")
    hay = haystack[:room]
    cut = int(round(depth * room))
    return torch.tensor(head_ids + hay[:cut] + needle_ids + hay[cut:] + question_ids, dtype=torch.long)


def passkey_prompt(tokenizer: Any, context: int, depth: float = 0.5, seed: int = 0) -> Sample:
    """A pass key hidden at ``depth`` (0 = start, 1 = end) of filler; at most ``context`` tokens."""
    key = str(random.Random(f"passkey-{seed}-{context}-{depth}").randint(10000, 99999))
    unit = _ids(tokenizer, FILLER)
    haystack = unit * (context // max(1, len(unit)) + 2)
    head = "There is important information hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    needle = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    question = "\nWhat is the pass key? The pass key is"
    ids = _assemble(tokenizer, head, haystack, needle, question, context, depth)
    return Sample("passkey", context, depth, ids, key, max_new_tokens=len(key) + 2)


@lru_cache(maxsize=2)
def _prose_ids(tokenizer_id: int, tokenizer: Any, n_tokens: int) -> tuple[int, ...]:
    from lmexec.hata.texts import token_block

    return tuple(token_block(tokenizer, "prose", "evaluation", n_tokens).tolist())


def niah_prompt(tokenizer: Any, context: int, depth: float = 0.5, seed: int = 0) -> Sample:
    """A needle sentence at ``depth`` of Python's reference prose; at most ``context`` tokens."""
    rng = random.Random(f"niah-{seed}-{context}-{depth}")
    city = rng.choice(CITIES)
    number = str(rng.randint(1_000_000, 9_999_999))
    haystack = list(_prose_ids(id(tokenizer), tokenizer, context + 64))
    head = "A special magic number is hidden inside the following text. Make sure to memorize it.\n\n"
    needle = f"\nThe special magic number for {city} is: {number}.\n"
    question = f"\n\nWhat is the special magic number for {city}? The special magic number for {city} is:"
    ids = _assemble(tokenizer, head, haystack, needle, question, context, depth)
    return Sample("niah", context, depth, ids, number, max_new_tokens=len(number) + 2)


def lm_sample(tokenizer: Any, context: int, steps: int = 32, offset: int = 0) -> Sample:
    """``context`` tokens of held-out prose, then ``steps`` teacher-forced target tokens."""
    ids = torch.tensor(
        _prose_ids(id(tokenizer), tokenizer, offset + context + steps + 1)[offset:], dtype=torch.long
    )
    return Sample(
        "lm", context, 0.0, ids[:context], "", max_new_tokens=steps, targets=ids[context : context + steps]
    )


def make_samples(
    task: str,
    tokenizer: Any,
    context: int,
    depths: tuple[float, ...] = DEFAULT_DEPTHS,
    seed: int = 0,
    lm_steps: int = 32,
) -> list[Sample]:
    """The samples of one task at one context length."""
    if task == "passkey":
        return [passkey_prompt(tokenizer, context, d, seed) for d in depths]
    if task == "niah":
        return [niah_prompt(tokenizer, context, d, seed) for d in depths]
    if task == "lm":
        return [lm_sample(tokenizer, context, lm_steps)]
    raise UserError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")


def is_correct(sample: Sample, text: str) -> bool:
    """The answer appears in the generated text (digits compared after dropping spaces)."""
    return sample.answer in text.replace(" ", "")
