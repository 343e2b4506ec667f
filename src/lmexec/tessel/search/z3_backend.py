"""The same repetend model in z3 (the paper's solver), behind the CP-SAT backend's interface.

Starts ``s_b = k_b * P + p_b`` with integer offsets and phases; modular no-overlap as a disjunction
per pair of blocks sharing a device (one of the two orders, each also bounded by the wrap-around);
the same steady-state memory sums. Plain ``z3.Solver`` feasibility, like the paper's code (its
authors found ``z3.Optimize`` too slow); the span is then tightened by a few bounded re-solves.
"""

from __future__ import annotations

import time

import z3

from lmexec.tessel.search.problem import IntProblem
from lmexec.tessel.search.repetend import FEASIBLE, INFEASIBLE, OPTIMAL, UNKNOWN, Outcome, Repetend, horizon


def solve_repetend_z3(
    prob: IntProblem,
    period: int,
    time_limit: float,
    workers: int = 1,
    optimize: bool = False,
    hint: Repetend | None = None,
) -> Outcome:
    """Find a repetend of the given period with z3 or prove none exists (``workers`` is ignored)."""
    began = time.perf_counter()
    if any(d > period for d in prob.duration) or max(prob.work) > period:
        return Outcome(INFEASIBLE, None, 0.0)
    top = horizon(prob, period)
    solver = z3.Solver()
    solver.set("timeout", max(1, int(time_limit * 1000)))
    s = [z3.Int(f"s{i}") for i in range(prob.size)]
    k = [z3.Int(f"k{i}") for i in range(prob.size)]
    p = [z3.Int(f"p{i}") for i in range(prob.size)]
    for i in range(prob.size):
        solver.add(s[i] == k[i] * period + p[i], p[i] >= 0, p[i] < period, k[i] >= 0)
        solver.add(s[i] >= prob.head[i], s[i] + prob.duration[i] + prob.tail[i] <= top)
        for j in prob.succs[i]:
            solver.add(s[j] >= s[i] + prob.duration[i])
    solver.add(p[prob.topo[0]] == 0)
    pairs = set()
    for on in prob.on_device:
        for x, a in enumerate(on):
            for b in on[x + 1 :]:
                pairs.add((a, b))
    for a, b in sorted(pairs):
        da, db = prob.duration[a], prob.duration[b]
        solver.add(
            z3.Or(
                z3.And(p[a] + da <= p[b], p[b] + db <= p[a] + period),
                z3.And(p[b] + db <= p[a], p[a] + da <= p[b] + period),
            )
        )
    for d, on in enumerate(prob.on_device):
        if not prob.limited(d) or prob.net[d] != 0 or not any(prob.delta[i] > 0 for i in on):
            continue
        base = prob.static[d] - z3.Sum([prob.delta[b] * k[b] for b in on if prob.delta[b]] or [z3.IntVal(0)])
        for a in on:
            if prob.delta[a] > 0:
                wrap = [z3.If(p[b] > p[a], prob.delta[b], 0) for b in on if b != a and prob.delta[b]]
                solver.add(base - z3.Sum(wrap or [z3.IntVal(0)]) <= prob.capacity[d])
    verdict = solver.check()
    if verdict == z3.unsat:
        return Outcome(INFEASIBLE, None, time.perf_counter() - began)
    if verdict != z3.sat:
        return Outcome(UNKNOWN, None, time.perf_counter() - began)
    best = _read(solver.model(), s, period)
    status = FEASIBLE
    if optimize:
        status = _tighten(prob, solver, s, best, began, time_limit)
        best = status[1]
        status = status[0]
    return Outcome(status, best, time.perf_counter() - began)


def _read(model: z3.ModelRef, s: list, period: int) -> Repetend:
    return Repetend(period, tuple(model.eval(v, model_completion=True).as_long() for v in s))


def _tighten(prob, solver, s, best: Repetend, began: float, time_limit: float) -> tuple[str, Repetend]:
    """Bisect the span bound with push/pop, as the paper's code does for its objectives."""
    lo, hi = prob.critical_path, best.span(prob)
    while lo < hi:
        left = time_limit - (time.perf_counter() - began)
        if left <= 0:
            return FEASIBLE, best
        mid = (lo + hi) // 2
        solver.push()
        solver.set("timeout", max(1, int(left * 1000)))
        solver.add(*[v + prob.duration[i] <= mid for i, v in enumerate(s)])
        verdict = solver.check()
        if verdict == z3.sat:
            best = _read(solver.model(), s, best.period)
            hi = best.span(prob)
        elif verdict == z3.unsat:
            lo = mid + 1
        else:
            solver.pop()
            return FEASIBLE, best
        solver.pop()
    return OPTIMAL, best
