"""Property tests: on random placements every schedule the search returns is valid and above the bound."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmexec.errors import UserError
from lmexec.tessel.block import Block, BlockKind
from lmexec.tessel.placement import Placement
from lmexec.tessel.search import search


@st.composite
def placements(draw) -> Placement:
    """Random DAGs: single- and multi-device blocks, float durations, signed memory, per-device caps."""
    devices = draw(st.integers(1, 3))
    count = draw(st.integers(1, 6))
    neutral = draw(st.booleans())
    blocks = []
    for i in range(count):
        if draw(st.integers(0, 3)) == 0 and devices > 1:
            on = tuple(sorted(draw(st.sets(st.integers(0, devices - 1), min_size=2, max_size=devices))))
        else:
            on = (draw(st.integers(0, devices - 1)),)
        after = tuple(f"b{j}" for j in sorted(draw(st.sets(st.integers(0, i - 1), max_size=2)))) if i else ()
        duration = draw(st.sampled_from([1.0, 2.0, 3.0, 0.5, 1.5]))
        memory = 0.0 if neutral else float(draw(st.integers(0, 2)))  # frees only in pairs (below)
        blocks.append(Block(f"b{i}", BlockKind.FORWARD, duration, memory, on, after))
    if (
        neutral
    ):  # pair allocations with later releases on the same devices (a release depends on its allocation)
        for i in range(0, count - 1, 2):
            j = draw(st.integers(i + 1, count - 1))
            if blocks[i].devices == blocks[j].devices:
                amount = float(draw(st.integers(1, 2)))
                after = tuple(dict.fromkeys((*blocks[j].after, f"b{i}")))
                blocks[i] = Block(**{**blocks[i].__dict__, "memory": blocks[i].memory + amount})
                blocks[j] = Block(
                    **{**blocks[j].__dict__, "memory": blocks[j].memory - amount, "after": after}
                )
    free = Placement("random", devices, tuple(blocks))
    capacity = []
    for d in range(devices):
        if draw(st.booleans()):
            capacity.append(None)
        else:
            capacity.append(free.min_peak_memory[d] + draw(st.integers(0, 2)))
    return free.with_memory(capacity)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(placement=placements(), n=st.integers(1, 4))
def test_search_returns_valid_schedules_above_the_bound(placement: Placement, n: int) -> None:
    try:
        result = search(placement, n, time_limit=2.0, completion_limit=0.3)
    except UserError as error:  # only a genuine lack of room may stop it: it names device and memory
        assert "memory" in str(error) and "device" in str(error), str(error)
        return
    assert result.schedule.validate() == []
    assert result.makespan >= placement.makespan_lower_bound(n) - 1e-9
    assert result.period >= placement.max_work - 1e-9
    assert result.period_bound <= result.period + 1e-9
    assert math.isfinite(result.makespan)


def test_no_room_names_device_and_minimum_memory() -> None:
    """Two allocations that are never freed: alone, a micro-batch needs 2 although the cheap bound says 1."""
    blocks = (
        Block("a", BlockKind.FORWARD, 1.0, 1.0, (0,)),
        Block("b", BlockKind.FORWARD, 1.0, 1.0, (0,)),
    )
    placement = Placement("leak", 1, blocks)
    try:
        placement = placement.with_memory(1)
    except UserError as error:  # the placement's own bound may already catch it
        assert "device 0" in str(error)
        return
    try:
        search(placement, 2, time_limit=2.0)
    except UserError as error:
        assert "device 0" in str(error) and "memory 2" in str(error)
    else:
        raise AssertionError("expected a UserError")


def test_net_memory_growth_is_reported() -> None:
    blocks = (Block("a", BlockKind.FORWARD, 1.0, 1.0, (0,)),)
    placement = Placement("grow", 1, blocks).with_memory(3)
    assert search(placement, 3, time_limit=2.0).schedule.validate() == []
    try:
        search(placement, 4, time_limit=2.0)
    except UserError as error:
        assert "device 0" in str(error) and "at least 4" in str(error)
    else:
        raise AssertionError("expected a UserError")
