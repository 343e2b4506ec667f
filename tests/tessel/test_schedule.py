"""The validator catches every kind of violation on hand-made schedules; metrics are exact."""

import json

import pytest

from lmexec.errors import UserError
from lmexec.tessel.baselines import baseline_schedule
from lmexec.tessel.placement import Placement
from lmexec.tessel.render import ascii_gantt
from lmexec.tessel.schedule import Schedule, Task
from lmexec.tessel.shapes import build_placement


def _placement(capacity=None):
    return Placement.from_dict({
        "devices": 2, "capacity": capacity, "blocks": [
            {"name": "f0", "kind": "forward", "duration": 1, "memory": 1, "devices": [0]},
            {"name": "f1", "kind": "forward", "duration": 1, "memory": 1, "devices": [1], "after": ["f0"]},
            {"name": "tp", "kind": "forward", "duration": 1, "memory": 0, "devices": [0, 1], "after": ["f1"]},
            {"name": "b1", "kind": "backward", "duration": 2, "memory": -1, "devices": [1], "after": ["tp"]},
            {"name": "b0", "kind": "backward", "duration": 2, "memory": -1, "devices": [0], "after": ["b1"]},
        ]})  # fmt: skip


def _good_tasks():
    # device 0: f0#0 f0#1 tp#0 . . b0#0 tp#1 . . b0#1 ; device 1: . f1#0 tp#0 b1#0 f1#1 . tp#1 b1#1
    return [
        Task(0, "f0", 0), Task(1, "f1", 0), Task(2, "tp", 0), Task(3, "b1", 0), Task(5, "b0", 0),
        Task(1, "f0", 1), Task(5, "f1", 1), Task(7, "tp", 1), Task(8, "b1", 1), Task(10, "b0", 1),
    ]  # fmt: skip


def _replace(tasks, label, start):
    block, mb = label.split("#")
    return [
        Task(start, t.block, t.micro_batch) if (t.block, t.micro_batch) == (block, int(mb)) else t
        for t in tasks
    ]


def test_good_schedule_is_valid_and_metrics_are_exact():
    schedule = Schedule(_placement(capacity=2), 2, _good_tasks())
    assert schedule.validate() == []
    m = schedule.metrics()
    assert m.makespan == 12
    assert m.busy == (8, 8)  # f0 x2 + tp x2 + b0 x2 on device 0
    assert m.bubble_rate == pytest.approx(1 - 16 / 24)
    assert m.peak_memory == (2, 1)
    assert m.throughput == pytest.approx(2 / 12)


def _kinds(schedule):
    return {v.kind for v in schedule.validate()}


def test_missing_and_duplicate_and_unknown():
    tasks = _good_tasks()
    assert _kinds(Schedule(_placement(), 2, tasks[:-1])) == {"missing"}
    assert "duplicate" in _kinds(Schedule(_placement(), 2, tasks + [Task(20, "b0", 1)]))
    assert "unknown" in _kinds(Schedule(_placement(), 2, tasks + [Task(20, "zz", 0)]))
    assert "unknown" in _kinds(Schedule(_placement(), 2, tasks + [Task(20, "f0", 2)]))


def test_dependency_violation_names_both_blocks():
    schedule = Schedule(_placement(), 2, _replace(_good_tasks(), "b0#1", 9.5))
    problems = schedule.validate()
    assert [v.kind for v in problems] == ["dependency"]
    assert problems[0].tasks == ("b1#1", "b0#1") and problems[0].time == 9.5


def test_overlap_on_a_device_names_device_and_time():
    schedule = Schedule(_placement(), 2, _replace(_good_tasks(), "f0#1", 0.5))
    problems = [v for v in schedule.validate() if v.kind == "overlap"]
    assert problems and problems[0].device == 0 and problems[0].time == 0.5
    assert set(problems[0].tasks) == {"f0#0", "f0#1"}


def test_multi_device_block_occupies_all_its_devices():
    # tp#1 moved onto device 1's b1#0 (3..5); device 0 is free then: overlaps on device 1 only
    tasks = _replace(_good_tasks(), "tp#1", 4)
    problems = [v for v in Schedule(_placement(), 2, tasks).validate() if v.kind == "overlap"]
    assert [p.device for p in problems] == [1]
    assert set(problems[0].tasks) == {"b1#0", "tp#1"}


def test_memory_violation_names_device_time_and_blocks():
    schedule = Schedule(_placement(capacity=[1, 2]), 2, _good_tasks())
    problems = [v for v in schedule.validate() if v.kind == "memory"]
    assert len(problems) == 1
    assert problems[0].device == 0 and problems[0].time == 1 and problems[0].tasks == ("f0#1",)
    assert "exceeds capacity 1" in problems[0].message


def test_static_memory_counts_against_capacity():
    placement = Placement.from_dict({**_placement().to_dict(), "capacity": [3, 3], "static_memory": [1.5, 0]})
    problems = Schedule(placement, 2, _good_tasks()).validate()
    assert [(v.kind, v.device) for v in problems] == [("memory", 0)]


