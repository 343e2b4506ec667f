"""Exact reference: the whole N-micro-batch problem as one CP-SAT model (small N only).

It measures the optimality gap of the two-phase search. The model is the search's window model with
every task free: dependencies, one NoOverlap per device, a reservoir (memory) per limited device,
makespan minimised from the placement's lower bound. With ``fifo`` (default) every block runs its
micro-batches in order, as all schedules of the search and the baselines do; the optimum is then the
optimum over such schedules.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmexec.tessel.placement import Placement
from lmexec.tessel.schedule import Schedule
from lmexec.tessel.search.completion import to_schedule
from lmexec.tessel.search.problem import IntProblem
from lmexec.tessel.search.window import ALL, solve_window


@dataclass(frozen=True)
class ExactResult:
    """Best schedule found (None if none in time), its makespan, the proven bound, optimality."""

    schedule: Schedule | None
    makespan: float | None
    bound: float
    optimal: bool
    status: str
    seconds: float


def solve_exact(
    placement: Placement,
    micro_batches: int,
    *,
    time_limit: float = 60.0,
    workers: int = 2,
    hint: Schedule | None = None,
    fifo: bool = True,
) -> ExactResult:
    """Minimise the makespan of ``micro_batches`` micro-batches directly."""
    prob = IntProblem.build(placement)
    tasks = [(i, m) for i in range(prob.size) for m in range(micro_batches)]
    starts = None
    if hint is not None:
        index = placement.index
        starts = {(index[t.block], t.micro_batch): prob.time.down(t.start) for t in hint.tasks}
    lower = prob.makespan_bound(micro_batches)
    result = solve_window(
        prob,
        tasks,
        {},
        ALL,
        hint=starts,
        lower_bound=lower,
        upper_bound=None if starts is None else None,
        time_limit=time_limit,
        workers=workers,
        fifo=fifo,
    )
    bound = prob.time.real(result.bound if result.bound is not None else lower)
    if not prob.exact:  # rounded up: the integer bound and optimum are not the real problem's
        bound = placement.makespan_lower_bound(micro_batches)
    if result.starts is None:
        return ExactResult(None, None, bound, False, result.status, result.seconds)
    schedule = to_schedule(prob, result.starts, micro_batches, "exact")
    optimal = result.optimal and (prob.exact or schedule.makespan <= bound * (1 + 1e-9))
    return ExactResult(schedule, schedule.makespan, bound, optimal, result.status, result.seconds)
