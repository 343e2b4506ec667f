"""Measure each stage of a model and turn the numbers into a Tessel placement.

Per stage, on the current device with the rank's thread count: forward time (the last stage
includes its loss), full backward, and the zero-bubble split into input gradient (I) and weight
gradient (W), each timed with the very functions torch's runtime calls (via the adapter); the
median of ``repeats`` runs after ``warmup``. Memory: the activation bytes autograd saves for
backward (unique storages, parameters excluded), the part of them that weight gradients still need
(inputs of parameterised layers), and parameters + gradients + AdamW state.

Two ways to measure: :func:`profile_stages` in the calling process, alone, and :func:`profile_in_ranks`,
where every rank of the job profiles the stages it will run at the same time as the others, so the
durations carry the memory-bandwidth and cache sharing of a real run (on the 2-core machine, blocks
profiled alone ran 1.1-1.4x slower in the 2-rank run).

The placement uses milliseconds and megabytes and the built-in shapes' block names (``f{s}``,
``b{s}``, ``i{s}``, ``w{s}``), so ``lmexec tessel search -p profiled.json`` reads it unchanged.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmexec.errors import UserError
from lmexec.tessel.block import Block, BlockKind
from lmexec.tessel.placement import Placement
from lmexec.tessel.runtime.pipelining_adapter import backward_functions
from lmexec.tessel.runtime.settings import PROFILE_SHAPES

MB = 2.0**20
OPTIMIZER_COPIES = 4  # parameters + gradients + AdamW's two moments
SHAPES = PROFILE_SHAPES
MIN_MS = 0.001  # a block must last > 0 (the first stage's I is empty)


@dataclass(frozen=True)
class StageProfile:
    """Medians in milliseconds, memory in megabytes, for one micro-batch through one stage."""

    stage: int
    forward_ms: float
    backward_ms: float
    input_grad_ms: float
    weight_grad_ms: float
    activation_mb: float  # kept from forward until backward
    weight_grad_mb: float  # the part of it kept until W (inputs of parameterised layers)
    param_mb: float
    static_mb: float  # params + grads + optimizer state

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _saved_bytes(module: nn.Module, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """Run a forward, counting bytes autograd saves (unique storages, parameters excluded) and the part
    that are inputs of parameterised leaf layers (still needed for weight gradients)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}
    layer_inputs: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def pre_hook(layer: nn.Module, args: tuple) -> None:
        for a in args:
            if isinstance(a, torch.Tensor):
                layer_inputs.add(a.untyped_storage().data_ptr())

    hooks = [
        m.register_forward_pre_hook(pre_hook)
        for m in module.modules()
        if not list(m.children()) and any(True for _ in m.parameters(recurse=False))
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
    finally:
        for h in hooks:
            h.remove()
    return out, sum(saved.values()), sum(b for ptr, b in saved.items() if ptr in layer_inputs)


def profile_stages(
    stages: list[nn.Module],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    warmup: int = 2,
    repeats: int = 5,
    threads: int | None = 1,
) -> list[StageProfile]:
    """Profile every stage on one micro-batch (``inputs``/``targets``); stage s+1 gets stage s's output."""
    if repeats < 1 or warmup < 0:
        raise UserError("profiling needs repeats >= 1 and warmup >= 0")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        out: list[StageProfile] = []
        x = inputs
        for s, module in enumerate(stages):
            out.append(_profile_one(s, module, x, targets, loss_fn, s == len(stages) - 1, warmup, repeats))
            with torch.no_grad():
                x = module(x)
        return out
    finally:
        torch.set_num_threads(old_threads)


@dataclass(frozen=True)
class ProfileJob:
    """What each rank needs to rebuild the model and profile its own stages (picklable)."""

    model: Any  # GPTConfig
    num_stages: int
    micro_batch_size: int = 2
    split: tuple[int, ...] | None = None
    seed: int = 0
    warmup: int = 2
    repeats: int = 5

    def build(self) -> tuple[list[nn.Module], torch.Tensor, torch.Tensor]:
        """The stages and the profiling batch (inputs, targets), rebuilt from the seed in any process."""
        from lmexec.tessel.runtime.model import build_gpt_stages, synthetic_batch

        stages = build_gpt_stages(self.model, self.num_stages, self.split, self.seed)
        return stages, *synthetic_batch(self.model, self.micro_batch_size, step=0, seed=self.seed)


def profile_in_ranks(ctx: Any, job: ProfileJob) -> list[StageProfile] | None:
    """Every rank profiles its stages (stage ``s`` on rank ``s mod world``) in lock-step rounds, all
    ranks at once; rank 0 returns the profiles of all stages in stage order, the others None."""
    from lmexec.tessel.runtime.model import lm_loss

    if job.repeats < 1 or job.warmup < 0:
        raise UserError("profiling needs repeats >= 1 and warmup >= 0")
    stages, x, targets = job.build()
    inputs = []
    with torch.no_grad():
        for module in stages:
            inputs.append(x)
            x = module(x)
    mine = []
    for round_start in range(0, job.num_stages, ctx.world):
        dist.barrier()  # every rank starts the round together: the others are busy meanwhile
        s = round_start + ctx.rank
        if s < job.num_stages:
            last = s == job.num_stages - 1
            mine.append(
                _profile_one(s, stages[s], inputs[s], targets, lm_loss, last, job.warmup, job.repeats)
            )
    gathered: list[Any] | None = [None] * ctx.world if ctx.rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if gathered is None:
        return None
    return sorted((p for part in gathered for p in part), key=lambda p: p.stage)


def _profile_one(s: int, module: nn.Module, x: torch.Tensor, targets: torch.Tensor, loss_fn: Callable,
                 last: bool, warmup: int, repeats: int) -> StageProfile:  # fmt: skip
    first = not x.is_floating_point()
    out_grad: torch.Tensor | None = None

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        inp = x if first else x.detach().requires_grad_(True)
        y = module(inp)
        return (loss_fn(y, targets) if last else y), inp

    times: dict[str, list[float]] = {"F": [], "B": [], "I": [], "W": []}
    for rep in range(warmup + repeats):
        keep = rep >= warmup
        t = time.perf_counter()
        y, inp = forward()
        elapsed = time.perf_counter() - t
        if out_grad is None and not last:
            out_grad = torch.randn_like(y) * 1e-3
        full, _, _ = backward_functions(module, y, out_grad, inp, first)
        t = time.perf_counter()
        full()
        b_time = time.perf_counter() - t
        y, inp = forward()
        _, i_fn, w_fn = backward_functions(module, y, out_grad, inp, first)
        t = time.perf_counter()
        i_fn()
        i_time = time.perf_counter() - t
        t = time.perf_counter()
        w_fn()
        w_time = time.perf_counter() - t
        module.zero_grad(set_to_none=True)
        if keep:
            for key, value in zip("FBIW", (elapsed, b_time, i_time, w_time), strict=True):
                times[key].append(value)
    y, act, w_keep = _saved_bytes(module, lambda: forward()[0])
    del y
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    return StageProfile(
        s,
        forward_ms=_median_ms(times["F"]),
        backward_ms=_median_ms(times["B"]),
        input_grad_ms=_median_ms(times["I"]),
        weight_grad_ms=_median_ms(times["W"]),
        activation_mb=act / MB,
        weight_grad_mb=w_keep / MB,
        param_mb=param_bytes / MB,
        static_mb=OPTIMIZER_COPIES * param_bytes / MB,
    )


def stage_count(shape: str, devices: int, chunks: int = 2) -> int:
    if shape not in SHAPES:
        raise UserError(f"profiled placements are {', '.join(SHAPES)}; got {shape!r}")
    return devices * chunks if shape == "interleaved" else devices


def _r(value: float) -> float:
    return round(max(value, MIN_MS), 3)


def profiled_placement(
    profiles: list[StageProfile], shape: str, devices: int, *, chunks: int = 2, capacity: float | None = None
) -> Placement:
    """A placement with the measured durations (ms) and memory (MB) for a built-in shape.

    vshape and zerobubble: stage s on device s; interleaved: ``chunks`` stages per device, stage s on
    device s mod D. Static memory per device: the parameters, gradients and optimizer state it holds.
    """
    n_stages = stage_count(shape, devices, chunks)
    if len(profiles) != n_stages:
        raise UserError(f"{shape} on {devices} devices needs {n_stages} stage profiles, got {len(profiles)}")
    device = [s % devices for s in range(n_stages)]
    forwards = [
        Block(f"f{s}", BlockKind.FORWARD, _r(p.forward_ms), round(p.activation_mb, 3), (device[s],),
              (f"f{s - 1}",) if s else ())
        for s, p in enumerate(profiles)
    ]  # fmt: skip
    blocks = list(forwards)
    prev = forwards[-1].name
    for s in reversed(range(n_stages)):
        p = profiles[s]
        act = round(p.activation_mb, 3)
        if shape == "zerobubble":
            keep = min(round(p.weight_grad_mb, 3), act)
            blocks.append(
                Block(
                    f"i{s}",
                    BlockKind.BACKWARD_INPUT,
                    _r(p.input_grad_ms),
                    -(act - keep),
                    (device[s],),
                    (prev,),
                )
            )
            prev = f"i{s}"
        else:
            blocks.append(Block(f"b{s}", BlockKind.BACKWARD, _r(p.backward_ms), -act, (device[s],), (prev,)))
            prev = f"b{s}"
    if shape == "zerobubble":
        for s in reversed(range(n_stages)):
            keep = min(round(profiles[s].weight_grad_mb, 3), round(profiles[s].activation_mb, 3))
            blocks.append(
                Block(
                    f"w{s}",
                    BlockKind.BACKWARD_WEIGHT,
                    _r(profiles[s].weight_grad_ms),
                    -keep,
                    (device[s],),
                    (f"i{s}",),
                )
            )
    static = [
        round(sum(p.static_mb for s, p in enumerate(profiles) if device[s] == d), 3) for d in range(devices)
    ]
    return Placement(
        f"{shape}-profiled", devices, tuple(blocks), capacity=capacity or (), static_memory=tuple(static)
    )
