"""Baselines follow their closed forms and always pass the validator."""

import pytest

from lmexec.errors import UserError
from lmexec.tessel.baselines import BASELINES, applicable_baselines, baseline_schedule
from lmexec.tessel.shapes import SHAPES, build_placement


@pytest.mark.parametrize("stages", [1, 2, 4, 8])
@pytest.mark.parametrize("micro_batches", [1, 3, 8, 16])
@pytest.mark.parametrize("f, b", [(1, 3), (1, 2), (2, 5)])
def test_gpipe_and_1f1b_closed_forms(stages, micro_batches, f, b):
    placement = build_placement("vshape", stages, overrides={"F": {"duration": f}, "B": {"duration": b}})
    expected = (micro_batches + stages - 1) * (f + b)
    for name in ("gpipe", "1f1b"):
        schedule = baseline_schedule(placement, name, micro_batches)
        metrics = schedule.metrics()
        assert metrics.makespan == expected, name
        assert metrics.bubble_rate == pytest.approx((stages - 1) / (micro_batches + stages - 1)), name
        assert schedule.validate() == []


@pytest.mark.parametrize("stages, micro_batches", [(2, 4), (4, 8), (4, 4), (8, 16)])
def test_memory_of_gpipe_and_1f1b(stages, micro_batches):
    placement = build_placement("vshape", stages)
    gpipe = baseline_schedule(placement, "gpipe", micro_batches).metrics().peak_memory
    one_f_one_b = baseline_schedule(placement, "1f1b", micro_batches).metrics().peak_memory
    assert gpipe == (micro_batches,) * stages  # GPipe keeps every micro-batch's activations
    assert one_f_one_b == tuple(
        min(stages - s, micro_batches) for s in range(stages)
    )  # 1F1B: stages - s in flight


@pytest.mark.parametrize("devices, chunks", [(2, 2), (4, 2), (4, 3)])
@pytest.mark.parametrize("rounds", [1, 2, 4])
def test_interleaved_1f1b_closed_form(devices, chunks, rounds):
    """Megatron's interleaved schedule: bubble (D - 1)(f + b) with per-chunk f, b, vs (D - 1) v (f + b)."""
    placement = build_placement("interleaved", devices, chunks=chunks)
    n = rounds * devices
    schedule = baseline_schedule(placement, "interleaved", n)
    assert schedule.validate() == []
    assert schedule.makespan == n * chunks * 4 + (devices - 1) * 4
    gpipe = baseline_schedule(placement, "gpipe", n).metrics()
    assert max(schedule.metrics().peak_memory) <= max(gpipe.peak_memory)


def test_zbh1_beats_1f1b_on_the_v_shape_at_the_same_peak_memory():
    for devices, n in [(4, 8), (8, 16)]:
        zb = baseline_schedule(build_placement("zerobubble", devices), "zbh1", n).metrics()
        one = baseline_schedule(build_placement("vshape", devices), "1f1b", n).metrics()
        assert zb.makespan == one.makespan - (devices - 1) * 1  # saves (D - 1) * W
        assert max(zb.peak_memory) <= max(one.peak_memory)


def test_chimera_beats_gpipe_on_xshape():
    placement = build_placement("xshape", 4)
    chimera = baseline_schedule(placement, "chimera", 8)
    assert chimera.validate() == []
    assert chimera.makespan < baseline_schedule(placement, "gpipe", 8).makespan
    assert chimera.makespan >= placement.makespan_lower_bound(8)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("devices", [2, 4, 8])
@pytest.mark.parametrize("inference", [False, True])
def test_every_applicable_baseline_validates(shape, devices, inference):
    placement = build_placement(shape, devices, inference=inference)
    for n in (1, devices, 2 * devices + 1):
        schedules = applicable_baselines(placement, n)
        assert "gpipe" in schedules
        for name, schedule in schedules.items():
            assert schedule.validate() == [], (name, n)
            assert schedule.makespan >= placement.makespan_lower_bound(n) - 1e-9


@pytest.mark.parametrize(
    "shape, schedule",
    [("mshape", "1f1b"), ("vshape", "chimera"), ("vshape", "zbh1"), ("kshape", "interleaved")],
)
def test_inapplicable_baseline_is_refused_with_reason(shape, schedule):
    with pytest.raises(UserError, match=f"schedule '{schedule}'"):
        baseline_schedule(build_placement(shape, 4), schedule, 4)


def test_interleaved_needs_a_multiple_of_the_device_count():
    with pytest.raises(UserError, match="multiple of 4"):
        baseline_schedule(build_placement("interleaved", 4), "interleaved", 6)


def test_registry_names():
    assert set(BASELINES) == {"gpipe", "1f1b", "interleaved", "chimera", "zbh1"}


def _custom(blocks):
    from lmexec.tessel.placement import Placement

    return Placement.from_dict({"devices": 2, "blocks": blocks})


def test_1f1b_refuses_what_it_would_drop_instead_of_dropping_it():
    blocks = [
        {"name": "f0", "devices": [0], "kind": "forward", "duration": 1, "memory": 1},
        {"name": "f1", "devices": [1], "after": ["f0"], "kind": "forward", "duration": 1, "memory": 1},
        {"name": "i1", "devices": [1], "after": ["f1"], "kind": "backward_input", "duration": 2, "memory": -0.5},
        {"name": "i0", "devices": [0], "after": ["i1"], "kind": "backward_input", "duration": 2, "memory": -0.5},
        {"name": "w1", "devices": [1], "after": ["i1", "f1"], "kind": "backward_weight", "duration": 1, "memory": -0.5},
        {"name": "w0", "devices": [0], "after": ["i0"], "kind": "backward_weight", "duration": 1, "memory": -0.5},
    ]  # fmt: skip
    with pytest.raises(UserError, match="weight gradient right after one"):
        baseline_schedule(_custom(blocks), "1f1b", 3)
    assert "1f1b" not in applicable_baselines(_custom(blocks), 3)
    simple = [b for b in blocks if b["name"] != "w1"] + [{**blocks[4], "after": ["i1"]}]
    assert baseline_schedule(_custom(simple), "1f1b", 3).validate() == []


def test_baselines_of_a_placement_without_forwards_do_not_crash():
    only_w = _custom([{"name": "w", "devices": [0], "kind": "backward_weight", "duration": 1, "memory": 0}])
    with pytest.raises(UserError, match="no forward blocks"):
        baseline_schedule(only_w, "1f1b", 2)
    assert baseline_schedule(only_w, "gpipe", 2).validate() == []


def test_gpipe_refuses_a_forward_that_follows_a_backward():
    blocks = [
        {"name": "f0", "devices": [0], "kind": "forward", "duration": 1, "memory": 1},
        {"name": "b0", "devices": [0], "after": ["f0"], "kind": "backward", "duration": 2, "memory": -1},
        {"name": "f1", "devices": [1], "after": ["b0"], "kind": "forward", "duration": 1, "memory": 0},
    ]
    with pytest.raises(UserError, match="forward 'f1' depends on backward 'b0'"):
        baseline_schedule(_custom(blocks), "gpipe", 2)
    assert "gpipe" not in applicable_baselines(_custom(blocks), 2)
