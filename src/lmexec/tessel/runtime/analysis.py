"""Where the time went: slower compute (the profile was optimistic) or gaps (communication, launch).

``replay`` re-times the planned per-device order with the *measured* median duration of each block
(steady steps only). measured / replay near 1 means the runtime followed the plan and the miss is in
the durations; well above 1 means time went into gaps the block model does not have (p2p sends and
receives, Python dispatch between actions, waiting on a descheduled peer).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from lmexec.tessel.placement import Placement
from lmexec.tessel.runtime.pipelining_adapter import stage_chain
from lmexec.tessel.runtime.plan import PlannedRun
from lmexec.tessel.runtime.train import RunResult
from lmexec.tessel.schedule import Schedule, retime


@dataclass(frozen=True)
class Breakdown:
    """All in ms, medians over the steady steps."""

    predicted: float
    measured: float
    replay: float  # planned order, measured block durations, no gaps
    compute_inflation: float  # measured busy time / planned busy time (all ranks)

    @property
    def ratio(self) -> float:
        return self.measured / self.predicted

    @property
    def gap_ratio(self) -> float:
        return self.measured / self.replay

    def to_dict(self) -> dict[str, float]:
        return {"predicted_ms": self.predicted, "measured_ms": self.measured, "replay_ms": self.replay,
                "compute_inflation": self.compute_inflation, "ratio": self.ratio, "gap_ratio": self.gap_ratio}  # fmt: skip


def measured_placement(plan: PlannedRun, result: RunResult) -> Placement:
    """The plan's placement with each block's median measured duration (steady steps)."""
    placement = plan.schedule.placement
    chain = stage_chain(placement)
    steps = range(1, len(result.events)) if len(result.events) > 1 else range(len(result.events))
    samples: dict[tuple[int, str], list[float]] = {}
    for i in steps:
        for e in result.events[i]:
            samples.setdefault((e["stage"], e["kind"]), []).append(e["end"] - e["start"])
    blocks = []
    for block in placement.blocks:
        measured = samples.get(chain.action(block.name))
        blocks.append(replace(block, duration=max(1e-6, statistics.median(measured))) if measured else block)
    return Placement(
        placement.name, placement.num_devices, tuple(blocks), placement.capacity, placement.static_memory
    )


def replay(plan: PlannedRun, result: RunResult) -> Schedule:
    """The planned order re-timed with measured durations (what a gap-free runtime would take)."""
    placement = measured_placement(plan, result)
    return retime(
        placement, plan.schedule.device_orders(), plan.schedule.num_micro_batches, f"{plan.name} replay"
    )


def breakdown(plan: PlannedRun, result: RunResult) -> Breakdown:
    replayed = replay(plan, result)
    planned_busy = sum(plan.schedule.metrics().busy)
    return Breakdown(
        plan.predicted_ms,
        result.steady(result.makespan_ms),
        replayed.makespan,
        sum(replayed.metrics().busy) / planned_busy if planned_busy else float("nan"),
    )
