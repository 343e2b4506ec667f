"""Placement: the blocks of one micro-batch, their dependency DAG, and the devices' memory.

A placement is what Tessel schedules: N micro-batches each run every block once. It is immutable and
validated on construction, so every later stage (schedules, baselines, search) can trust it.
JSON schema (see docs/tessel.md)::

    {"name": "vshape", "devices": 4,
     "capacity": 4 | [4, 4, 4, 4] | null,        # per-device memory limit, null = unlimited
     "static_memory": 0 | [0, 0, 0, 0],          # parameters/optimizer state, counted against capacity
     "blocks": [{"name": "f0", "kind": "forward", "duration": 1, "memory": 1,
                 "devices": [0], "after": []}, ...]}
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from lmexec.errors import UserError
from lmexec.tessel.block import Block, BlockKind

MAX_DURATION = 1e15  # beyond this, sums of durations lose all precision (and the solvers' integers overflow)
MAX_DEVICES = 4096  # far past any pipeline; a typo like 10**12 devices would exhaust memory, not fail
MAX_BLOCKS = 4096
"""Blocks per micro-batch: far past any pipeline (2048 stages of forward + backward); the dependency
closures grow with its square, so a typo like ``--chunks 100000`` must fail at once."""
SCHEMA_KEYS = {"name", "devices", "capacity", "static_memory", "blocks"}
BLOCK_KEYS = {"name", "kind", "duration", "memory", "devices", "after"}


def _per_device(value: Any, num_devices: int, what: str, default: float) -> tuple[float, ...]:
    """Expand a scalar or list into one float per device, with a clear error otherwise."""
    if value is None:
        return (default,) * num_devices
    if isinstance(value, bool):
        raise UserError(f"{what} must be a number or a list of {num_devices} numbers, got {value!r}")
    if isinstance(value, int | float):
        return (_amount(value, what),) * num_devices
    if isinstance(value, list | tuple):
        if len(value) != num_devices:
            raise UserError(f"{what} lists {len(value)} values but the placement has {num_devices} devices")
        out = []
        for item in value:
            if item is None:
                out.append(default)
            elif isinstance(item, int | float) and not isinstance(item, bool):
                out.append(_amount(item, what))
            else:
                raise UserError(f"{what} must hold numbers, got {item!r}")
        return tuple(out)
    raise UserError(f"{what} must be a number or a list of {num_devices} numbers, got {value!r}")


def _float(value: float, what: str) -> float:
    """``float(value)``, with a user error for JSON integers too large for a float."""
    try:
        return float(value)
    except OverflowError:
        raise UserError(f"{what} is too large: {str(value)[:20]}... ({len(str(value))} digits)") from None


def _amount(value: float, what: str) -> float:
    """A memory amount: NaN would switch every comparison off (a limit that never binds), so it is refused;
    static memory must be finite and >= 0, a capacity may be inf (unlimited)."""
    value = _float(value, what)
    if math.isnan(value) or (what == "static_memory" and not 0 <= value < math.inf):
        kind = "a finite number >= 0" if what == "static_memory" else "a number (inf or null: unlimited)"
        raise UserError(f"{what} must be {kind}, got {value}")
    return value


def exceeds(level: float, limit: float) -> bool:
    """``level > limit`` by more than float noise, relative to their size: memory may be in bytes or
    in fractions of a unit, and an absolute epsilon is wrong for one of the two."""
    return level > limit + 1e-9 * max(abs(level), abs(limit))


@dataclass(frozen=True)
class Placement:
    """Blocks of one micro-batch with dependencies, on ``num_devices`` devices with memory limits."""

    name: str
    num_devices: int
    blocks: tuple[Block, ...]
    capacity: tuple[float, ...] = field(default=())
    static_memory: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.num_devices, int) or not 1 <= self.num_devices <= MAX_DEVICES:
            raise UserError(f"placement {self.name!r}: device count must be an integer in 1..{MAX_DEVICES}")
        if len(self.blocks) > MAX_BLOCKS:
            raise UserError(
                f"placement {self.name!r}: {len(self.blocks)} blocks per micro-batch; at most {MAX_BLOCKS}"
            )
        object.__setattr__(
            self,
            "capacity",
            _per_device(
                None if self.capacity == () else self.capacity, self.num_devices, "capacity", math.inf
            ),
        )
        object.__setattr__(
            self,
            "static_memory",
            _per_device(
                None if self.static_memory == () else self.static_memory,
                self.num_devices,
                "static_memory",
                0.0,
            ),  # fmt: skip
        )
        self._validate()

    # ---- structure -------------------------------------------------------------------------
    def _validate(self) -> None:
        where = f"placement {self.name!r}"
        if not self.blocks:
            raise UserError(f"{where}: has no blocks")
        seen: set[str] = set()
        for block in self.blocks:
            if not block.name:
                raise UserError(f"{where}: a block has an empty name")
            if block.name in seen:
                raise UserError(f"{where}: block name {block.name!r} is used twice")
            seen.add(block.name)
            if not isinstance(block.kind, BlockKind):
                raise UserError(f"{where}: block {block.name!r} has kind {block.kind!r}, not a BlockKind")
            if not (isinstance(block.duration, int | float) and block.duration > 0):
                raise UserError(f"{where}: block {block.name!r} has non-positive duration {block.duration!r}")
            if not isinstance(block.memory, int | float) or isinstance(block.memory, bool):
                raise UserError(f"{where}: block {block.name!r} has memory {block.memory!r}, not a number")
            if not block.duration < MAX_DURATION or not math.isfinite(block.memory):
                raise UserError(
                    f"{where}: block {block.name!r} needs a duration below {MAX_DURATION:g} and a finite memory"
                )
            if not block.devices:
                raise UserError(f"{where}: block {block.name!r} occupies no device")
            if len(set(block.devices)) != len(block.devices):
                raise UserError(f"{where}: block {block.name!r} lists a device twice")
            for device in block.devices:
                if not isinstance(device, int) or not 0 <= device < self.num_devices:
                    raise UserError(
                        f"{where}: block {block.name!r} uses unknown device {device!r} "
                        f"(devices are 0..{self.num_devices - 1})"
                    )
        for block in self.blocks:
            for dep in block.after:
                if dep not in seen:
                    raise UserError(f"{where}: block {block.name!r} depends on unknown block {dep!r}")
                if dep == block.name:
                    raise UserError(f"{where}: block {block.name!r} depends on itself")
        _ = self.topological_order  # raises on a cycle
        self._check_frees(where)
        for device, (cap, static) in enumerate(zip(self.capacity, self.static_memory, strict=True)):
            need = self.min_peak_memory[device]
            if exceeds(need, cap):
                raise UserError(
                    f"{where}: one micro-batch alone needs memory {need:g} on device {device} "
                    f"(static {static:g}) but its capacity is {cap:g}"
                )

    def _check_frees(self, where: str) -> None:
        """Blocks may free only what the blocks they (transitively) depend on took on the same device:
        otherwise memory would go below zero, and the search could 'fit' more micro-batches by it. One
        free is checked against its ancestors (the clearest message), then every dependency-closed set
        of blocks at once (two frees of one allocation pass the first check, not the second)."""
        scale = [
            max((abs(b.memory) for b in self.blocks_on(d)), default=0.0) for d in range(self.num_devices)
        ]
        for block in self.blocks:
            if block.memory >= 0:
                continue
            for device in block.devices:
                before = sum(
                    self.block(a).memory
                    for a in self.ancestors[block.name]
                    if device in self.block(a).devices
                )
                if before + block.memory < -1e-9 * scale[device]:
                    raise UserError(
                        f"{where}: block {block.name!r} frees {-block.memory:g} on device {device}, but the blocks "
                        f"it depends on took only {before:g} there"
                    )
        for device in range(self.num_devices):
            if sum(b.memory < 0 for b in self.blocks_on(device)) < 2:
                continue  # one free alone: the check above is exact (its closure holds its ancestors)
            least, chosen = _least_closure_memory(self, device)
            if least < -1e-9 * scale[device]:
                frees = sorted(
                    n for n in chosen if self.block(n).memory < 0 and device in self.block(n).devices
                )
                raise UserError(
                    f"{where}: blocks {', '.join(map(repr, frees))} together free more on device {device} than "
                    f"the blocks they depend on took there (memory would reach {least:g})"
                )

    @cached_property
    def index(self) -> dict[str, int]:
        return {block.name: i for i, block in enumerate(self.blocks)}

    def block(self, name: str) -> Block:
        return self.blocks[self.index[name]]

    @cached_property
    def successors(self) -> dict[str, tuple[str, ...]]:
        succ: dict[str, list[str]] = {b.name: [] for b in self.blocks}
        for block in self.blocks:
            for dep in block.after:
                succ[dep].append(block.name)
        return {name: tuple(names) for name, names in succ.items()}

    @cached_property
    def topological_order(self) -> tuple[str, ...]:
        """Block names in a dependency-respecting order (stable: ties keep declaration order)."""
        remaining = {b.name: len(set(b.after)) for b in self.blocks}
        ready = [b.name for b in self.blocks if remaining[b.name] == 0]
        order: list[str] = []
        while ready:
            name = ready.pop(0)
            order.append(name)
            for succ in dict.fromkeys(self.successors[name]):
                remaining[succ] -= 1
                if remaining[succ] == 0:
                    ready.append(succ)
            ready.sort(key=self.index.__getitem__)
        if len(order) != len(self.blocks):
            cyclic = sorted(set(remaining) - set(order), key=self.index.__getitem__)
            raise UserError(
                f"placement {self.name!r}: cycle in dependencies among blocks {', '.join(cyclic)}"
            )
        return tuple(order)

    @cached_property
    def ancestors(self) -> dict[str, frozenset[str]]:
        out: dict[str, frozenset[str]] = {}
        for name in self.topological_order:
            acc: set[str] = set()
            for dep in self.block(name).after:
                acc.add(dep)
                acc |= out[dep]
            out[name] = frozenset(acc)
        return out

    def blocks_on(self, device: int) -> tuple[Block, ...]:
        return self._by_device[device]

    @cached_property
    def _by_device(self) -> tuple[tuple[Block, ...], ...]:
        on: list[list[Block]] = [[] for _ in range(self.num_devices)]
        for block in self.blocks:
            for device in dict.fromkeys(block.devices):
                on[device].append(block)
        return tuple(map(tuple, on))

    # ---- bounds ----------------------------------------------------------------------------
    @cached_property
    def device_work(self) -> tuple[float, ...]:
        """W_d: busy time of each device per micro-batch."""
        return tuple(sum(b.duration for b in self.blocks_on(d)) for d in range(self.num_devices))

    @property
    def max_work(self) -> float:
        """Lower bound of the steady-state period: the busiest device's work per micro-batch."""
        return max(self.device_work)

    @cached_property
    def head(self) -> dict[str, float]:
        """Longest dependency path ending where each block starts."""
        out: dict[str, float] = {}
        for name in self.topological_order:
            out[name] = max((out[d] + self.block(d).duration for d in self.block(name).after), default=0.0)
        return out

    @cached_property
    def tail(self) -> dict[str, float]:
        """Longest dependency path from each block's end to the end of its micro-batch."""
        out: dict[str, float] = {}
        for name in reversed(self.topological_order):
            out[name] = max((out[s] + self.block(s).duration for s in self.successors[name]), default=0.0)
        return out

    @property
    def critical_path(self) -> float:
        return max(self.head[b.name] + b.duration for b in self.blocks)

    def makespan_lower_bound(self, num_micro_batches: int) -> float:
        """Per device: min head + N * W_d + min tail; and the critical path of one micro-batch."""
        bound = self.critical_path
        for device in range(self.num_devices):
            on = self.blocks_on(device)
            if on:
                heads = min(self.head[b.name] for b in on)
                tails = min(self.tail[b.name] for b in on)
                bound = max(bound, heads + num_micro_batches * self.device_work[device] + tails)
        return bound

    @cached_property
    def min_peak_memory(self) -> tuple[float, ...]:
        """A lower bound of each device's peak memory when one micro-batch runs alone.

        When block b starts on device d, a set S of blocks has started that contains b's ancestors,
        excludes b and its descendants, and is closed under dependencies. The least memory S can
        leave on d is a minimum-weight closure problem, solved exactly as a minimum cut; the bound is
        the largest over b of static + min(S) + delta(b), and at least what stays allocated at the end.
        """
        return tuple(
            max([self.static_memory[d], self.static_memory[d] + sum(b.memory for b in self.blocks_on(d))]
                + [self.static_memory[d] + _least_memory_before(self, b, d) + b.memory for b in self.blocks_on(d)])
            for d in range(self.num_devices)
        )  # fmt: skip

    # ---- variants ----------------------------------------------------------------------------
    def with_memory(
        self, capacity: float | Sequence[float] | None, static_memory: float | Sequence[float] | None = None
    ) -> Placement:
        """The same blocks with another memory limit (None: unlimited)."""
        return Placement(
            self.name,
            self.num_devices,
            self.blocks,
            _per_device(capacity, self.num_devices, "capacity", math.inf),
            self.static_memory
            if static_memory is None
            else _per_device(static_memory, self.num_devices, "static_memory", 0.0),
        )

    def forward_only(self) -> Placement:
        """Inference variant: forward blocks only, no activation memory kept. A forward that depended
        on a dropped block now depends on the forwards that block depended on (transitively), so an
        order through a backward block is kept."""
        forwards = [b for b in self.blocks if b.kind is BlockKind.FORWARD]
        kept = {b.name for b in forwards}
        nearest: dict[str, tuple[str, ...]] = {}  # the kept blocks a block stands for as a dependency
        for name in self.topological_order:
            deps = self.block(name).after
            nearest[name] = (
                (name,) if name in kept else tuple(dict.fromkeys(x for d in deps for x in nearest[d]))
            )
        blocks = tuple(
            replace(b, memory=0.0, after=tuple(dict.fromkeys(x for d in b.after for x in nearest[d])))
            for b in forwards
        )
        return Placement(self.name, self.num_devices, blocks, self.capacity, self.static_memory)

    @property
    def is_inference(self) -> bool:
        return all(b.kind is BlockKind.FORWARD for b in self.blocks)

    # ---- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "devices": self.num_devices,
            "capacity": [None if math.isinf(c) else c for c in self.capacity],
            "static_memory": list(self.static_memory),
            "blocks": [b.to_dict() for b in self.blocks],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: Any) -> Placement:
        if not isinstance(data, dict):
            raise UserError("placement JSON must be an object with keys 'devices' and 'blocks'")
        unknown = set(data) - SCHEMA_KEYS
        if unknown:
            raise UserError(
                f"placement JSON has unknown key(s) {sorted(unknown)}; allowed: {sorted(SCHEMA_KEYS)}"
            )
        for key in ("devices", "blocks"):
            if key not in data:
                raise UserError(f"placement JSON is missing the key {key!r}")
        devices = data["devices"]
        if not isinstance(devices, int) or isinstance(devices, bool) or not 1 <= devices <= MAX_DEVICES:
            raise UserError(
                f"placement JSON: 'devices' must be an integer in 1..{MAX_DEVICES}, got {devices!r}"
            )
        if not isinstance(data["blocks"], list):
            raise UserError("placement JSON: 'blocks' must be a list of block objects")
        blocks = tuple(_block_from_dict(item, i) for i, item in enumerate(data["blocks"]))
        return cls(
            str(data.get("name", "custom")),
            devices,
            blocks,
            _per_device(data.get("capacity"), devices, "capacity", math.inf),
            _per_device(data.get("static_memory"), devices, "static_memory", 0.0),
        )

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise UserError(f"cannot read placement file {path}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(f"placement file {path} is not a JSON text file") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
            ) from None
        except RecursionError:
            raise UserError(f"{path}: JSON nested too deeply to be a placement") from None
        try:
            return cls.from_dict(data)
        except UserError as error:
            raise UserError(f"{path}: {error}") from None


