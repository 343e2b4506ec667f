"""Repetend construction as modulo scheduling in CP-SAT: one model per candidate period.

Instance m of block b starts at ``s_b + m * P``. Writing ``s_b = k_b * P + p_b`` (offset k_b: how
many periods behind micro-batch 0 the block's repetend instance is; phase p_b in [0, P)), one model
decides every block's offset and phase at once, instead of enumerating offset assignments as the
paper's code does:

* dependencies hold in absolute time: ``s_succ >= s_pred + dur_pred``;
* no two blocks of a device overlap modulo P: each block is an interval at its phase plus a copy
  one period later, all in one NoOverlap per device (covers the wrap-around);
* steady-state memory of device d right after block a starts, for a memory-neutral micro-batch:
  ``static_d + sum_b mem_b * (k_a - k_b - [p_b > p_a])`` over the blocks b on d (the number of
  instances of b started by then, relative to a) must stay within the capacity.

The objective minimises one micro-batch's span (max end), which is the unrolled makespan minus
``(N - 1) * P`` and also keeps the fewest micro-batches in flight.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from ortools.sat.python import cp_model

from lmexec.tessel.search.problem import NO_LIMIT, IntProblem

FEASIBLE = "feasible"
OPTIMAL = "optimal"  # span proven minimal for this period
INFEASIBLE = "infeasible"
UNKNOWN = "unknown"
PLAIN_SHARE = 0.4  # of a candidate's time for the model without a hint
WARM_SHARE = 0.2  # of a candidate's time for the memory-free warm start
WARM_FIRST_SHARE = 0.35  # the same when the warm start goes first (no plain try)
WARM_MAX = 2.0
WARM_MIN = 0.1


@dataclass(frozen=True)
class Repetend:
    """Periodic schedule: block i of micro-batch m starts at ``start[i] + m * period`` (integer units)."""

    period: int
    start: tuple[int, ...]

    def offset(self, i: int) -> int:
        return self.start[i] // self.period

    def phase(self, i: int) -> int:
        return self.start[i] % self.period

    def span(self, prob: IntProblem) -> int:
        return max(s + d for s, d in zip(self.start, prob.duration, strict=True)) - min(self.start)

    def in_flight(self, prob: IntProblem) -> int:
        """Micro-batches that overlap in time in the steady state."""
        return -(-self.span(prob) // self.period)

    def steady_peak(self, prob: IntProblem) -> tuple[int, ...]:
        """Steady-state peak memory per device (memory-neutral devices; others report their static)."""
        peaks = []
        for d, on in enumerate(prob.on_device):
            peak = prob.static[d]
            if prob.net[d] == 0:
                for a in on:
                    level = prob.static[d] + sum(
                        prob.delta[b]
                        * (self.offset(a) - self.offset(b) - (1 if self.phase(b) > self.phase(a) else 0))
                        for b in on
                    )
                    peak = max(peak, level)
            peaks.append(peak)
        return tuple(peaks)


NO_HINT = Repetend(0, ())  # sentinel: solve without a hint and without the warm start


@dataclass(frozen=True)
class Outcome:
    """A solver's answer for one period: status, the repetend when one was found, seconds spent."""

    status: str
    repetend: Repetend | None
    seconds: float


def horizon(prob: IntProblem, period: int) -> int:
    """Latest end considered for one micro-batch: covers every schedule that waits < P per block."""
    return prob.critical_path + prob.size * period