def test_negative_start_is_reported():
    tasks = [Task(t.start - 1, t.block, t.micro_batch) for t in _good_tasks()]
    assert _kinds(Schedule(_placement(), 2, tasks)) == {"negative-start"}


def test_check_raises_user_error_with_details():
    with pytest.raises(UserError, match="overlap"):
        Schedule(_placement(), 2, _replace(_good_tasks(), "f0#1", 0.5)).check()


def test_schedule_json_round_trip(tmp_path):
    schedule = Schedule(_placement(capacity=2), 2, _good_tasks(), name="hand", repetend=(1.0, 5.0))
    schedule.save(tmp_path / "s.json")
    again = Schedule.load(tmp_path / "s.json")
    assert again.tasks == schedule.tasks and again.repetend == (1.0, 5.0) and again.validate() == []


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["tasks"][0].update(start="5"), "a task's start must be a number"),
        (lambda d: d["tasks"][0].update(start=True), "a task's start must be a number"),
        (lambda d: d["tasks"][0].update(start=10**400), "malformed"),
        (lambda d: d.update(micro_batches=10**9), "micro_batches must be in 1..100000"),
        (lambda d: d.update(micro_batches=1e300), "micro_batches must be in 1..100000"),
        (lambda d: d.update(repetend=["a", "b"]), "repetend must be a number"),
        (lambda d: d.update(repetend=[1.0, float("inf")]), r"repetend must be \[start, end\], finite"),
        (lambda d: d.update(repetend=[1.0, 2.0, 3.0]), r"repetend must be \[start, end\], finite"),
        (lambda d: d.update(name=[1]), "name must be a string"),
    ],
)
def test_schedule_json_mistakes_are_user_errors(tmp_path, change, message):
    data = Schedule(_placement(capacity=2), 2, _good_tasks(), name="hand", repetend=(1.0, 5.0)).to_dict()
    change(data)
    (tmp_path / "s.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        Schedule.load(tmp_path / "s.json")


@pytest.mark.parametrize("b_duration", [3.0, 1.3, 0.7])
def test_ascii_gantt_labels_every_block_when_durations_share_no_unit(b_duration):
    placement = build_placement("vshape", 2, overrides={"B": {"duration": b_duration}})
    rows = ascii_gantt(baseline_schedule(placement, "gpipe", 3)).splitlines()[1:]
    for row in rows:
        labels = row.replace("-", " ").replace(".", " ").replace("|", " ").split()[1:]
        assert sorted(labels) == ["B0", "B1", "B2", "F0", "F1", "F2"]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_ascii_gantt_draws_a_block_far_shorter_than_a_cell_at_the_very_end(schedule):
    placement = build_placement("vshape", 2, overrides={"B": {"duration": 1e-10}})
    header, *rows = ascii_gantt(baseline_schedule(placement, schedule, 3)).splitlines()
    assert header.startswith("time unit per cell") and len(rows) == 2
    assert all("F0" in row and "B" in row for row in rows)  # the last backward shows, in the last cell


def test_overlaps_of_tiny_blocks_are_caught():
    """Blocks of 1e-10: a fixed 1e-9 tolerance let all four run at once and called it valid."""
    placement = Placement.from_dict({"devices": 1, "capacity": 1, "blocks": [
        {"name": "f", "duration": 1e-10, "memory": 1, "devices": [0]},
        {"name": "b", "kind": "backward", "duration": 1e-10, "memory": -1, "devices": [0], "after": ["f"]},
    ]})  # fmt: skip
    together = Schedule(placement, 2, [Task(0, "f", 0), Task(0, "b", 0), Task(0, "f", 1), Task(0, "b", 1)])
    kinds = {v.kind for v in together.validate()}
    assert {"overlap", "dependency"} <= kinds
    apart = Schedule(placement, 2, [Task(i * 1e-10, name, i // 2) for i, name in enumerate("fbfb")])
    assert apart.validate() == [] and apart.metrics().peak_memory == (1,)


def test_memory_in_bytes_tolerates_float_noise():
    """Three activations of 333333333.3 bytes fill a 999999999.9 limit; their float sum is 1.2e-7 above
    it, noise far above an absolute 1e-9 but far below the bytes' own precision."""
    placement = Placement.from_dict({"devices": 1, "capacity": 999999999.9, "blocks": [
        {"name": "f", "duration": 1, "memory": 333333333.3, "devices": [0]},
        {"name": "b", "kind": "backward", "duration": 1, "memory": -333333333.3, "devices": [0], "after": ["f"]},
    ]})  # fmt: skip
    tasks = [Task(m, "f", m) for m in range(3)] + [Task(3 + m, "b", m) for m in range(3)]
    assert Schedule(placement, 3, tasks).validate() == []
