"""Placements: built-ins match the paper's cases, round-trip through JSON, bad input is named."""

import json

import pytest

from lmexec.errors import UserError
from lmexec.tessel.block import BlockKind
from lmexec.tessel.placement import Placement
from lmexec.tessel.shapes import SHAPES, build_placement


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("devices", [2, 4, 8])
@pytest.mark.parametrize("inference", [False, True])
def test_builtin_round_trips_through_json(shape, devices, inference, tmp_path):
    placement = build_placement(shape, devices, inference=inference, capacity=devices + 2, static_memory=0.5)
    path = tmp_path / "p.json"
    placement.to_json(path)
    again = Placement.load(path)
    assert again == placement
    assert again.to_dict() == placement.to_dict()


@pytest.mark.parametrize(
    "shape, blocks, work",
    [  # block counts and per-device work at 4 devices, training (the paper's table)
        ("vshape", 8, 4), ("xshape", 16, 8), ("mshape", 10, 6), ("nnshape", 12, 8), ("mllm", 12, 8),
        ("kshape", 10, 6), ("finetune", 9, 4), ("alphafold", 16, 4), ("interleaved", 16, 8),
    ],
)  # fmt: skip
def test_builtin_defaults_match_paper(shape, blocks, work):
    placement = build_placement(shape, 4)
    assert len(placement.blocks) == blocks
    assert placement.device_work == (work,) * 4


def test_inference_variant_keeps_forwards_without_memory():
    placement = build_placement("mshape", 4, inference=True)
    assert all(b.kind is BlockKind.FORWARD and b.memory == 0 for b in placement.blocks)
    assert placement.device_work == (2.0,) * 4  # the paper's W_d for mshape inference


def test_kshape_is_a_dag_with_a_join():
    placement = build_placement("kshape", 4)
    join = placement.block("join.f")
    assert set(join.after) == {"left.f1", "right.f1"}
    assert join.devices == (0, 1, 2, 3) and join.memory == 1
    assert placement.block("join.b").memory == -1
    assert placement.block("left.b1").after == ("join.b",) and placement.block("right.b1").after == (
        "join.b",
    )


def test_zerobubble_releases_memory_between_input_and_weight_gradients():
    placement = build_placement("zerobubble", 4)
    for d in range(4):
        total = sum(b.memory for b in placement.blocks_on(d))
        assert total == pytest.approx(0.0)
        assert placement.block(f"w{d}").after == (f"i{d}",)


def test_overrides_apply_per_role():
    placement = build_placement("vshape", 4, overrides={"B": {"duration": 2}, "F": {"memory": 3}})
    assert {b.duration for b in placement.blocks if b.kind is BlockKind.BACKWARD} == {2}
    assert {b.memory for b in placement.blocks if b.kind is BlockKind.FORWARD} == {3}
    with pytest.raises(UserError, match="unknown block role"):
        build_placement("vshape", 4, overrides={"Q": {"duration": 1}})
    with pytest.raises(UserError, match="positive"):
        build_placement("vshape", 4, overrides={"F": {"duration": 0}})
    with pytest.raises(UserError, match="vshape has no block that --set I.duration would change"):
        build_placement("vshape", 4, overrides={"I": {"duration": 5}})
    with pytest.raises(UserError, match="finetune has no block that --set A.memory would change"):
        build_placement("finetune", 4, overrides={"A": {"memory": 1}})


@pytest.mark.parametrize("shape", ["mshape", "nnshape", "kshape", "mllm"])
def test_all_device_memory_is_kept_by_the_forward_and_released_by_its_backward(shape):
    placement = build_placement(shape, 2, overrides={"A": {"memory": 2}})
    all_device = [b for b in placement.blocks if len(b.devices) == 2]
    assert {b.memory for b in all_device if b.kind is BlockKind.FORWARD} == {2}
    assert {b.memory for b in all_device if b.kind is BlockKind.BACKWARD} == {-2}
    assert all(abs(sum(b.memory for b in placement.blocks_on(d))) < 1e-12 for d in range(2))


