"""Adapter to torch's private pipelining API: pinned version, export, validation (no processes)."""

from __future__ import annotations

import pytest
import torch

from lmexec.tessel.baselines import baseline_schedule
from lmexec.tessel.block import Block, BlockKind
from lmexec.tessel.placement import Placement
from lmexec.tessel.runtime import pipelining_adapter as pa
from lmexec.tessel.schedule import orders_from_sequence, retime
from lmexec.tessel.search.driver import search
from lmexec.tessel.shapes import build_placement


def test_private_pipelining_api_is_the_pinned_one():
    """Fails loudly (listing every difference) when torch moves the private API the adapter uses."""
    assert torch.__version__.startswith(pa.TORCH_SERIES), (
        f"torch {torch.__version__}: re-check pipelining_adapter.py against this release and update TORCH_SERIES"
    )
    assert pa.api_problems() == []
    pa.require_api()


def test_require_api_names_what_moved(monkeypatch):
    monkeypatch.setattr(pa, "_EXPECTED_SIGNATURES", {"schedules._no_such_thing": ()})
    with pytest.raises(RuntimeError, match="_no_such_thing is gone"):
        pa.require_api()


@pytest.mark.parametrize(("shape", "devices"), [("vshape", 2), ("interleaved", 2), ("zerobubble", 3)])
def test_export_of_searched_schedules_is_valid(shape, devices):
    placement = build_placement(shape, devices)
    schedule = search(placement, 2 * devices, time_limit=5, portfolio=False).schedule
    actions = pa.export_actions(schedule)
    chain = pa.stage_chain(placement)
    owner = pa.validate_actions(actions, chain.num_stages, 2 * devices)
    assert owner == {s: d for s, d in enumerate(chain.devices)}
    letters = {a[len(str(a[0])) :][0] for items in actions.values() for a in items}
    assert letters == ({"F", "I", "W"} if shape == "zerobubble" else {"F", "B"})
    assert sum(len(v) for v in actions.values()) == len(placement.blocks) * 2 * devices


def test_interleaved_chain_maps_stage_to_device_mod_d():
    chain = pa.stage_chain(build_placement("interleaved", 2))
    assert chain.devices == (0, 1, 0, 1)
    assert pa.stage_ranks(chain) == {0: [0, 2], 1: [1, 3]}


def _user_chain(devices: list[int]) -> Placement:
    """A user chain with an arbitrary stage -> device map (stage s on devices[s])."""
    f = [
        Block(f"fwd{s}", BlockKind.FORWARD, 1.0, 1.0, (d,), (f"fwd{s - 1}",) if s else ())
        for s, d in enumerate(devices)
    ]
    b = []
    for s in reversed(range(len(devices))):
        prev = f"bwd{s + 1}" if s < len(devices) - 1 else f"fwd{s}"
        b.append(Block(f"bwd{s}", BlockKind.BACKWARD, 2.0, -1.0, (devices[s],), (prev,)))
    return Placement("user", max(devices) + 1, tuple(f + b))


def test_user_chain_with_permuted_devices_exports():
    placement = _user_chain([2, 0, 1])
    schedule = baseline_schedule(placement, "gpipe", 3)
    actions = pa.export_actions(schedule)
    assert actions[2][0] == "0F0" and actions[0][0] == "1F0"
    assert pa.validate_actions(actions, 3, 3) == {0: 2, 1: 0, 2: 1}


def test_validator_rejects_a_deadlocking_order():
    # rank 0 waits for 1B0 before running 0F1; rank 1 runs micro-batch 1 first and needs 0F1.
    actions = {0: ["0F0", "0B0", "0F1", "0B1"], 1: ["1F1", "1B1", "1F0", "1B0"]}
    with pytest.raises(
        pa.ScheduleExportError, match="deadlocks: rank 0 at 0B0 .* waits for 1B0 .*rank 1 at 1F1"
    ):
        pa.validate_actions(actions, 2, 2)


def test_validator_rejects_stage_on_two_ranks_and_missing_work():
    with pytest.raises(pa.ScheduleExportError, match="stage 0 is assigned to both rank 0 and rank 1"):
        pa.validate_actions({0: ["0F0", "1F0", "1B0"], 1: ["0B0"]}, 2, 1)
    with pytest.raises(pa.ScheduleExportError, match="stage 1, micro-batch 0: has F; needs"):
        pa.validate_actions({0: ["0F0", "0B0"], 1: ["1F0"]}, 2, 1)
    with pytest.raises(pa.ScheduleExportError, match="not a compute action"):
        pa.validate_actions({0: ["0SEND_F0"]}, 1, 1)


def test_order_that_breaks_the_plan_but_not_the_data_still_runs_torch_lowering():
    """A dependency-consistent order passes our check and torch's own validator + send/recv lowering."""
    placement = build_placement("zerobubble", 2)
    schedule = baseline_schedule(placement, "zbh1", 4)
    pa.validate_actions(pa.export_actions(schedule), 2, 4, with_torch=True)


def test_multi_device_and_branching_placements_are_refused_with_a_reason():
    with pytest.raises(pa.ScheduleExportError, match="occupy several devices"):
        pa.stage_chain(build_placement("mshape", 2))
    with pytest.raises(pa.ScheduleExportError, match="forward"):
        pa.stage_chain(build_placement("xshape", 2))
    inference = build_placement("vshape", 2, inference=True)
    with pytest.raises(pa.ScheduleExportError, match="training"):
        pa.stage_chain(inference)


def test_retimed_orders_roundtrip_through_export():
    placement = build_placement("vshape", 2)
    order = orders_from_sequence(placement, [(b, m) for m in range(2) for b in placement.topological_order])
    actions = pa.export_actions(retime(placement, order, 2))
    assert actions == {0: ["0F0", "0B0", "0F1", "0B1"], 1: ["1F0", "1B0", "1F1", "1B1"]}
    assert pa.actions_csv(actions) == "0F0,0B0,0F1,0B1\n1F0,1B0,1F1,1B1\n"
