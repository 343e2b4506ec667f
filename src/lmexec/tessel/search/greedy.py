"""Greedy modulo scheduling: a valid repetend near the work bound in milliseconds, without a solver.

For a period P, blocks are placed one by one in a topological order, each at the earliest start
after its predecessors whose phase interval (start mod P, length = duration) is free on every one
of its devices' modulo-P occupancy. The result is checked against the same steady-state memory
constraint as the CP-SAT model; P grows until a placement fits. The driver uses it as an upper
bound (CP-SAT then only looks below it), as a hint, and as the fallback when CP-SAT settles nothing
in time, so no answer is ever a sequential "one micro-batch after another" period unless nothing
better fits.
"""

from __future__ import annotations

import time

from lmexec.tessel.search import repetend as rp
from lmexec.tessel.search.problem import IntProblem

GROWTH = 64  # past the first few periods, P grows by about 1/GROWTH per step


def _orders(prob: IntProblem) -> list[tuple[int, ...]]:
    """Topological priority orders: the placement's own, and by earliest start (ASAP time)."""
    index = {b: k for k, b in enumerate(prob.topo)}
    by_head = tuple(sorted(range(prob.size), key=lambda i: (prob.head[i], index[i])))
    by_slack = tuple(
        sorted(range(prob.size), key=lambda i: (prob.head[i], -prob.tail[i] - prob.duration[i], index[i]))
    )
    out: list[tuple[int, ...]] = []
    for order in (prob.topo, by_head, by_slack):
        if order not in out:
            out.append(order)
    return out


def _first_fit(busy, devices, ready: int, dur: int, period: int) -> int | None:
    """Earliest start >= ready whose phase interval is free on every device, if any."""
    t, limit = ready, ready + period
    while t < limit:
        clash = _clash(busy, devices, t % period, dur, period)
        if clash is None:
            return t
        t += clash
    return None


def place(prob: IntProblem, period: int, order: tuple[int, ...], reserve: bool = False) -> rp.Repetend | None:
    """ASAP modulo placement at ``period`` (no memory check); None when some block finds no slot.

    With ``reserve``, blocks on several devices first get phases (at their earliest unconstrained
    start, mod P), and are then placed at the first start with that phase after their predecessors:
    otherwise a pipeline's single-device blocks spread over every phase and leave none common to all
    devices (tensor-parallel blocks between pipeline stages).
    """
    if any(d > period for d in prob.duration) or max(prob.work) > period:
        return None
    busy: list[list[tuple[int, int]]] = [[] for _ in range(prob.num_devices)]  # phase intervals
    fixed: dict[int, int] = {}
    if reserve:
        for i in order:
            if len(prob.devices[i]) < 2:
                continue
            t = _first_fit(busy, prob.devices[i], prob.head[i], prob.duration[i], period)
            if t is None:
                return None
            fixed[i] = t % period
            for d in prob.devices[i]:
                busy[d].append((fixed[i], fixed[i] + prob.duration[i]))
        if not fixed:
            return None
    start = [0] * prob.size
    for i in order:
        ready = max((start[p] + prob.duration[p] for p in prob.preds[i]), default=0)
        dur = prob.duration[i]
        if i in fixed:
            t = ready + (fixed[i] - ready) % period
        else:
            t = _first_fit(busy, prob.devices[i], ready, dur, period)
            if t is None:
                return None
            for d in prob.devices[i]:
                busy[d].append((t % period, t % period + dur))
        start[i] = t
    return rp.Repetend(period, tuple(start))


def _clash(busy, devices, phase: int, dur: int, period: int) -> int | None:
    """None if [phase, phase + dur) mod P is free on every device, else how far to move right."""
    for d in devices:
        for a, b in busy[d]:
            # the occupied interval [a, b) and its copies one period earlier/later
            for shift in (-period, 0, period):
                lo, hi = a + shift, b + shift
                if lo < phase + dur and phase < hi:
                    return hi - phase
    return None


def greedy_repetend(prob: IntProblem, time_limit: float = 1.0, top: int | None = None) -> rp.Repetend | None:
    """Smallest period (scanned upward from the work bound) at which a greedy placement fits.

    Among the orders that fit at that period, the one with the shortest span is returned.
    """
    began = time.perf_counter()
    period = max(max(prob.work), max(prob.duration))
    top = top if top is not None else max(period, sum(prob.duration))
    orders = _orders(prob)
    steps = 0
    while period <= top:
        fits = [
            rep
            for order in orders
            for reserve in (False, True)
            if (rep := place(prob, period, order, reserve)) is not None and rp.steady_memory_fits(prob, rep)
        ]
        if fits:
            return min(fits, key=lambda r: r.span(prob))
        if time.perf_counter() - began > time_limit:
            return None
        steps += 1
        period = period + 1 if steps < 2 * GROWTH else max(period + 1, period + period // GROWTH)
    return None
