"""The least memory one micro-batch needs on a device, for error messages that say what would fit.

Alone, a micro-batch's memory on device d depends only on the order in which the blocks start (time
is free), so the minimum is the smallest peak prefix sum of d's memory deltas over all orders that
respect the dependencies: a small CP-SAT model over block positions.
"""

from __future__ import annotations

from ortools.sat.python import cp_model

from lmexec.tessel.search.problem import IntProblem


def single_batch_minimum(prob: IntProblem, device: int, time_limit: float = 2.0) -> float | None:
    """Minimal peak memory (real units, static included) of one micro-batch on ``device``; None if unknown."""
    n = prob.size
    on = [i for i in prob.on_device[device] if prob.delta[i]]
    if not on:
        return prob.memory.real(prob.static[device])
    model = cp_model.CpModel()
    position = [model.new_int_var(0, n - 1, f"x{i}") for i in range(n)]
    model.add_all_different(position)
    for i in range(n):
        for j in prob.succs[i]:
            model.add(position[j] > position[i])
    peak = model.new_int_var(
        -sum(abs(prob.delta[i]) for i in on), sum(abs(prob.delta[i]) for i in on), "peak"
    )
    for a in on:
        terms = [prob.delta[a]]
        for b in on:
            if b != a:
                flag = model.new_bool_var(f"b{b}_{a}")
                model.add(position[b] < position[a]).only_enforce_if(flag)
                model.add(position[b] > position[a]).only_enforce_if(~flag)
                terms.append(prob.delta[b] * flag)
        model.add(peak >= sum(terms))
    model.add(peak >= 0)
    model.minimize(peak)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit
    solver.parameters.num_workers = 2
    if solver.solve(model) != cp_model.OPTIMAL:
        return None
    return prob.memory.real(prob.static[device] + int(solver.value(peak)))
