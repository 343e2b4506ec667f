"""Searched schedules executed by torch's pipeline runtime (gloo, CPU) equal a single-process step."""

from __future__ import annotations

import pytest

from lmexec.tessel.runtime.launcher import launch
from lmexec.tessel.runtime.model import GPTConfig
from lmexec.tessel.runtime.pipelining_adapter import export_actions, stage_chain
from lmexec.tessel.runtime.train import RunSpec, TrainJob, reference_step, train_worker
from lmexec.tessel.search.driver import search
from lmexec.tessel.shapes import build_placement

TOLERANCE = 1e-5
SHAPES = ("vshape", "interleaved", "zerobubble")


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 3])
def test_searched_schedules_match_single_process(devices):
    micro_batches = 2 * devices
    runs = []
    for shape in SHAPES:
        placement = build_placement(shape, devices)
        schedule = search(placement, micro_batches, time_limit=5, portfolio=False).schedule
        runs.append(RunSpec(shape, export_actions(schedule), stage_chain(placement).num_stages))
    model = GPTConfig(layers=2 * devices, hidden=32, heads=2, vocab=64, seq_len=8)
    job = TrainJob(model, tuple(runs), micro_batches, micro_batch_size=2, steps=1, capture_grads=True)
    results = launch(train_worker, devices, job, timeout=240)[0]
    assert [r.name for r in results] == list(SHAPES)
    for spec, result in zip(runs, results, strict=True):
        loss, grads = reference_step(job, spec.num_stages)
        assert abs(result.losses[0] - loss) <= TOLERANCE, spec.name
        assert set(result.grads) == set(grads), spec.name
        worst = max((result.grads[k] - grads[k]).abs().max().item() for k in grads)
        assert worst <= TOLERANCE, f"{spec.name}: max abs gradient difference {worst:.3g}"
