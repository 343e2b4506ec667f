"""Planning for the runtime: a searched order must beat the best baseline by --min-gain to be run."""

from __future__ import annotations

import pytest

from lmexec.errors import UserError
from lmexec.tessel.baselines import applicable_baselines, baseline_schedule
from lmexec.tessel.runtime.plan import baseline_preference, prefer_baseline
from lmexec.tessel.schedule import Schedule, Task
from lmexec.tessel.shapes import build_placement


def _renamed(schedule: Schedule, name: str) -> Schedule:
    return Schedule(schedule.placement, schedule.num_micro_batches, schedule.tasks, name)


def test_small_predicted_gain_runs_the_best_baseline_instead():
    placement = build_placement("zerobubble", 2)
    baselines = applicable_baselines(placement, 8)
    best = min(baselines.values(), key=baseline_preference)
    last = max(best.tasks, key=best.end)  # delaying the very last task keeps the schedule valid
    tasks = tuple(Task(t.start + 1.0, t.block, t.micro_batch) if t == last else t for t in best.tasks)
    slower = Schedule(placement, 8, tasks, "tessel-cpsat")
    assert not slower.validate() and slower.makespan == pytest.approx(best.makespan + 1.0)
    chosen = prefer_baseline(slower, 0.05)
    assert chosen.name == f"tessel-cpsat ({best.name})"
    assert chosen.makespan == pytest.approx(best.makespan)
    assert not chosen.validate()
    # equal prediction: with no margin the searched order is kept, with a margin the baseline wins
    tie = _renamed(best, "tessel-cpsat")
    assert prefer_baseline(tie, 0.0) is tie
    assert prefer_baseline(slower, 0.0) is slower  # 0: the search's result as it is
    assert prefer_baseline(tie, 0.05).name == f"tessel-cpsat ({best.name})"


@pytest.mark.parametrize("margin", [-0.1, float("nan"), float("inf")])
def test_negative_or_non_finite_margin_is_a_user_error(margin):
    placement = build_placement("vshape", 2)
    with pytest.raises(UserError, match="min-gain"):
        prefer_baseline(baseline_schedule(placement, "1f1b", 4), margin)


def test_ties_between_baselines_go_to_the_lower_peak_memory():
    placement = build_placement("vshape", 2)
    gpipe, one_f_one_b = (baseline_schedule(placement, n, 8) for n in ("gpipe", "1f1b"))
    assert gpipe.makespan == pytest.approx(one_f_one_b.makespan)
    assert max(one_f_one_b.metrics().peak_memory) < max(gpipe.metrics().peak_memory)
    chosen = prefer_baseline(_renamed(gpipe, "tessel-cpsat"), 0.05)
    assert chosen.name == "tessel-cpsat (1f1b)"
