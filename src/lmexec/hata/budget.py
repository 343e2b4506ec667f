"""How many keys a decode step may attend to, and which ones are always kept.

A budget below 1 is a ratio of the current context (``k = floor(n * ratio)``); a budget of 1 or more
is an absolute token count (``k = min(budget, n)``), as in the HATA reference. The first ``sink``
tokens and the last ``recent`` tokens are always selected and count *inside* the budget; the default
``recent = 1`` keeps the current token in its own attention (the reference's sink = recent = 0 can
drop it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmexec.errors import UserError


@dataclass(frozen=True)
class Budget:
    """Selection budget: ``value`` (ratio < 1 or token count >= 1) plus forced sink/recent windows."""

    value: float
    sink: int = 0
    recent: int = 1

    def __post_init__(self) -> None:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UserError(f"budget must be a finite number, got {value!r}")
        if value <= 0:
            raise UserError(
                f"budget must be > 0 (a ratio below 1 or a token count of 1 or more), got {value}"
            )
        if value >= 1 and value != int(value):
            raise UserError(f"a budget of 1 or more is a token count and must be a whole number, got {value}")
        for name in ("sink", "recent"):
            count = getattr(self, name)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise UserError(f"{name} must be a whole number >= 0, got {count!r}")
        if value >= 1 and self.sink + self.recent > value:
            raise UserError(
                f"sink ({self.sink}) + recent ({self.recent}) tokens count inside the budget "
                f"and exceed it ({int(value)})"
            )

    @property
    def is_ratio(self) -> bool:
        return self.value < 1

    def tokens(self, context: int) -> int:
        """Number of keys selected at a context of ``context`` tokens (at least 1, at most ``context``)."""
        if context <= 0:
            raise UserError(f"context must hold at least one token, got {context}")
        k = math.floor(context * self.value) if self.is_ratio else int(self.value)
        k = max(k, 1, min(self.sink + self.recent, context))
        return min(k, context)

    def forced_mask(self, context: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool ``[context]``: True at the sink and recent positions."""
        positions = torch.arange(context, device=device)
        return (positions < self.sink) | (positions >= context - self.recent)

    def describe(self) -> str:
        kind = f"{self.value:g} of the context" if self.is_ratio else f"{int(self.value)} tokens"
        return f"{kind}, sink {self.sink}, recent {self.recent}"


def parse_budget(text: str) -> float:
    """Parse a CLI budget (``256`` or ``0.0625``); the Budget constructor checks the range."""
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"budget must be a number (a ratio below 1 or a token count), got {text!r}") from None
    if not math.isfinite(value):
        raise UserError(f"budget must be a finite number (a ratio below 1 or a token count), got {text!r}")
    return int(value) if value >= 1 and value == int(value) else value
