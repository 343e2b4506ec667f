"""From a placement to runnable schedules: search or baselines, then export to action lists.

Every schedule of one comparison uses the same placement (same stage partition), so measured
differences come from the order alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmexec.errors import UserError
from lmexec.tessel.baselines import BASELINES, applicable_baselines, baseline_schedule
from lmexec.tessel.placement import Placement
from lmexec.tessel.runtime.pipelining_adapter import Actions, export_actions, stage_chain, validate_actions
from lmexec.tessel.runtime.settings import MIN_GAIN
from lmexec.tessel.runtime.train import RunSpec
from lmexec.tessel.schedule import Schedule

SCHEDULES = ("searched", *BASELINES)


@dataclass
class PlannedRun:
    """A schedule on the profiled placement (times in ms) and its per-rank actions."""

    name: str
    schedule: Schedule
    actions: Actions
    num_stages: int

    @property
    def spec(self) -> RunSpec:
        return RunSpec(self.name, self.actions, self.num_stages)

    @property
    def predicted_ms(self) -> float:
        return self.schedule.makespan


def parse_schedules(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCHEDULES]
    if not names or unknown:
        raise UserError(
            f"unknown schedule(s) {unknown or [text]}; choose from {', '.join(SCHEDULES)} (comma list)"
        )
    return list(dict.fromkeys(names))


def baseline_preference(schedule: Schedule) -> tuple[float, float]:
    """Sort key among baselines: shortest makespan, then the lowest peak memory (on a tie GPipe and 1F1B
    predict the same time, and GPipe, holding every activation, measured up to 12% slower here)."""
    return round(schedule.makespan, 9), max(schedule.metrics().peak_memory)


def prefer_baseline(schedule: Schedule, min_gain: float = MIN_GAIN) -> Schedule:
    """``schedule``, or the best valid applicable baseline (:func:`baseline_preference`) when ``schedule`` is
    not predicted at least ``min_gain`` (a fraction) faster than it; the name then says which baseline, e.g. ``tessel-cpsat (1f1b)``."""
    if not 0 <= min_gain < math.inf:
        raise UserError(f"--min-gain must be a finite number >= 0, got {min_gain}")
    if min_gain == 0:
        return schedule  # the search's result as it is
    candidates = [
        c
        for c in applicable_baselines(schedule.placement, schedule.num_micro_batches).values()
        if not c.validate()
    ]
    if not candidates:
        return schedule
    best = min(candidates, key=baseline_preference)
    if best.makespan >= schedule.makespan * (1 + min_gain):
        return schedule
    searcher = schedule.name.split(" (")[0]  # the driver may already have named a baseline
    return Schedule(best.placement, best.num_micro_batches, best.tasks, f"{searcher} ({best.name})")


def plan_runs(
    placement: Placement,
    names: list[str],
    micro_batches: int,
    time_limit: float = 20.0,
    min_gain: float = MIN_GAIN,
) -> list[PlannedRun]:
    """Build, validate and export each named schedule; a baseline that does not apply is a UserError."""
    chain = stage_chain(placement)
    out = []
    for name in names:
        if name == "searched":
            from lmexec.tessel.search.driver import search

            schedule = search(placement, micro_batches, time_limit=time_limit).schedule
            schedule = prefer_baseline(schedule, min_gain)
        else:
            schedule = baseline_schedule(placement, name, micro_batches)
        schedule.check()
        actions = export_actions(schedule)
        validate_actions(actions, chain.num_stages, micro_batches)
        out.append(PlannedRun(name, schedule, actions, chain.num_stages))
    return out
