"""Training recipes: how one layer's ``W [H_kv, d, bits]`` is optimised from its :class:`LayerData`.

* ``paper``: the reference's recipe (labels 20..1 / -1, :func:`paper_loss`, SGD lr 0.1 momentum 0.9
  weight decay 1e-6, ``epochs x 20`` full-batch steps, ``W ~ N(0, 1)``), in fp32.
* ``rank`` (default): listwise distillation (:func:`ranking_loss`) with Adam, starting from the same
  Gaussian ``W`` (= SimHash) and sharpening the relaxed codes towards ``sign`` over the run.

Both are deterministic for a given ``seed`` (per layer the caller passes ``seed + layer``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from lmexec.errors import UserError
from lmexec.hata.codes import random_projection
from lmexec.hata.training.config import RECIPE_NAMES
from lmexec.hata.training.data import LayerData, paper_labels
from lmexec.hata.training.loss import PaperTargets, attention_targets, paper_loss, ranking_loss


@dataclass(frozen=True)
class Recipe:
    """Settings of one recipe; serialised into the weights file's metadata."""

    name: str
    epochs: int
    steps_per_epoch: int = 20
    lr: float = 0.1
    # paper
    top_frac: float = 0.1
    eps: float = 0.01
    lam: float = 1.0
    eta: float = 2.0
    sigma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-6
    # rank
    sharpness_start: float = 1.0
    sharpness_end: float = 4.0
    target_temperature: float = 1.0
    balance: float = 0.0
    straight_through: bool = True
    texts_per_step: int = 0
    """Mini-batch of calibration texts per step (0: full batch); an epoch visits every text once."""

    def steps(self, texts: int) -> int:
        """Optimiser steps on ``texts`` calibration texts."""
        if self.texts_per_step:
            return self.epochs * -(-texts // self.texts_per_step)
        return self.epochs * self.steps_per_epoch

    def describe(self) -> dict[str, str]:
        return {key: str(value) for key, value in asdict(self).items()}


RECIPES = {
    "paper": Recipe("paper", epochs=15),
    "rank": Recipe("rank", epochs=20, lr=0.05, texts_per_step=2),
}
assert set(RECIPES) == set(RECIPE_NAMES), "keep config.RECIPE_NAMES in step with RECIPES"


def get_recipe(name: str, epochs: int | None = None) -> Recipe:
    """The named recipe, with ``epochs`` overridden when given."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    if epochs is not None:
        if epochs < 1:
            raise UserError(f"--epochs must be >= 1, got {epochs}")
        recipe = Recipe(**{**asdict(recipe), "epochs": epochs})
    return recipe


Tick = Callable[[float], None]
"""Progress callback, called once per optimiser step with the current loss."""


def train_layer(
    recipe: Recipe, data: LayerData, bits: int, seed: int, tick: Tick | None = None
) -> torch.Tensor:
    """Optimise one layer's ``W [H_kv, d, bits]`` (fp32) with ``recipe``; deterministic given ``seed``."""
    h_kv, d = data.keys.shape[1], data.keys.shape[3]
    w0 = random_projection(h_kv, d, bits, seed)
    if recipe.name == "paper":
        return _train_paper(recipe, data, w0, tick)
    return _train_rank(recipe, data, w0, seed, tick)


def _train_paper(recipe: Recipe, data: LayerData, w0: torch.Tensor, tick: Tick | None) -> torch.Tensor:
    targets = PaperTargets.build(paper_labels(data.raw_scores(), data.valid(), recipe.top_frac), data)
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    for _ in range(recipe.steps(data.keys.shape[0])):
        opt.zero_grad()
        loss = paper_loss(w, data, targets, recipe.eps, recipe.lam, recipe.eta, recipe.sigma).total
        loss.backward()
        opt.step()
        if tick:
            tick(loss.item())
    return w.detach()


def _text_batches(texts: int, size: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """Per epoch a seeded permutation of the texts cut into batches of ``size``."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(epochs):
        batches.extend(torch.randperm(texts, generator=generator).split(size))
    return batches


def _train_rank(
    recipe: Recipe, data: LayerData, w0: torch.Tensor, seed: int, tick: Tick | None
) -> torch.Tensor:
    targets = attention_targets(data, recipe.target_temperature)
    w = w0.clone().requires_grad_(True)
    log_tau = torch.tensor(3.0, requires_grad=True)
    opt = torch.optim.Adam([w, log_tau], lr=recipe.lr)
    texts = data.keys.shape[0]
    steps = recipe.steps(texts)
    batches = _text_batches(texts, recipe.texts_per_step or texts, recipe.epochs, seed)
    for step in range(steps):
        frac = step / max(1, steps - 1)
        sharpness = recipe.sharpness_start + frac * (recipe.sharpness_end - recipe.sharpness_start)
        pick = batches[step % len(batches)]
        opt.zero_grad()
        loss = ranking_loss(
            w, data.select(pick), targets[pick], log_tau, sharpness, recipe.straight_through, recipe.balance
        )
        loss.backward()
        opt.step()
        if tick:
            tick(loss.item())
    w = w.detach()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
