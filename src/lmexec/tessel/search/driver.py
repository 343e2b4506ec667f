"""Search driver: period candidates from the work bound upward, then completion for N micro-batches.

Candidates are tried one by one from ``ceil(max work)`` (a few steps), then with doubling steps, and
the gap below the first feasible period is closed by bisection. Every period proven infeasible below
the answer, contiguously from the work bound, raises the proven lower bound; the period is optimal
when the two meet. Infeasibility is relative to the model's horizon (each block waits less than one
period per dependency hop), which covers every schedule that does not idle a whole period needlessly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmexec.errors import UserError
from lmexec.tessel.baselines import applicable_baselines
from lmexec.tessel.placement import Placement, exceeds
from lmexec.tessel.schedule import Schedule
from lmexec.tessel.search import repetend as rp
from lmexec.tessel.search.completion import Completion, complete, to_schedule
from lmexec.tessel.search.greedy import greedy_repetend
from lmexec.tessel.search.minimum import single_batch_minimum
from lmexec.tessel.search.problem import IntProblem
from lmexec.tessel.search.window import ALL, solve_window

LINEAR_STEPS = 4
CANDIDATE_SHARE = 0.3  # of the time left, at most, for one period candidate
CANDIDATE_MIN = 0.5  # seconds
SPAN_SHARE = 0.15  # of the time limit, at most, to minimise the final repetend's span
COMPLETION_SHARE = 0.1  # of the time limit for the warm-up/cool-down solves (they stop early when optimal)
COMPLETION_MIN = 1.0  # seconds, at least, for those solves (when that much time is left)
GREEDY_SHARE = 0.05  # of the repetend time, at most, for the greedy upper bound
GREEDY_MAX = 1.0
WARM_FIRST_BLOCKS = 30  # from this many blocks on, an unsettled plain try switches to warm starts first
REPETEND_SHARE = 0.7  # of the time limit; the rest (at least) goes to completion

Solver = Callable[..., rp.Outcome]


def _solver(name: str) -> Solver:
    if name == "cpsat":
        return rp.solve_repetend_cpsat
    if name == "z3":
        from lmexec.tessel.search.z3_backend import solve_repetend_z3

        return solve_repetend_z3
    raise UserError(f"unknown solver {name!r}; use cpsat or z3")


@dataclass(frozen=True)
class Candidate:
    period: float
    status: str
    seconds: float


@dataclass
class SearchResult:
    """What the search found and what it proved (periods in the placement's time unit)."""

    placement: Placement
    micro_batches: int
    solver: str
    period: float
    period_bound: float
    work_bound: float
    schedule: Schedule
    makespan_bound: float
    repetend: rp.Repetend
    search_seconds: float
    repetend_seconds: float
    completion_seconds: float
    in_flight: int
    candidates: list[Candidate] = field(default_factory=list)
    completion_steps: dict[str, float] = field(default_factory=dict)
    periodic: bool = True
    baselines: dict[str, Schedule] = field(default_factory=dict)
    """The applicable baselines for this N (built once for the portfolio; the CLI compares with them)."""
    """False when the repetend did not fit this N (a micro-batch keeps memory on a device) and the
    schedule comes from the direct solver: the period figures then describe no returned schedule."""

    @property
    def period_optimal(self) -> bool:
        return self.periodic and self.period <= self.period_bound * (1 + 1e-9)

    @property
    def makespan(self) -> float:
        return self.schedule.makespan

    @property
    def steady_bubble_rate(self) -> float:
        """Idle share of device time within one period of the steady state."""
        p = self.placement
        return 1.0 - sum(p.device_work) / (p.num_devices * self.period)

    def to_dict(self) -> dict[str, Any]:
        metrics = self.schedule.metrics()
        return {
            "placement": self.placement.name,
            "devices": self.placement.num_devices,
            "capacity": list(self.placement.capacity),
            "inference": self.placement.is_inference,
            "micro_batches": self.micro_batches,
            "solver": self.solver,
            "periodic": self.periodic,
            "period": self.period if self.periodic else None,
            "period_lower_bound": self.period_bound if self.periodic else None,
            "period_optimal": self.period_optimal,
            "work_bound": self.work_bound,
            "steady_bubble_rate": self.steady_bubble_rate if self.periodic else None,
            "in_flight": self.in_flight if self.periodic else None,
            "makespan": metrics.makespan,
            "makespan_lower_bound": self.makespan_bound,
            "bubble_rate": metrics.bubble_rate,
            "peak_memory": list(metrics.peak_memory),
            "search_seconds": self.search_seconds,
            "repetend_seconds": self.repetend_seconds,
            "completion_seconds": self.completion_seconds,
            "completion_steps": self.completion_steps,
            "candidates": [c.__dict__ for c in self.candidates],
        }


Progress = Callable[[dict[str, Any]], None]


def find_repetend(
    prob: IntProblem,
    time_limit: float,
    solver: str = "cpsat",
    workers: int = 2,
    progress: Progress | None = None,
) -> tuple[rp.Repetend | None, int, list[tuple[int, str, float]]]:
    """Smallest-period repetend found in time, the proven lower bound (integer units), the log.

    Each candidate gets at most a share of the time left, so one hard proof cannot starve the
    rest; the final period's span is then minimised with what remains of its share.
    """
    solve = _solver(solver)
    began = time.perf_counter()
    low = max(prob.work)
    top = max(low, sum(prob.duration))
    proven = low  # every period below this is proven infeasible
    tried: dict[int, str] = {}
    log: list[tuple[int, str, float]] = []
    best: rp.Repetend | None = None
    warm_first = False  # once a plain try is unsettled, later candidates start from the warm start

    def left() -> float:
        return time_limit - (time.perf_counter() - began)

    def attempt(period: int) -> rp.Outcome:
        nonlocal proven, best, warm_first
        cap = max(CANDIDATE_MIN, left() * CANDIDATE_SHARE)
        extra = {"warm_first": True} if warm_first and solver == "cpsat" else {}
        outcome = solve(prob, period, min(cap, left()), workers=workers, **extra)
        log.append((period, outcome.status, outcome.seconds))
        tried[period] = outcome.status
        if outcome.status == rp.UNKNOWN and prob.size >= WARM_FIRST_BLOCKS:
            warm_first = True
        while tried.get(proven) == rp.INFEASIBLE:
            proven += 1
        if outcome.repetend is not None and (best is None or period < best.period):
            best = outcome.repetend
        if progress:
            progress({"tried": len(log), "period": period, "status": outcome.status,
                      "best": best.period if best else None, "bound": proven,
                      "seconds": time.perf_counter() - began})  # fmt: skip
        return outcome

    # A greedy modulo schedule bounds the period from above in milliseconds: the solver only looks
    # below it, and it is the answer when nothing better is settled in time.
    greedy = greedy_repetend(prob, min(GREEDY_MAX, GREEDY_SHARE * time_limit))
    if greedy is not None:
        top = (
            greedy.period - 1 if greedy.period > low else low
        )  # at the bound, CP-SAT's is usually more compact
        log.append((greedy.period, "greedy", time.perf_counter() - began))
    period, step, last_miss = low, 1, low - 1
    while period <= top and left() > 0:
        outcome = attempt(period)
        if outcome.repetend is not None:
            break
        last_miss = period
        if len(tried) >= LINEAR_STEPS and outcome.status == rp.INFEASIBLE:
            step *= 2  # proven gaps grow fast; an unsettled (timed-out) period says nothing, so go on slowly
        period = min(top, period + step) if period < top else top + 1
    if best is None and greedy is not None and left() > 0 and all(v == rp.INFEASIBLE for v in tried.values()):
        attempt(
            greedy.period
        )  # every period below was proven infeasible: CP-SAT's repetend is often more compact
    if best is None:
        best = greedy
    if best is None:
        return None, proven, log
    lo, hi = last_miss, best.period  # bisection: lo failed (or is below the bound), hi succeeded
    while left() > 0:
        untried = [p for p in range(lo + 1, hi) if p not in tried]
        if not untried:
            break
        mid = untried[len(untried) // 2]
        if attempt(mid).repetend is not None:
            hi = mid
        else:
            lo = mid
    while left() > 0:  # prove the periods the doubling skipped at the bound: each proof raises it
        gaps = [p for p in range(proven, best.period) if p not in tried]
        if not gaps or gaps[0] != proven or attempt(gaps[0]).status == rp.UNKNOWN:
            break
    if left() > 0:
        tuned = solve(
            prob, best.period, min(left(), max(CANDIDATE_MIN, time_limit * SPAN_SHARE)), workers=workers,
            optimize=True, hint=best,
        )  # fmt: skip
        if tuned.repetend is not None and tuned.repetend.span(prob) <= best.span(prob):
            best = tuned.repetend
        log.append((best.period, "span " + tuned.status, tuned.seconds))
    return best, min(proven, best.period), log


def search(
    placement: Placement,
    micro_batches: int,
    *,
    time_limit: float = 60.0,
    solver: str = "cpsat",
    inference: bool = False,
    workers: int = 2,
    progress: Progress | None = None,
    completion_limit: float | None = None,
    portfolio: bool = True,
) -> SearchResult:
    """Search a repetend and complete it for ``micro_batches``; raises UserError when nothing fits.

    With ``portfolio`` the result is never worse than an applicable baseline that fits the memory:
    when one is faster for this N (e.g. GPipe's latency for short inference batches, which no
    periodic schedule reaches), it is returned instead and ``completion_steps`` says so.
    """
    if micro_batches < 1:
        raise UserError("the micro-batch count must be at least 1")
    if not 0 < time_limit < math.inf:
        raise UserError(f"the time limit must be a positive number of seconds, got {time_limit}")
    if inference and not placement.is_inference:
        placement = placement.forward_only()
    began = time.perf_counter()
    prob = IntProblem.build(placement)
    rep, proven, log = find_repetend(prob, time_limit * REPETEND_SHARE, solver, workers, progress)
    repetend_seconds = time.perf_counter() - began
    if rep is None:
        rep = _fallback(prob)
        proven = min(proven, rep.period) if rep else proven
    if rep is None:
        raise UserError(_no_schedule_message(prob, micro_batches, time_limit))
    left = time_limit - (time.perf_counter() - began)
    if completion_limit is None:
        completion_limit = min(max(0.2, left), max(COMPLETION_MIN, COMPLETION_SHARE * time_limit))
    budget = completion_limit
    done: Completion = complete(prob, rep, micro_batches, budget, workers)
    unit = prob.time.real
    schedule = to_schedule(prob, done.starts, micro_batches, f"tessel-{solver}")
    first = min(done.starts.values())
    schedule.repetend = _repetend_window(prob, rep, done, micro_batches, first)
    problems = schedule.validate()
    if any(v.kind != "memory" for v in problems):
        raise RuntimeError(f"internal error: search produced an invalid schedule: {problems[0]}")
    periodic = not problems
    if problems:  # only for placements whose micro-batches do not give back their memory per device
        schedule = _exact_fallback(prob, micro_batches, time_limit - (time.perf_counter() - began), workers)
        if schedule is None:
            raise UserError(
                _no_room_message(prob, micro_batches)
                or f"placement {placement.name!r}: the periodic schedule breaks a limit for "
                f"{micro_batches} micro-batches ({problems[0].message}) and the direct solver found no "
                "schedule in time; raise --memory or --time-limit"
            )
        done.steps["exact-fallback"] = round(schedule.makespan / float(prob.time.unit))
    chosen, baselines = None, {}
    if portfolio:
        baselines = applicable_baselines(placement, micro_batches)
        schedule, chosen = _best_of_baselines(schedule, baselines)
    # a bound proven on rounded-up durations or memory is no bound on the real placement
    period_bound = max(placement.max_work, unit(proven)) if prob.exact else placement.max_work
    schedule.info = {"solver": solver} | (
        {"period": unit(rep.period), "period_lower_bound": period_bound} if periodic else {}
    )
    return SearchResult(
        placement=placement,
        micro_batches=micro_batches,
        solver=solver,
        period=unit(rep.period),
        period_bound=period_bound,
        work_bound=placement.max_work,
        schedule=schedule,
        makespan_bound=placement.makespan_lower_bound(micro_batches),
        repetend=rep,
        search_seconds=time.perf_counter() - began,
        repetend_seconds=repetend_seconds,
        completion_seconds=done.seconds,
        in_flight=rep.in_flight(prob),
        candidates=[Candidate(unit(p), s, t) for p, s, t in log],
        completion_steps={k: unit(v) for k, v in done.steps.items()}
        | ({f"baseline {chosen.name}": chosen.makespan} if chosen else {}),
        periodic=periodic,
        baselines=baselines,
    )


def _repetend_window(prob, rep, done: Completion, n: int, first: int) -> tuple[float, float] | None:
    """Where the first full period shows in the final schedule (re-timed, so approximately)."""
    offsets = [(s - min(rep.start)) // rep.period for s in rep.start]
    kmax = max(offsets)
    if n <= kmax:
        return None
    t0 = min(done.starts[(i, kmax - k)] for i, k in enumerate(offsets)) - first
    return (prob.time.real(t0), prob.time.real(t0 + rep.period))


def _best_of_baselines(
    schedule: Schedule, baselines: dict[str, Schedule] | None = None
) -> tuple[Schedule, Schedule | None]:
    """The composed schedule, or a faster valid baseline (of ``baselines``, by default every applicable
    one) for the same placement, memory and N."""
    if baselines is None:
        baselines = applicable_baselines(schedule.placement, schedule.num_micro_batches)
    best = schedule
    for candidate in baselines.values():
        if candidate.makespan < best.makespan * (1 - 1e-9) and not candidate.validate():
            best = candidate
    if best is schedule:
        return schedule, None
    named = Schedule(best.placement, best.num_micro_batches, best.tasks, f"{schedule.name} ({best.name})")
    return named, best


def _exact_fallback(prob: IntProblem, n: int, seconds: float, workers: int) -> Schedule | None:
    """The whole problem in CP-SAT: used when the periodic schedule is not valid for this N."""
    tasks = [(i, m) for i in range(prob.size) for m in range(n)]
    result = solve_window(prob, tasks, {}, ALL, lower_bound=prob.makespan_bound(n),
                          time_limit=max(1.0, seconds), workers=workers)  # fmt: skip
    if result.starts is None:
        return None
    schedule = to_schedule(prob, result.starts, n, "tessel-direct")
    return None if schedule.validate() else schedule


def _fallback(prob: IntProblem) -> rp.Repetend | None:
    """One micro-batch after another in topological order, if that fits the memory."""
    start, clock = [0] * prob.size, 0
    for i in prob.topo:
        start[i] = clock
        clock += prob.duration[i]
    for d, on in enumerate(prob.on_device):
        level = prob.static[d]
        for i in sorted(on, key=start.__getitem__):
            level += prob.delta[i]
            if level > prob.capacity[d]:
                return None
    if any(net > 0 for d, net in enumerate(prob.net) if prob.limited(d)):
        return None
    return rp.Repetend(clock, tuple(start))


def _no_room_message(prob: IntProblem, n: int) -> str | None:
    """Why the memory cannot hold the work: the device and the least memory it would need."""
    placement = prob.placement
    for d in range(placement.num_devices):
        if not prob.limited(d):
            continue
        need = single_batch_minimum(prob, d)
        if need is not None and exceeds(need, placement.capacity[d]):
            return (
                f"placement {placement.name!r}: one micro-batch alone needs memory {need:g} on device {d} "
                f"but its capacity is {placement.capacity[d]:g}"
            )
        keep = prob.memory.real(prob.net[d])
        total = placement.static_memory[d] + n * keep
        if prob.net[d] > 0 and exceeds(total, placement.capacity[d]):
            return (
                f"placement {placement.name!r}: each micro-batch keeps memory {keep:g} on device {d}; "
                f"{n} micro-batches need at least {total:g} there but its capacity is "
                f"{placement.capacity[d]:g}"
            )
    return None


def _no_schedule_message(prob: IntProblem, n: int, time_limit: float) -> str:
    reason = _no_room_message(prob, n)
    if reason:
        return reason
    return (
        f"placement {prob.placement.name!r}: no schedule found within the time limit of {time_limit:g} s; "
        "raise --time-limit or the memory limit"
    )


def schedule_for(
    result: SearchResult,
    micro_batches: int,
    time_limit: float = 2.0,
    workers: int = 2,
    portfolio: bool = True,
) -> Schedule:
    """Another micro-batch count on the same repetend: only the completion runs again."""
    prob = IntProblem.build(result.placement)
    done = complete(prob, result.repetend, micro_batches, time_limit, workers)
    schedule = to_schedule(prob, done.starts, micro_batches, f"tessel-{result.solver}")
    problems = schedule.validate()
    if problems:
        fallback = _exact_fallback(prob, micro_batches, time_limit, workers)
        if fallback is None:
            raise UserError(
                _no_room_message(prob, micro_batches) or f"no valid schedule: {problems[0].message}"
            )
        schedule = fallback
    return _best_of_baselines(schedule)[0] if portfolio else schedule
