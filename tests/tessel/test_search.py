"""Tessel search: periods at the work bound, near the exact optimum, never worse than baselines."""

from __future__ import annotations

import math

import pytest

from lmexec.errors import UserError
from lmexec.tessel.baselines import applicable_baselines
from lmexec.tessel.placement import Placement
from lmexec.tessel.search import search
from lmexec.tessel.search.exact import solve_exact
from lmexec.tessel.search.problem import IntProblem
from lmexec.tessel.search.repetend import INFEASIBLE, solve_repetend_cpsat
from lmexec.tessel.shapes import build_placement

FAST = {"time_limit": 4.0, "completion_limit": 0.5}


@pytest.mark.parametrize("devices", [4, 8])
@pytest.mark.parametrize("shape", ["vshape", "xshape", "kshape", "zerobubble", "mshape"])
def test_period_equals_work_bound(shape: str, devices: int) -> None:
    """Memory = device count; mshape needs more to reach its bound (D + 2 at 4, D + 4 at 8 devices)."""
    memory = devices + (devices // 2 if shape == "mshape" else 0)
    placement = build_placement(shape, devices, capacity=memory)
    result = search(placement, 2 * devices, **FAST)
    assert result.period == placement.max_work
    assert result.period_optimal
    assert result.schedule.validate() == []
    assert max(result.schedule.metrics().peak_memory) <= memory


def test_tight_memory_period_is_proven() -> None:
    """mshape on 4 devices with memory 4: no repetend at the work bound 6; 7 is proven optimal."""
    placement = build_placement("mshape", 4, capacity=4)
    prob = IntProblem.build(placement)
    assert solve_repetend_cpsat(prob, 6, 10.0).status == INFEASIBLE
    result = search(placement, 8, **FAST)
    assert result.period == 7 and result.period_bound == 7 and result.period_optimal


@pytest.mark.parametrize("shape", ["vshape", "mshape", "kshape", "zerobubble", "finetune", "alphafold"])
def test_close_to_exact_optimum(shape: str) -> None:
    devices, n = 2, 8
    placement = build_placement(shape, devices, capacity=devices)
    result = search(placement, n, time_limit=4.0, completion_limit=2.0)
    exact = solve_exact(placement, n, time_limit=8.0)
    if not exact.optimal:
        pytest.skip("exact solver did not prove optimality in time")
    assert exact.schedule.validate() == []
    assert result.makespan <= 1.05 * exact.makespan + 1e-9
    assert result.makespan >= exact.bound - 1e-9


@pytest.mark.parametrize("shape", ["vshape", "xshape", "zerobubble", "mshape", "kshape", "interleaved"])
def test_never_worse_than_valid_baselines(shape: str) -> None:
    devices = 4
    memory = 2 * devices if shape == "interleaved" else devices
    placement = build_placement(shape, devices, capacity=memory)
    n = 2 * devices
    result = search(placement, n, time_limit=6.0, completion_limit=1.0)
    for name, baseline in applicable_baselines(placement, n).items():
        if not baseline.validate():  # the baseline fits the same memory
            assert result.makespan <= baseline.makespan + 1e-9, name


def test_inference_minimises_latency() -> None:
    placement = build_placement("kshape", 4)
    result = search(placement, 8, inference=True, **FAST)
    assert result.placement.is_inference
    assert result.schedule.validate() == []
    assert result.makespan == pytest.approx(result.makespan_bound)


def test_periods_skipped_by_the_doubling_are_proven_too() -> None:
    """One activation slot per device: device 0 holds it from f0 to b0, a 16-unit span, so 16 is optimal;
    the search steps past some periods on its way up and must still prove them infeasible."""
    result = search(build_placement("vshape", 4, capacity=1), 4, time_limit=10.0, completion_limit=0.5)
    assert result.period == 16 and result.period_bound == 16 and result.period_optimal


def test_durations_near_a_fraction_are_not_rounded_to_it() -> None:
    """30000.00002 is within 1e-9 (relative) of 30000: taken as exact, the schedule broke dependencies."""
    overrides = {"F": {"duration": 30000.00002}, "B": {"duration": 90000.00002}}
    result = search(build_placement("vshape", 2, overrides=overrides), 4, **FAST)
    assert result.schedule.validate() == []


def test_tiny_durations_are_not_taken_for_zero() -> None:
    placement = build_placement("vshape", 2, overrides={"F": {"duration": 1e-10}})
    result = search(placement, 8, **FAST)
    assert result.schedule.validate() == []
    assert result.period < 3.01  # B blocks alone: 3 per device
    assert result.period_bound <= placement.max_work + 1e-9


def test_float_durations_and_memory_map_back_exactly() -> None:
    placement = build_placement(
        "vshape",
        4,
        capacity=4 * 1.5e9,
        overrides={"F": {"duration": 1.25, "memory": 1.5e9}, "B": {"duration": 2.5, "memory": -1.5e9}},
    )
    result = search(placement, 8, **FAST)
    assert result.schedule.validate() == []
    assert result.period == pytest.approx(placement.max_work)


def test_profiled_like_floats_are_rounded_safely() -> None:
    placement = build_placement(
        "vshape",
        4,
        capacity=4 * 1.000123e9,
        overrides={
            "F": {"duration": 1.2345678, "memory": 1.000123e9},
            "B": {"duration": 3.3333331, "memory": -1.000123e9},
        },
    )
    result = search(placement, 8, **FAST)
    assert result.schedule.validate() == []
    assert result.makespan >= placement.makespan_lower_bound(8) - 1e-9
    assert result.period <= placement.max_work * 1.01


def test_one_micro_batch_and_n_smaller_than_in_flight() -> None:
    placement = build_placement("xshape", 4, capacity=4)
    for n in (1, 2, 3):
        result = search(placement, n, **FAST)
        assert result.schedule.validate() == []
        assert result.schedule.num_micro_batches == n


def test_infeasible_memory_names_device_and_minimum() -> None:
    with pytest.raises(UserError, match=r"needs memory 2 on device 0"):
        build_placement("kshape", 4, capacity=1)


def test_bad_arguments() -> None:
    placement = build_placement("vshape", 2)
    with pytest.raises(UserError, match="micro-batch count"):
        search(placement, 0)
    with pytest.raises(UserError, match="unknown solver"):
        search(placement, 2, solver="gurobi")


def test_result_dict_is_complete() -> None:
    result = search(build_placement("vshape", 4, capacity=4), 8, **FAST)
    data = result.to_dict()
    for key in ("period", "period_lower_bound", "period_optimal", "makespan", "makespan_lower_bound",
                "steady_bubble_rate", "peak_memory", "search_seconds"):  # fmt: skip
        assert key in data
    assert data["steady_bubble_rate"] == 0
    assert math.isclose(data["makespan"], 4 * (8 + 3))


@pytest.mark.parametrize("shape, memory, period", [("vshape", 4, 4), ("mshape", 4, 7), ("kshape", 6, 6)])
def test_z3_backend_agrees_with_cpsat(shape: str, memory: int, period: int) -> None:
    placement = build_placement(shape, 4, capacity=memory)
    result = search(placement, 8, solver="z3", time_limit=8.0, completion_limit=0.5)
    assert result.period == period and result.period_optimal
    assert result.schedule.validate() == []


def test_other_micro_batch_counts_reuse_the_repetend() -> None:
    from lmexec.tessel.search import schedule_for

    result = search(build_placement("vshape", 4, capacity=4), 8, **FAST)
    long = schedule_for(result, 64, time_limit=0.5)
    assert long.validate() == [] and long.makespan == 4 * (64 + 3)


@pytest.mark.parametrize(
    "shape, devices, most",
    [("interleaved", 32, 10), ("nnshape", 16, 13), ("nnshape", 32, 12), ("mllm", 32, 12), ("kshape", 16, 8)],
)
def test_greedy_repetend_is_valid_and_near_the_bound(shape: str, devices: int, most: int) -> None:
    """The greedy upper bound / fallback: milliseconds, a few units above the work bound, valid unrolled."""
    from lmexec.tessel.search.completion import complete, to_schedule
    from lmexec.tessel.search.greedy import greedy_repetend
    from lmexec.tessel.search.repetend import steady_memory_fits

    memory = 2 * devices if shape == "interleaved" else devices
    prob = IntProblem.build(build_placement(shape, devices, capacity=memory))
    rep = greedy_repetend(prob)
    assert rep is not None and max(prob.work) <= rep.period <= most
    assert steady_memory_fits(prob, rep)
    n = rep.in_flight(prob) + 2
    done = complete(prob, rep, n, 0.5)
    assert to_schedule(prob, done.starts, n, "greedy").validate() == []


@pytest.mark.parametrize(
    ("shape", "unit_memory", "byte_memory", "unit_capacity", "byte_capacity"),
    [
        ("vshape", {"F": {"memory": 1}, "B": {"memory": -1}},
         {"F": {"memory": 123456789}, "B": {"memory": -123456789}}, 2, 300000001),
        ("xshape", {"F": {"memory": 1}, "B": {"memory": -1}},
         {"F": {"memory": 123456789}, "B": {"memory": -123456789}}, 3, 370372367),  # 3 F + a few units of rounding
        ("zerobubble", {"F": {"memory": 1}, "I": {"memory": -0.5}, "W": {"memory": -0.5}},
         {"F": {"memory": 300000007}, "I": {"memory": -150000011}, "W": {"memory": -149999996}}, 3, 900000021),
    ],
)  # fmt: skip
def test_memory_in_bytes_is_bound_like_memory_in_units(
    shape, unit_memory, byte_memory, unit_capacity, byte_capacity
):
    """Byte-sized memory cannot be scaled exactly; rounding must still leave each micro-batch freeing what
    it took, or the periodic memory constraint is dropped and more micro-batches fly than fit."""
    units = search(build_placement(shape, 4, capacity=unit_capacity, overrides=unit_memory), 8, time_limit=5)
    placement = build_placement(shape, 4, capacity=byte_capacity, overrides=byte_memory)
    assert not IntProblem.build(placement).memory.exact
    assert all(net == 0 for net in IntProblem.build(placement).net)
    found = search(placement, 8, time_limit=5)
    assert found.schedule.validate() == []
    assert found.period == units.period and found.in_flight == units.in_flight


def test_memory_in_whole_large_units_is_scaled_exactly() -> None:
    """1e9-byte activations under a 3e9 capacity are 1 and 3 units: the search must find and prove what
    it does in plain units (it rounded each delta up, fit 2 of the 3 activations and 'proved' period 10)."""
    units = search(build_placement("mshape", 3, capacity=3), 12, **FAST)
    overrides = {"F": {"memory": 1e9}, "B": {"memory": -1e9}}
    placement = build_placement("mshape", 3, capacity=3e9, overrides=overrides)
    assert IntProblem.build(placement).exact
    found = search(placement, 12, **FAST)
    assert found.period == units.period and found.period_optimal and units.period_optimal
    assert found.schedule.validate() == [] and found.in_flight == units.in_flight


def test_rounded_memory_proves_no_period() -> None:
    """Memory that cannot be scaled exactly is rounded conservatively (tighter than the real limit), so
    a period proven infeasible on the integers may be feasible for real: no optimality claim then."""
    overrides = {"F": {"memory": 1000000007}, "B": {"memory": -1000000007}}
    placement = build_placement("mshape", 3, capacity=3000000022, overrides=overrides)
    assert not IntProblem.build(placement).memory.exact
    found = search(placement, 12, **FAST)
    assert found.schedule.validate() == []
    assert found.period_bound == placement.max_work < found.period and not found.period_optimal


def test_rounding_up_never_rounds_a_duration_down() -> None:
    """500000.0000005 lies a hair above a whole unit of the rounded scale; rounding it down made the
    search return a schedule that broke a dependency (an internal error)."""
    placement = Placement.from_dict({"devices": 2, "blocks": [
        {"name": "a", "duration": 1000000, "devices": [0]},
        {"name": "b", "duration": 500000.0000005, "devices": [1], "after": ["a"]},
        {"name": "c", "duration": 1, "devices": [0], "after": ["b"]},
    ]})  # fmt: skip
    assert not IntProblem.build(placement).time.exact
    assert search(placement, 1, **FAST).schedule.validate() == []


def test_a_schedule_from_the_direct_solver_claims_no_period() -> None:
    """Each micro-batch keeps half a unit: no repetend fits 6 of them, the direct solver's schedule is
    returned, and the period figures (of a repetend that was thrown away) must not describe it."""
    placement = build_placement("vshape", 4, capacity=4, overrides={"B": {"memory": -0.5}})
    result = search(placement, 6, **FAST)
    assert result.schedule.validate() == []
    assert not result.periodic and not result.period_optimal
    data = result.to_dict()
    assert data["periodic"] is False
    assert data["period"] is None and data["steady_bubble_rate"] is None and data["in_flight"] is None
    assert result.makespan > 4 * (6 + 3)  # slower than any period-4 schedule would be
