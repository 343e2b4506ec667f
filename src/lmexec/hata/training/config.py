"""``lmexec hata train``'s settings: the dataclass that decides the trained weights, apart from the
training code so that building the CLI parser does not import torch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from lmexec.errors import UserError, check_seed

if TYPE_CHECKING:
    from lmexec.hata.training.recipes import Recipe

TRAINER_VERSION = 1
DEFAULT_RECIPE = "rank"
RECIPE_NAMES = ("paper", "rank")
"""The recipes in :data:`lmexec.hata.training.recipes.RECIPES` (checked equal there)."""


@dataclass
class TrainConfig:
    """Everything that decides the trained weights (hashed into the resume fingerprint)."""

    model: str = "smollm2"
    bits: int = 128
    recipe: str = DEFAULT_RECIPE
    epochs: int | None = None
    texts: int = 6
    """Calibration texts (blocks of ``context`` tokens, alternating prose and code)."""
    context: int = 4096
    """Post-RoPE codes depend on position: train at (at least) the longest context you will run."""
    positions: int = 96
    """Query positions sampled per calibration text, uniformly in the last 3/4 of it."""
    dense_layers: int = 2
    seed: int = 0
    val_context: int = 2048
    val_positions: int = 16
    val_budget: float = 128
    threads: int = 2

    def validate(self) -> Recipe:
        from lmexec.hata.budget import Budget
        from lmexec.hata.codes import check_bits
        from lmexec.hata.training.recipes import get_recipe

        check_seed(self.seed)
        check_bits(self.bits)
        recipe = get_recipe(self.recipe, self.epochs)
        for name in ("texts", "context", "positions", "val_context", "val_positions", "threads"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.context < 64 or self.val_context < 64:
            raise UserError("--context and --val-context must be at least 64 tokens")
        if self.positions > self.context - self.context // 4:
            raise UserError(
                f"--positions must be at most {self.context - self.context // 4} for --context {self.context}"
            )
        if self.val_positions > self.val_context // 4:
            raise UserError(f"--val-positions must be at most {self.val_context // 4}")
        if self.dense_layers < 0:
            raise UserError(f"--dense-layers must be >= 0, got {self.dense_layers}")
        Budget(self.val_budget, 0, 1)
        return recipe

    def fingerprint(self) -> str:
        """Equal for equal settings: a whole-number budget given as 128.0 (``--val-budget``) is 128."""
        data = {**asdict(self), "trainer_version": TRAINER_VERSION}
        if float(self.val_budget).is_integer():
            data["val_budget"] = int(self.val_budget)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