def _doc(**changes):
    doc = {"devices": 2, "capacity": [4, 4], "blocks": [
        {"name": "f0", "kind": "forward", "duration": 1, "memory": 1, "devices": [0]},
        {"name": "f1", "kind": "forward", "duration": 1, "memory": 1, "devices": [1], "after": ["f0"]},
        {"name": "b1", "kind": "backward", "duration": 2, "memory": -1, "devices": [1], "after": ["f1"]},
        {"name": "b0", "kind": "backward", "duration": 2, "memory": -1, "devices": [0], "after": ["b1"]},
    ]}  # fmt: skip
    doc.update(changes)
    return doc


def _with_block(index, **changes):
    doc = _doc()
    doc["blocks"][index] = {**doc["blocks"][index], **changes}
    return doc


@pytest.mark.parametrize(
    "doc, message",
    [
        (_with_block(0, devices=[5]), "unknown device 5"),
        (_with_block(0, after=["b0"]), "cycle in dependencies"),
        (_with_block(1, duration=0), "non-positive duration"),
        (_with_block(1, duration=-2), "non-positive duration"),
        (_with_block(1, after=["nope"]), "unknown block 'nope'"),
        (_with_block(1, name="f0"), "used twice"),
        (_with_block(1, kind="sideways"), "unknown kind 'sideways'"),
        (_with_block(1, duration="1"), "'duration' must be a number"),
        (_with_block(1, colour="red"), "unknown key"),
        (_doc(capacity=[0.5, 4]), "needs memory 1 on device 0"),
        (
            _with_block(3, memory=-2),
            "block 'b0' frees 2 on device 0, but the blocks it depends on took only 1",
        ),
        (
            _with_block(2, after=[]),
            "block 'b1' frees 1 on device 1, but the blocks it depends on took only 0",
        ),
        (
            _doc(
                blocks=[
                    *_doc()["blocks"],
                    {"name": "x", "duration": 1, "memory": -1, "devices": [0], "after": ["f0"]},
                ]
            ),
            "blocks 'b0', 'x' together free more on device 0 than the blocks they depend on took there",
        ),
        (  # the tolerance is per device: a big device 0 does not hide device 1's over-free
            _doc(
                blocks=[
                    {
                        **b,
                        "memory": b["memory"]
                        * (1e12 if b["devices"] == [0] else 100)
                        * (6 if b["name"] == "b1" else 1),
                    }
                    for b in _doc()["blocks"]
                ]
            ),  # fmt: skip
            "block 'b1' frees 600 on device 1, but the blocks it depends on took only 100",
        ),
        (_doc(capacity=[4, 4, 4]), "lists 3 values but the placement has 2 devices"),
        (_doc(devices=0), "'devices' must be an integer in 1..4096"),
        (_doc(devices=10**12), "'devices' must be an integer in 1..4096"),
        (_with_block(1, duration=10**400), "'duration' is too large"),
        (_doc(capacity=10**400), "capacity is too large"),
        (_doc(blocks="f0"), "'blocks' must be a list"),
        ({"blocks": []}, "missing the key 'devices'"),
        ([1, 2], "must be an object"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_bad_placement_json_names_the_problem(doc, message, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(UserError, match=message) as info:
        Placement.load(path)
    assert "\n" not in str(info.value)


def test_unparsable_json_gives_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"devices": 2,\n "blocks": [}')
    with pytest.raises(UserError, match=r"invalid JSON at line 2 column"):
        Placement.load(path)


def test_valid_user_placement_loads_with_per_device_capacity():
    placement = Placement.from_dict(_doc(capacity=[1, 3], static_memory=[0, 1]))
    assert placement.capacity == (1.0, 3.0) and placement.static_memory == (0.0, 1.0)
    assert placement.min_peak_memory == (1.0, 2.0)
    assert placement.critical_path == 6


def test_makespan_lower_bound_equals_1f1b_optimum_on_vshape():
    placement = build_placement("vshape", 4)
    for n, expected in [(1, 16), (2, 20), (4, 28), (128, 524)]:  # 4 (n + 3), the paper's figures
        assert placement.makespan_lower_bound(n) == expected


def test_min_peak_memory_is_a_tight_closure_bound():
    # xshape: device 0 holds the down chain's first stage and the up chain's last; running one chain
    # fully before the other needs only 1 unit, and a block that frees memory needs its own forward first.
    assert build_placement("xshape", 4).min_peak_memory == (1.0,) * 4
    assert build_placement("kshape", 4).min_peak_memory == (2.0,) * 4
    doc = {"devices": 1, "blocks": [
        {"name": "a", "memory": 2, "duration": 1, "devices": [0]},
        {"name": "free", "memory": -2, "duration": 1, "devices": [0], "after": ["a"]},
        {"name": "c", "memory": 1, "duration": 1, "devices": [0]},
    ]}  # fmt: skip
    assert Placement.from_dict(doc).min_peak_memory == (2.0,)  # run a, free, then c: peak 2, not 3


def test_min_peak_memory_counts_memory_never_released():
    doc = {"devices": 1, "blocks": [
        {"name": "a", "memory": 1, "duration": 1, "devices": [0]},
        {"name": "c", "memory": 1, "duration": 1, "devices": [0]},
    ]}  # fmt: skip
    assert Placement.from_dict(doc).min_peak_memory == (2.0,)


def test_inference_keeps_an_order_that_ran_through_a_backward_block():
    doc = {"devices": 2, "blocks": [
        {"name": "f0", "duration": 1, "memory": 1, "devices": [0]},
        {"name": "b0", "kind": "backward", "duration": 1, "memory": -1, "devices": [0], "after": ["f0"]},
        {"name": "f1", "duration": 1, "memory": 1, "devices": [1], "after": ["b0"]},
        {"name": "b1", "kind": "backward", "duration": 1, "memory": -1, "devices": [1], "after": ["f1"]},
    ]}  # fmt: skip
    inference = Placement.from_dict(doc).forward_only()
    assert [b.name for b in inference.blocks] == ["f0", "f1"]
    assert inference.block("f1").after == ("f0",)


def test_block_count_is_bounded_before_the_blocks_are_built():
    with pytest.raises(UserError, match="400000 blocks; at most 4096"):
        build_placement("interleaved", 2, chunks=100000)
    with pytest.raises(UserError, match="8192 blocks per micro-batch; at most 4096"):
        build_placement("vshape", 4096)


def _closed_sets(placement):
    """Every dependency-closed set of block names (brute force, small placements only)."""
    names = [b.name for b in placement.blocks]
    for mask in range(1 << len(names)):
        chosen = {n for i, n in enumerate(names) if mask >> i & 1}
        if all(placement.ancestors[n] <= chosen for n in chosen):
            yield chosen


@pytest.mark.parametrize("seed", range(40))
def test_min_peak_memory_equals_brute_force_over_closed_sets(seed):
    """On random small DAGs (weightless blocks, multi-device blocks, several frees per device), the
    closure bound computed on each device's blocks alone equals the enumeration over every closed set."""
    import random

    rng = random.Random(seed)
    while True:  # draw until the placement is valid (frees no more than its ancestors took)
        blocks = []
        for i in range(rng.randint(2, 8)):
            after = [f"b{j}" for j in range(i) if rng.random() < 0.35]
            devices = rng.sample(range(2), rng.choice((1, 1, 2)))
            memory = rng.choice((-2, -1, 0, 0, 1, 2, 3))
            blocks.append(
                {"name": f"b{i}", "duration": 1, "memory": memory, "devices": devices, "after": after}
            )
        try:
            placement = Placement.from_dict({"devices": 2, "blocks": blocks})
        except UserError:
            continue
        if any(b.memory < 0 for b in placement.blocks):
            break
    for device in range(2):
        weight = {b.name: b.memory for b in placement.blocks_on(device)}
        levels = []
        for block in placement.blocks_on(device):
            before = [
                sum(weight.get(n, 0) for n in s)
                for s in _closed_sets(placement)
                if placement.ancestors[block.name] <= s and block.name not in s
                and not s & {n for n, anc in placement.ancestors.items() if block.name in anc}
            ]  # fmt: skip
            levels.append(min(before) + block.memory)
        expected = max([0.0, sum(weight.values()), *levels])
        assert placement.min_peak_memory[device] == pytest.approx(expected)