def solve_repetend_cpsat(
    prob: IntProblem,
    period: int,
    time_limit: float,
    workers: int = 2,
    seed: int = 0,
    optimize: bool = False,
    hint: Repetend | None = None,
    warm_first: bool = False,
    accept: Callable[[Repetend], bool] | None = None,
) -> Outcome:
    """Find a repetend of the given period or prove none exists; ``optimize`` minimises its span.

    Feasibility alone is much faster to settle; the driver optimises the span only for the final
    period, starting from the feasible repetend as a hint. ``accept`` stops the search at the first
    solution it accepts (the warm start stops once a solution meets the memory limits).
    """
    began = time.perf_counter()
    if any(d > period for d in prob.duration) or max(prob.work) > period:
        return Outcome(INFEASIBLE, None, 0.0)
    if hint is None and _memory_bound(prob) and time_limit > 3 * WARM_MIN:
        # Plain first (infeasibility proofs are often quick); if unsettled, the most compact repetend
        # without memory limits, which usually fits them, becomes the hint for a second try. With
        # ``warm_first`` (the driver's choice once a plain try came back unsettled) the warm start
        # goes first and the plain try is skipped.
        if not warm_first:
            first = solve_repetend_cpsat(
                prob, period, PLAIN_SHARE * time_limit, workers, seed, optimize, NO_HINT
            )
            if first.status != UNKNOWN:
                return first
        free = dataclasses.replace(prob, capacity=(NO_LIMIT,) * prob.num_devices)
        share = WARM_FIRST_SHARE if warm_first else WARM_SHARE
        fits = None if optimize else (lambda rep: steady_memory_fits(prob, rep))
        pre = solve_repetend_cpsat(
            free, period, min(share * time_limit, WARM_MAX), workers, seed, True, accept=fits
        )
        if pre.status == INFEASIBLE:
            return Outcome(INFEASIBLE, None, time.perf_counter() - began)
        if pre.repetend is not None and fits is not None and fits(pre.repetend):
            return Outcome(FEASIBLE, pre.repetend, time.perf_counter() - began)
        hint = pre.repetend
        time_limit -= time.perf_counter() - began
    if hint is NO_HINT:
        hint = None
    model = cp_model.CpModel()
    top = horizon(prob, period)
    n = prob.size
    start, phase, offset = [], [], []
    for i in range(n):
        lo, hi = prob.head[i], top - prob.tail[i] - prob.duration[i]
        s = model.new_int_var(lo, hi, f"s{i}")
        k = model.new_int_var(lo // period, hi // period, f"k{i}")
        p = model.new_int_var(0, period - 1, f"p{i}")
        model.add(s == k * period + p)
        start.append(s)
        offset.append(k)
        phase.append(p)
    model.add(phase[prob.topo[0]] == 0)  # shifting all starts by a constant changes nothing
    for i in range(n):
        for j in prob.succs[i]:
            model.add(start[j] >= start[i] + prob.duration[i])
    intervals: dict[int, tuple] = {}
    for on in prob.on_device:
        if len(on) < 2:
            continue
        members = []
        for i in on:
            if i not in intervals:
                d = prob.duration[i]
                first = model.new_fixed_size_interval_var(phase[i], d, f"iv{i}")
                second = model.new_fixed_size_interval_var(phase[i] + period, d, f"iw{i}")
                intervals[i] = (first, second)
            members += intervals[i]
        model.add_no_overlap(members)
    _add_steady_memory(model, prob, phase, offset)
    if optimize:
        end = model.new_int_var(prob.critical_path, top, "span")
        for i in range(n):
            model.add(end >= start[i] + prob.duration[i])
        model.minimize(end)
    if hint is not None:
        shift = -hint.phase(prob.topo[0])
        lowest = min(hint.start) + shift
        if lowest < 0:
            shift -= (lowest // period) * period
        for i in range(n):
            model.add_hint(start[i], hint.start[i] + shift)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.01, time_limit)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    taken = _Taker(period, start, accept) if accept is not None else None
    status = solver.solve(model, taken)
    seconds = time.perf_counter() - began
    if taken is not None and taken.rep is not None:
        return Outcome(FEASIBLE, taken.rep, seconds)
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        rep = Repetend(period, tuple(solver.value(s) for s in start))
        return Outcome(OPTIMAL if status == cp_model.OPTIMAL and optimize else FEASIBLE, rep, seconds)
    if status == cp_model.INFEASIBLE:
        return Outcome(INFEASIBLE, None, seconds)
    return Outcome(UNKNOWN, None, seconds)


class _Taker(cp_model.CpSolverSolutionCallback):
    """Stops the search at the first solution that ``accept`` takes."""

    def __init__(self, period: int, start: list, accept: Callable[[Repetend], bool]) -> None:
        super().__init__()
        self.period, self.start, self.accept = period, start, accept
        self.rep: Repetend | None = None

    def on_solution_callback(self) -> None:
        rep = Repetend(self.period, tuple(self.value(s) for s in self.start))
        if self.rep is None and self.accept(rep):
            self.rep = rep
            self.stop_search()


def steady_memory_fits(prob: IntProblem, rep: Repetend) -> bool:
    """Whether a repetend meets the model's steady-state memory constraint (checked directly)."""
    period = rep.period
    for d, on in enumerate(prob.on_device):
        if not (prob.limited(d) and prob.net[d] == 0 and any(prob.delta[i] > 0 for i in on)):
            continue
        holders = [b for b in on if prob.delta[b]]
        for a in on:
            if prob.delta[a] > 0:
                level = prob.static[d] + sum(
                    prob.delta[b] * ((rep.start[a] - rep.start[b]) // period) for b in holders
                )
                if level > prob.capacity[d]:
                    return False
    return True


def _memory_bound(prob: IntProblem) -> bool:
    """Whether any device gets steady-state memory constraints."""
    return any(
        prob.limited(d) and prob.net[d] == 0 and any(prob.delta[i] > 0 for i in on)
        for d, on in enumerate(prob.on_device)
    )


def _add_steady_memory(model: cp_model.CpModel, prob: IntProblem, phase: list, offset: list) -> None:
    """Steady-state memory after each allocating block starts, on memory-neutral limited devices."""
    before: dict[tuple[int, int], cp_model.IntVar] = {}

    def later(b: int, a: int):
        """Boolean: block b's phase is after block a's (shared between devices for TP blocks)."""
        key = (min(a, b), max(a, b))
        if key not in before:
            flag = model.new_bool_var(f"o{key[0]}_{key[1]}")
            model.add(phase[key[0]] + 1 <= phase[key[1]]).only_enforce_if(flag)
            model.add(phase[key[1]] + 1 <= phase[key[0]]).only_enforce_if(~flag)
            before[key] = flag
        flag = before[key]
        return flag if b == key[1] else ~flag

    for d, on in enumerate(prob.on_device):
        if not (prob.limited(d) and prob.net[d] == 0 and any(prob.delta[i] > 0 for i in on)):
            continue
        base = prob.static[d] - sum(prob.delta[b] * offset[b] for b in on if prob.delta[b])
        for a in on:
            if prob.delta[a] <= 0:
                continue
            wrap = sum(prob.delta[b] * later(b, a) for b in on if b != a and prob.delta[b])
            model.add(base - wrap <= prob.capacity[d])
