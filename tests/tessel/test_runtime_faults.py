"""A failing rank stops the whole job quickly, names itself, and leaves no process behind."""

from __future__ import annotations

import time

import psutil
import pytest

from lmexec.tessel.baselines import baseline_schedule
from lmexec.tessel.runtime.launcher import RankFailure, launch
from lmexec.tessel.runtime.model import GPTConfig
from lmexec.tessel.runtime.pipelining_adapter import export_actions
from lmexec.tessel.runtime.train import RunSpec, TrainJob, train_worker
from lmexec.tessel.shapes import build_placement

STOP_WITHIN = 60.0  # seconds, spawn and imports included (the machine is shared)


def _job(fault: tuple[int, str, int]) -> TrainJob:
    schedule = baseline_schedule(build_placement("vshape", 2), "1f1b", 2)
    spec = RunSpec("1f1b", export_actions(schedule), 2)
    return TrainJob(
        GPTConfig(layers=2, hidden=16, heads=2, vocab=32, seq_len=4), (spec,), 2, 1, steps=3, fault=fault
    )


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "expected"), [("raise", "rank 1 failed: RuntimeError: injected fault on rank 1"),
                                                ("kill", "rank 1 died (signal SIGKILL")])  # fmt: skip
def test_failed_rank_stops_the_others(mode, expected):
    began = time.monotonic()
    with pytest.raises(RankFailure) as info:
        # rank 1 fails at step 1, while rank 0 waits for it in the barrier / pipeline
        launch(train_worker, 2, _job((1, mode, 1)), timeout=120, grace=3)
    assert time.monotonic() - began < STOP_WITHIN
    assert info.value.rank == 1
    assert expected in str(info.value) and "stopped rank(s) [0]" in str(info.value)
    assert len(info.value.pids) == 2
    assert not any(psutil.pid_exists(pid) for pid in info.value.pids), "orphan rank process left behind"


@pytest.mark.slow
def test_job_that_runs_past_the_timeout_is_stopped():
    began = time.monotonic()
    with pytest.raises(RankFailure, match=r"timed out after 2 s; rank\(s\) \[0, 1\] had not finished"):
        launch(train_worker, 2, _job((1, "raise", 99)), timeout=2, grace=2)
    assert time.monotonic() - began < 20