def _block_from_dict(item: Any, position: int) -> Block:
    where = f"block #{position}"
    if not isinstance(item, dict):
        raise UserError(f"{where} must be an object, got {type(item).__name__}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise UserError(f"{where} needs a non-empty string 'name'")
    where = f"block {name!r}"
    unknown = set(item) - BLOCK_KEYS
    if unknown:
        raise UserError(f"{where} has unknown key(s) {sorted(unknown)}; allowed: {sorted(BLOCK_KEYS)}")
    kind_text = item.get("kind", "forward")
    try:
        kind = BlockKind(kind_text)
    except ValueError:
        kinds = ", ".join(k.value for k in BlockKind)
        raise UserError(f"{where} has unknown kind {kind_text!r}; use one of {kinds}") from None
    for key in ("duration", "memory"):
        value = item.get(key, 0 if key == "memory" else None)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise UserError(f"{where}: {key!r} must be a number, got {value!r}")
    if item["duration"] <= 0:
        raise UserError(f"{where} has non-positive duration {item['duration']!r}")
    devices = item.get("devices")
    if isinstance(devices, int) and not isinstance(devices, bool):
        devices = [devices]
    if not isinstance(devices, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in devices
    ):
        raise UserError(f"{where}: 'devices' must be a device number or a list of device numbers")
    after = item.get("after", [])
    if isinstance(after, str):
        after = [after]
    if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
        raise UserError(f"{where}: 'after' must be a list of block names")
    duration = _float(item["duration"], f"{where}: 'duration'")
    memory = _float(item.get("memory", 0), f"{where}: 'memory'")
    return Block(name, kind, duration, memory, tuple(devices), tuple(after))


def chain(blocks: Iterable[Block]) -> list[Block]:
    """Link blocks one after another (each depends on the previous one)."""
    out: list[Block] = []
    for block in blocks:
        out.append(replace(block, after=(out[-1].name,)) if out else block)
    return out


def _least_memory_before(placement: Placement, block: Block, device: int) -> float:
    """min over dependency-closed sets S (ancestors of ``block`` in, it and its descendants out) of the
    memory S leaves on ``device``."""
    ancestors = placement.ancestors[block.name]
    forced_out = {block.name} | {
        b.name for b in placement.blocks_on(device) if block.name in placement.ancestors[b.name]
    }  # only the device's blocks carry weight here (see _least_closure_memory)
    return _least_closure_memory(placement, device, ancestors, forced_out)[0]


def _least_closure_memory(
    placement: Placement,
    device: int,
    forced_in: frozenset[str] = frozenset(),
    forced_out: set[str] | None = None,
) -> tuple[float, set[str]]:
    """The least memory a dependency-closed set S of blocks (``forced_in`` in, ``forced_out`` out) leaves
    on ``device``, and the device's blocks of such an S: a maximum-profit closure with profit = -memory,
    via networkx min cut. Blocks that take no memory on the device weigh nothing, so the graph holds the
    device's blocks alone, each linked to its ancestors there (transitively): a set of them closed under
    that relation extends to a closed S of the same weight by adding the weightless ancestors. ``forced_in``
    must be closed and ``forced_out`` closed under descendants."""
    import networkx as nx

    forced_out = forced_out or set()
    on_device = [b for b in placement.blocks_on(device) if b.memory != 0]
    base = sum(b.memory for b in on_device if b.name in forced_in)
    free = [b for b in on_device if b.name not in forced_in and b.name not in forced_out]
    gain = sum(-b.memory for b in free if b.memory < 0)  # choosing a block that frees memory is a gain
    chosen_in = {b.name for b in on_device if b.name in forced_in}
    if gain == 0.0:
        return base, chosen_in
    graph = nx.DiGraph()
    graph.add_nodes_from(["source", "sink"])
    for b in free:
        if b.memory < 0:
            graph.add_edge("source", b.name, capacity=-b.memory)
        else:
            graph.add_edge(b.name, "sink", capacity=b.memory)
        for a in free:
            if a.name in placement.ancestors[b.name]:
                graph.add_edge(b.name, a.name)  # infinite: b in S needs a in S
    cut, (chosen, _) = nx.minimum_cut(graph, "source", "sink")
    return base - (gain - cut), chosen_in | (set(chosen) - {"source"})
