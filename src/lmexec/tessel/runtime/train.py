"""The per-rank training loop, the single-process reference, and what a run reports.

One :class:`TrainJob` runs several schedules in the same processes, taking turns step by step (so
they are compared on the same machine state): for each, every rank rebuilds the model from the seed,
keeps its stages, and trains ``steps`` steps with AdamW. Each step starts after a barrier; compute
actions are timed relative to that common start, which gives the measured per-rank timeline.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmexec.tessel.runtime.launcher import RankContext
from lmexec.tessel.runtime.model import GPTConfig, build_gpt_stages, lm_loss, synthetic_batch
from lmexec.tessel.runtime.pipelining_adapter import Actions, PipelineRun

StageFactory = Callable[[int], list[nn.Module]]  # num_stages -> stage modules (same weights everywhere)


@dataclass(frozen=True)
class RunSpec:
    """One schedule to execute: its label, per-rank compute-only actions and stage count."""

    name: str
    actions: Actions
    num_stages: int


@dataclass(frozen=True)
class TrainJob:
    """Everything a rank needs (picklable: it crosses the spawn boundary)."""

    model: GPTConfig
    runs: tuple[RunSpec, ...]
    micro_batches: int
    micro_batch_size: int = 2
    steps: int = 10
    seed: int = 0
    lr: float = 1e-3
    split: tuple[int, ...] | None = None
    stage_factory: StageFactory | None = None  # user stages instead of the GPT
    capture_grads: bool = False  # return gradients after step 0 (correctness tests)
    fault: tuple[int, str, int] | None = None  # (rank, "raise" | "kill", step): test hook

    @property
    def batch(self) -> int:
        return self.micro_batches * self.micro_batch_size

    def stages(self, num_stages: int) -> list[nn.Module]:
        if self.stage_factory is not None:
            return self.stage_factory(num_stages)
        return build_gpt_stages(self.model, num_stages, self.split, self.seed)

    def data(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return synthetic_batch(self.model, self.batch, step, self.seed)


@dataclass
class RunResult:
    """What one schedule did, merged over ranks (times in milliseconds)."""

    name: str
    losses: list[float]  # mean loss per step
    step_ms: list[float]  # barrier-to-barrier (pipeline + optimizer), slowest rank
    pipeline_ms: list[float]  # the pipeline step() alone, slowest rank
    makespan_ms: list[float]  # first compute start to last compute end, all ranks
    events: list[list[dict[str, Any]]]  # per step: {rank, stage, kind, micro_batch, start, end} (ms)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def steady(values: Sequence[float]) -> float:
        """Median after the first (warm-up: shape inference, allocator) step."""
        rest = list(values[1:]) or list(values)
        return statistics.median(rest)

    def steady_step(self) -> int:
        """Index of the step whose makespan is the steady median (for pictures)."""
        if len(self.makespan_ms) == 1:
            return 0
        target = self.steady(self.makespan_ms)
        return min(range(1, len(self.makespan_ms)), key=lambda i: abs(self.makespan_ms[i] - target))


def _owned(actions: Actions, rank: int) -> list[int]:
    return sorted({int(a[: len(a) - len(a.lstrip("0123456789"))]) for a in actions[rank]})


def train_worker(ctx: RankContext, job: TrainJob) -> list[RunResult] | None:
    """Run every schedule of ``job`` on this rank; rank 0 returns the merged results.

    The schedules take turns step by step (step 0 of each, then step 1 of each, ...), and who goes first
    rotates with the step: run one after the other, the first paid for the process warming up and each
    saw a different stretch of a shared machine's load (two runs of the very same order measured 18%
    apart that way); in a fixed turn order, the same order still ran 12% slower right after GPipe's
    step (which frees the most memory). Each keeps its own model copy and optimizer.
    """
    torch.manual_seed(job.seed)
    lanes = []  # per schedule: (pipeline run, optimizer, {owned stage: module}, record)
    for spec in job.runs:
        stages = job.stages(spec.num_stages)
        modules = {s: stages[s] for s in _owned(spec.actions, ctx.rank)}
        run = PipelineRun(
            modules, spec.num_stages, job.micro_batches, spec.actions, lm_loss, ctx.device, ctx.rank
        )
        record: dict[str, Any] = {"losses": [], "step": [], "pipe": [], "events": [], "grads": {}}
        lanes.append((run, torch.optim.AdamW(run.parameters(), lr=job.lr), modules, record))
    for step in range(job.steps):
        inputs, targets = job.data(step)
        if job.fault is not None and job.fault[0] == ctx.rank and job.fault[2] == step:
            _inject(job.fault[1], ctx.rank)
        for i in range(len(lanes)):
            run, optimizer, modules, record = lanes[(step + i) % len(lanes)]  # who goes first rotates
            dist.barrier()
            t0 = time.perf_counter()
            losses = run.step(inputs, targets, t0)
            t_pipe = time.perf_counter() - t0
            if job.capture_grads and step == 0:
                record["grads"] = {
                    f"{s}.{n}": p.grad.detach().clone()
                    for s, module in modules.items()
                    for n, p in module.named_parameters()
                    if p.grad is not None
                }
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            record["step"].append(time.perf_counter() - t0)
            record["pipe"].append(t_pipe)
            record["losses"].append(sum(losses) / len(losses) if losses else None)
            record["events"].append(
                [(ctx.rank, e.stage, e.kind, e.micro_batch, e.start, e.end) for e in run.events]
            )
    mine = [record for *_, record in lanes]
    del lanes
    gathered: list[list[dict[str, Any]]] | None = [None] * ctx.world if ctx.rank == 0 else None  # type: ignore[list-item]
    dist.gather_object(mine, gathered, dst=0)
    if ctx.rank != 0:
        return None
    return [_merge(spec.name, [g[i] for g in gathered], job.steps) for i, spec in enumerate(job.runs)]  # type: ignore[union-attr]


def _inject(mode: str, rank: int) -> None:
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault on rank {rank}")


def _merge(name: str, per_rank: list[dict[str, Any]], steps: int) -> RunResult:
    losses = [
        next((r["losses"][i] for r in per_rank if r["losses"][i] is not None), float("nan"))
        for i in range(steps)
    ]
    events, makespan = [], []
    for i in range(steps):
        step_events = [
            {"rank": r, "stage": s, "kind": k, "micro_batch": m, "start": a * 1e3, "end": b * 1e3}
            for rec in per_rank
            for (r, s, k, m, a, b) in rec["events"][i]
        ]
        events.append(sorted(step_events, key=lambda e: (e["rank"], e["start"])))
        makespan.append(max(e["end"] for e in step_events) - min(e["start"] for e in step_events))
    grads: dict[str, torch.Tensor] = {}
    for rec in per_rank:
        grads.update(rec["grads"])
    return RunResult(
        name,
        losses,
        [max(r["step"][i] for r in per_rank) * 1e3 for i in range(steps)],
        [max(r["pipe"][i] for r in per_rank) * 1e3 for i in range(steps)],
        makespan,
        events,
        grads,
    )


def reference_step(job: TrainJob, num_stages: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Single-process loss and gradients of step 0 on the whole batch (no micro-batches): the mean
    loss over equal micro-batches equals the whole-batch mean, so the pipeline must reproduce it."""
    stages = job.stages(num_stages)
    h, targets = job.data(0)
    for stage in stages:
        h = stage(h)
    loss = lm_loss(h, targets)
    loss.backward()
    grads = {
        f"{s}.{n}": p.grad.detach().clone()
        for s, stage in enumerate(stages)
        for n, p in stage.named_parameters()
        if p.grad is not None
    }
    return float(loss.detach()), grads
