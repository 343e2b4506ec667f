"""From a repetend to a schedule for N micro-batches: unroll, compact, then re-solve both ends.

1. Unrolling (instance m of block b at ``s_b + m*P``) is valid for any N.
2. ASAP re-timing in each device's order removes the idle "diagonal" of the partial periods. It
   keeps the order of memory events on every device, hence every memory level: still valid.
3. The cool-down (a time-suffix of the unrolled schedule, one extra period included) is re-solved in
   CP-SAT with the rest fixed, minimising the makespan; the warm-up likewise on the as-late-as-
   possible timing of the rest, maximising its first start. Both are exact for their window (any
   order and timing of the window's tasks under dependencies, device exclusivity and memory).
4. For small problems (or when the two windows meet) the whole schedule is one window.

The best of these (they only ever improve) is returned.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from lmexec.tessel.schedule import Schedule, Task
from lmexec.tessel.search.problem import IntProblem
from lmexec.tessel.search.repetend import Repetend
from lmexec.tessel.search.window import ALL, COOLDOWN, WARMUP, TaskKey, solve_window

WHOLE_LIMIT = 400  # tasks: below this the whole schedule is re-solved as one window
EXTRA_PERIODS = 1


Starts = dict[TaskKey, int]
Orders = list[list[TaskKey]]


def unroll(prob: IntProblem, rep: Repetend, n: int) -> Starts:
    base = min(rep.start)
    return {(i, m): rep.start[i] - base + m * rep.period for i in range(prob.size) for m in range(n)}


def orders_of(prob: IntProblem, starts: Starts) -> Orders:
    """Per device, tasks sorted by start (ties by block index: never on one device in valid schedules)."""
    orders: Orders = [[] for _ in range(prob.num_devices)]
    for key in sorted(starts, key=lambda t: (starts[t], t)):
        for d in prob.devices[key[0]]:
            orders[d].append(key)
    return orders


def asap(prob: IntProblem, orders: Orders, preds=None, duration=None) -> Starts:
    """Earliest starts that keep each device's order and every dependency (Kahn over the task graph)."""
    preds = prob.preds if preds is None else preds
    duration = prob.duration if duration is None else duration
    after: dict[TaskKey, list[TaskKey]] = defaultdict(list)
    waiting: dict[TaskKey, int] = defaultdict(int)
    tasks = {t for order in orders for t in order}
    for order in orders:
        for a, b in zip(order, order[1:], strict=False):
            after[a].append(b)
            waiting[b] += 1
    for i, m in tasks:
        for p in preds[i]:
            after[(p, m)].append((i, m))
            waiting[(i, m)] += 1
    ready = [t for t in tasks if waiting[t] == 0]
    earliest: dict[TaskKey, int] = defaultdict(int)
    out: Starts = {}
    while ready:
        t = ready.pop()
        out[t] = earliest[t]
        end = out[t] + duration[t[0]]
        for u in after[t]:
            earliest[u] = max(earliest[u], end)
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if len(out) != len(tasks):
        raise RuntimeError("device orders deadlock (internal error in schedule completion)")
    return out


def alap(prob: IntProblem, orders: Orders) -> Starts:
    """Latest starts with the same makespan, order and dependencies (ASAP of the mirrored problem)."""
    mirrored = asap(prob, [list(reversed(o)) for o in orders], preds=prob.succs)
    end = max(s + prob.duration[t[0]] for t, s in mirrored.items())
    return {t: end - s - prob.duration[t[0]] for t, s in mirrored.items()}


def makespan(prob: IntProblem, starts: Starts) -> int:
    return max(s + prob.duration[t[0]] for t, s in starts.items()) - min(starts.values())


@dataclass
class Completion:
    """Integer starts for N micro-batches and how each step did (for reports and benchmarks)."""

    starts: Starts
    steps: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    window_optimal: bool = False


def complete(
    prob: IntProblem, rep: Repetend, n: int, time_limit: float = 5.0, workers: int = 2
) -> Completion:
    """Best schedule for ``n`` micro-batches built on the repetend within ``time_limit`` seconds."""
    began = time.perf_counter()
    unrolled = unroll(prob, rep, n)
    best = asap(prob, orders_of(prob, unrolled))
    steps = {"unrolled": makespan(prob, unrolled), "compacted": makespan(prob, best)}
    period = rep.period
    kmax = max((s - min(rep.start)) // period for s in rep.start)
    warm_cut = (kmax + EXTRA_PERIODS) * period
    cool_cut = (n - EXTRA_PERIODS) * period
    optimal = False
    if n * prob.size <= WHOLE_LIMIT or cool_cut <= warm_cut:
        result = solve_window(
            prob,
            best,
            {},
            ALL,
            hint=best,
            lower_bound=prob.makespan_bound(n),
            time_limit=time_limit,
            workers=workers,
        )
        if result.starts is not None and result.objective < makespan(prob, best):
            best = asap(prob, orders_of(prob, result.starts))
        optimal = result.optimal
        steps["whole"] = makespan(prob, best)
    else:
        half = time_limit / 2
        cool = {t for t, s in unrolled.items() if s >= cool_cut}
        fixed = {t: s for t, s in best.items() if t not in cool}
        result = solve_window(prob, cool, fixed, COOLDOWN, hint=best, time_limit=half, workers=workers)
        if result.starts is not None:
            candidate = asap(prob, orders_of(prob, {**fixed, **result.starts}))
            if makespan(prob, candidate) < makespan(prob, best):
                best = candidate
        steps["cooldown"] = makespan(prob, best)
        late = alap(prob, orders_of(prob, best))
        warm = {t for t, s in unrolled.items() if s < warm_cut}
        fixed = {t: s for t, s in late.items() if t not in warm}
        remaining = max(0.05, time_limit - (time.perf_counter() - began))
        result = solve_window(prob, warm, fixed, WARMUP, hint=late, time_limit=remaining, workers=workers)
        if result.starts is not None:
            candidate = asap(prob, orders_of(prob, {**fixed, **result.starts}))
            if makespan(prob, candidate) < makespan(prob, best):
                best = candidate
        steps["warmup"] = makespan(prob, best)
    return Completion(best, steps, time.perf_counter() - began, optimal)


def to_schedule(prob: IntProblem, starts: Starts, n: int, name: str, repetend=None) -> Schedule:
    """Real-valued :class:`Schedule` from integer starts (times scaled back exactly)."""
    unit = prob.time.real
    tasks = [Task(unit(s), prob.names[i], m) for (i, m), s in starts.items()]
    return Schedule(prob.placement, n, tasks, name, repetend)
