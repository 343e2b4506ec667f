"""Profiler: measured placements are well-formed and round-trip unchanged into the search; in-rank profiling."""

from __future__ import annotations

import json

import pytest

from lmexec.cli import main
from lmexec.tessel.block import BlockKind
from lmexec.tessel.placement import Placement
from lmexec.tessel.runtime.launcher import launch
from lmexec.tessel.runtime.model import GPTConfig, build_gpt_stages, lm_loss, split_layers, synthetic_batch
from lmexec.tessel.runtime.pipelining_adapter import stage_chain
from lmexec.tessel.runtime.profile import (
    ProfileJob,
    profile_in_ranks,
    profile_stages,
    profiled_placement,
    stage_count,
)
from lmexec.tessel.search.driver import search

CFG = GPTConfig(layers=4, hidden=32, heads=2, vocab=64, seq_len=8)


def _profiles(n_stages: int):
    stages = build_gpt_stages(CFG, n_stages)
    inputs, targets = synthetic_batch(CFG, 2, 0)
    return profile_stages(stages, inputs, targets, lm_loss, warmup=1, repeats=2)


@pytest.mark.parametrize("shape", ["vshape", "interleaved", "zerobubble"])
def test_profiled_placement_round_trips_into_search(shape, tmp_path):
    devices = 2
    profiles = _profiles(stage_count(shape, devices))
    placement = profiled_placement(profiles, shape, devices)
    path = tmp_path / "profiled.json"
    placement.to_json(path)
    loaded = Placement.load(path)
    assert loaded.to_dict() == placement.to_dict()
    result = search(loaded, 4, time_limit=5)
    assert result.schedule.placement.to_dict() == placement.to_dict()
    assert not result.schedule.validate()
    assert stage_chain(loaded).num_stages == len(profiles)
    out = tmp_path / "search.json"
    assert (
        main(["tessel", "search", "-p", str(path), "-n", "4", "--time-limit", "5", "--json", str(out)]) == 0
    )
    assert json.loads(out.read_text())["search"]["devices"] == devices


def test_profile_numbers_make_sense():
    profiles = _profiles(2)
    for p in profiles:
        assert p.forward_ms > 0 and p.backward_ms > 0 and p.weight_grad_ms > 0
        assert 0 < p.weight_grad_mb <= p.activation_mb
        assert p.static_mb == pytest.approx(4 * p.param_mb)
    # the first stage has no input gradient: its I is empty and W does the whole backward (as in torch)
    assert profiles[0].input_grad_ms < profiles[0].weight_grad_ms
    placement = profiled_placement(profiles, "zerobubble", 2)
    for d in range(2):  # a micro-batch gives back on each device all the activation memory it took
        assert sum(b.memory for b in placement.blocks_on(d)) == pytest.approx(0.0, abs=1e-9)
    kinds = {b.name[0]: b.kind for b in placement.blocks}
    assert kinds == {"f": BlockKind.FORWARD, "i": BlockKind.BACKWARD_INPUT, "w": BlockKind.BACKWARD_WEIGHT}
    assert placement.static_memory == pytest.approx([round(p.static_mb, 3) for p in profiles])


def test_profile_cli_writes_a_placement(tmp_path):
    out = tmp_path / "p.json"
    args = ["tessel", "profile", "-p", "vshape", "-d", "2", "--layers", "2", "--hidden", "16", "--heads", "2",
            "--vocab", "32", "--seq-len", "4", "--repeats", "1", "--warmup", "0", "-o", str(out)]  # fmt: skip
    assert main(args) == 0
    assert [b["name"] for b in json.loads(out.read_text())["blocks"]] == ["f0", "f1", "b1", "b0"]


def test_profile_in_ranks_measures_every_stage_on_its_own_rank():
    """Two ranks profile the four stages of an interleaved placement at once (stage s on rank s mod 2);
    rank 0 returns them in stage order, with the same memory figures as a profile taken alone."""
    job = ProfileJob(CFG, num_stages=4, micro_batch_size=2, warmup=0, repeats=1)
    together = launch(profile_in_ranks, 2, job, timeout=300)
    assert together[1] is None
    alone = _profiles(4)
    assert [p.stage for p in together[0]] == [0, 1, 2, 3]
    for a, b in zip(together[0], alone, strict=True):
        assert a.forward_ms > 0 and a.backward_ms > 0 and a.weight_grad_ms > 0
        assert (a.activation_mb, a.weight_grad_mb, a.param_mb) == pytest.approx(
            (b.activation_mb, b.weight_grad_mb, b.param_mb)
        )


@pytest.mark.parametrize("mode", ["ranks", "alone"])
def test_profile_cli_modes(tmp_path, mode):
    out = tmp_path / "p.json"
    args = ["tessel", "profile", "-p", "zerobubble", "-d", "2", "--layers", "2", "--hidden", "16", "--heads",
            "2", "--vocab", "32", "--seq-len", "4", "--repeats", "1", "--warmup", "0", "--profile-mode", mode,
            "-o", str(out)]  # fmt: skip
    assert main(args) == 0
    assert [b["name"] for b in json.loads(out.read_text())["blocks"]] == ["f0", "f1", "i1", "i0", "w1", "w0"]


def test_layer_split():
    assert split_layers(8, 3) == [2, 3, 3]
    assert split_layers(8, 2, [3, 5]) == [3, 5]
    stages = build_gpt_stages(CFG, 2, [1, 3])
    assert [len(s.layers) for s in stages] == [1, 3]
    assert stages[0].embed is not None and stages[1].head is not None


def test_train_cli_rejects_bad_requests_before_spawning(capsys):
    tiny = [
        "--layers",
        "2",
        "--hidden",
        "16",
        "--heads",
        "2",
        "--vocab",
        "32",
        "--seq-len",
        "4",
        "--repeats",
        "1",
    ]
    assert main(["tessel", "train", "-s", "searched,nope", *tiny]) == 2
    assert "unknown schedule" in capsys.readouterr().err
    assert main(["tessel", "train", "-p", "zerobubble", "-s", "interleaved", "-n", "4", *tiny]) == 2
    assert main(["tessel", "train", "-p", "zerobubble", "-d", "2", "--split", "1,2", *tiny]) == 2


def test_breakdown_of_a_run_that_followed_the_plan_exactly():
    from lmexec.tessel.runtime.analysis import breakdown
    from lmexec.tessel.runtime.plan import plan_runs
    from lmexec.tessel.runtime.trace import planned_events
    from lmexec.tessel.runtime.train import RunResult

    (plan,) = plan_runs(profiled_placement(_profiles(2), "zerobubble", 2), ["zbh1"], 4)
    events = planned_events(plan)
    span = max(e["end"] for e in events)
    result = RunResult("zbh1", [1.0, 1.0], [span, span], [span, span], [span, span], [events, events])
    why = breakdown(plan, result)
    assert why.ratio == pytest.approx(1.0)
    assert why.gap_ratio == pytest.approx(1.0, rel=1e-3)
    assert why.compute_inflation == pytest.approx(1.0, rel=1e-3)
