"""CP-SAT model of a set of block instances ("tasks") around a fixed rest of the schedule.

One builder serves three uses: the exact solver (every task free), the cool-down (a time-suffix of
the schedule free, the rest fixed before it) and the warm-up (a time-prefix free, the rest fixed
after it). Because the free tasks form a prefix or suffix of every device's order, the memory levels
of the fixed part do not depend on how the free tasks are arranged: a reservoir constraint per device
on the free tasks alone, starting from the level the fixed part leaves, is exact.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from ortools.sat.python import cp_model

from lmexec.tessel.search.problem import IntProblem

TaskKey = tuple[int, int]  # (block index, micro-batch)
ALL, COOLDOWN, WARMUP = "all", "cooldown", "warmup"


@dataclass(frozen=True)
class WindowResult:
    """Starts of the free tasks, the objective value and bound, and whether CP-SAT proved optimality."""

    starts: dict[TaskKey, int] | None
    objective: int | None
    bound: int | None
    optimal: bool
    status: str
    seconds: float


def solve_window(
    prob: IntProblem,
    free: Iterable[TaskKey],
    fixed: dict[TaskKey, int],
    mode: str,
    *,
    hint: dict[TaskKey, int] | None = None,
    lower_bound: int = 0,
    upper_bound: int | None = None,
    time_limit: float = 10.0,
    workers: int = 2,
    fifo: bool = True,
) -> WindowResult:
    """Schedule ``free`` tasks: ALL/COOLDOWN minimise the last end, WARMUP maximises the first start.

    ``fifo`` makes every block run its micro-batches in order (the schedules the search produces
    always do; for the exact solver it is a symmetry restriction that the docs state).
    """
    began = time.perf_counter()
    free = sorted(set(free))
    if not free:
        return WindowResult({}, None, None, True, "optimal", 0.0)
    dur, devs = prob.duration, prob.devices
    fixed_end = {d: 0 for d in range(prob.num_devices)}
    fixed_first = {d: None for d in range(prob.num_devices)}
    for (i, _m), s in fixed.items():
        for d in devs[i]:
            fixed_end[d] = max(fixed_end[d], s + dur[i])
            fixed_first[d] = s if fixed_first[d] is None else min(fixed_first[d], s)
    if upper_bound is None:
        upper_bound = (hint and max(hint[t] + dur[t[0]] for t in free)) or _serial_bound(prob, free, fixed)
        upper_bound = max([upper_bound] + [s + dur[i] for (i, _), s in fixed.items()])
    bottom = min(hint[t] for t in free) if (hint and mode == WARMUP) else 0
    model = cp_model.CpModel()
    start: dict[TaskKey, cp_model.IntVar] = {}
    free_set = set(free)
    for t in free:
        i, m = t
        lo, hi = bottom, upper_bound - dur[i]
        if mode == ALL:
            lo, hi = max(lo, prob.head[i]), hi - prob.tail[i]
        for p in prob.preds[i]:
            if (p, m) in fixed:
                lo = max(lo, fixed[(p, m)] + dur[p])
        for q in prob.succs[i]:
            if (q, m) in fixed:
                hi = min(hi, fixed[(q, m)] - dur[i])
        for d in devs[i]:
            if mode == COOLDOWN:
                lo = max(lo, fixed_end[d])
            elif mode == WARMUP and fixed_first[d] is not None:
                hi = min(hi, fixed_first[d] - dur[i])
        if lo > hi:
            return WindowResult(None, None, None, False, "infeasible", time.perf_counter() - began)
        start[t] = model.new_int_var(lo, hi, f"s{i}_{m}")
    by_device: dict[int, list] = {d: [] for d in range(prob.num_devices)}
    for t in free:
        i, m = t
        interval = model.new_fixed_size_interval_var(start[t], dur[i], f"iv{i}_{m}")
        for d in devs[i]:
            by_device[d].append((t, interval))
        for q in prob.succs[i]:
            if (q, m) in free_set:
                model.add(start[(q, m)] >= start[t] + dur[i])
        if fifo and (i, m + 1) in free_set:
            model.add(start[(i, m + 1)] >= start[t] + dur[i])
    for d, items in by_device.items():
        if len(items) > 1:
            model.add_no_overlap([iv for _, iv in items])
        if prob.limited(d) and any(prob.delta[t[0]] for t, _ in items):
            base = prob.static[d]
            if mode != WARMUP:
                base += sum(prob.delta[i] for (i, _m) in fixed if d in devs[i])
            deltas = [prob.delta[t[0]] for t, _ in items]
            room = prob.capacity[d] - base
            if room < 0:
                return WindowResult(None, None, None, False, "infeasible", time.perf_counter() - began)
            floor = min(0, sum(x for x in deltas if x < 0)) - 1
            model.add_reservoir_constraint([start[t] for t, _ in items], deltas, floor, room)
    if mode == WARMUP:
        objective = model.new_int_var(bottom, upper_bound, "first")
        limit = min([s for s in fixed.values()], default=upper_bound)
        model.add(objective <= limit)
        for t in free:
            model.add(objective <= start[t])
        model.maximize(objective)
    else:
        floor_end = max([s + dur[i] for (i, _), s in fixed.items()] + [lower_bound])
        objective = model.new_int_var(min(floor_end, upper_bound), upper_bound, "last")
        for t in free:
            model.add(objective >= start[t] + dur[t[0]])
        model.minimize(objective)
    if hint:
        for t in free:
            if t in hint:
                model.add_hint(start[t], hint[t])
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.01, time_limit)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = 0
    status = solver.solve(model)
    seconds = time.perf_counter() - began
    name = solver.status_name(status).lower()
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return WindowResult(None, None, None, False, name, seconds)
    starts = {t: solver.value(v) for t, v in start.items()}
    return WindowResult(
        starts,
        int(solver.objective_value),
        int(solver.best_objective_bound),
        status == cp_model.OPTIMAL,
        name,
        seconds,
    )


def _serial_bound(prob: IntProblem, free: list[TaskKey], fixed: dict[TaskKey, int]) -> int:
    """A horizon every free task fits in: after the fixed part, all free tasks one after another."""
    after = max([s + prob.duration[i] for (i, _), s in fixed.items()], default=0)
    return after + sum(prob.duration[i] for i, _ in free)
