"""Integer view of a placement for the solvers (CP-SAT and z3 only take integers).

Durations and memory may be floats (profiled milliseconds and bytes). They are mapped to integers
either *exactly* (a common rational unit: denominators bounded, whole multiples divided by their
common factor) or, when that would make the
numbers too large, *conservatively* at a fixed resolution: durations and memory deltas are rounded
up, capacities down. A schedule that is valid on the integers is then valid on the real floats, so
:meth:`Schedule.validate` always passes on what the search returns. Rounding every delta up would
leave a micro-batch that frees all it took holding a few units on the integers, and the periodic
memory constraints need that balance, so :func:`_balanced_deltas` gives the excess back at the block
that frees a balanced group last (after every other memory change of its group, so no partial sum
drops below the real one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

from lmexec.tessel.placement import Placement

MAX_DENOMINATOR = 1000
TIME_RESOLUTION = 1000  # integer units for the longest block when exact scaling is too fine
MEMORY_RESOLUTION = 1_000_000
NO_LIMIT = 1 << 40


def _exact_unit(values: list[float], limit: int) -> Fraction | None:
    """The largest unit u with every v/u an integer (each v a fraction with denominator <=
    MAX_DENOMINATOR), if max|v|/u <= limit. Whole multiples share their common factor: 1e9-byte
    activations under a 3e9 capacity are 1 and 3 units, not "too fine"."""
    fracs = []
    for value in values:
        frac = Fraction(value).limit_denominator(MAX_DENOMINATOR)
        if float(frac) != value:  # only exact: 1e-10 is not 0, and 30000.00002 is not 30000
            return None
        fracs.append(frac)
    denominator = math.lcm(*(f.denominator for f in fracs))
    unit = Fraction(math.gcd(*(f.numerator * (denominator // f.denominator) for f in fracs)), denominator)
    biggest = max(abs(f) for f in fracs)
    return unit if biggest / unit <= limit else None


@dataclass(frozen=True)
class Scale:
    """Integer unit: real value = integer * ``unit``; ``exact`` when no rounding happened."""

    unit: Fraction
    exact: bool

    def up(self, value: float) -> int:
        q = Fraction(value) / self.unit
        return round(q) if self.exact else math.ceil(q)

    def down(self, value: float) -> int:
        q = Fraction(value) / self.unit
        return round(q) if self.exact else math.floor(q)

    def real(self, value: int) -> float:
        return float(value * self.unit)


def _make_scale(values: list[float], resolution: int) -> Scale:
    nonzero = [v for v in values if v != 0]
    if not nonzero:
        return Scale(Fraction(1), True)
    unit = _exact_unit(nonzero, resolution * 100)
    if unit is not None:
        return Scale(unit, True)
    return Scale(Fraction(max(abs(v) for v in nonzero)) / resolution, False)


def _balanced_deltas(placement: Placement, memory: Scale) -> tuple[int, ...]:
    """Deltas rounded up, then balanced group by group: on each device, from the last block backwards,
    a freeing block forms a group with its not yet grouped memory-changing ancestors there; when the
    group's real sum is 0, the block frees the group's integer excess too. Once that block has started
    its whole group has, so no partial sum drops below the real one. A block on several devices is
    adjusted only when every one of its devices asks for the same amount."""
    blocks = placement.blocks
    delta = [memory.up(b.memory) for b in blocks]
    if memory.exact:
        return tuple(delta)
    index = placement.index
    asks: dict[str, list[int]] = {}
    for device in range(placement.num_devices):
        grouped: set[str] = set()
        for name in reversed(placement.topological_order):
            block = placement.block(name)
            if device not in block.devices or block.memory >= 0 or name in grouped:
                continue
            group = [block] + [
                placement.block(a) for a in placement.ancestors[name]
                if a not in grouped and device in placement.block(a).devices and placement.block(a).memory != 0
            ]  # fmt: skip
            grouped.update(b.name for b in group)
            real = sum(b.memory for b in group)  # float noise may keep a balanced group off 0
            excess = sum(delta[index[b.name]] for b in group)
            if abs(real) <= 1e-9 * max(abs(b.memory) for b in group) and excess > 0:
                asks.setdefault(name, []).append(excess)
    for name, amounts in asks.items():
        if len(amounts) == len(placement.block(name).devices) and len(set(amounts)) == 1:
            delta[index[name]] -= amounts[0]
    return tuple(delta)


@dataclass(frozen=True)
class IntProblem:
    """The placement on integers: index-based blocks, durations, memory deltas, capacities."""

    placement: Placement
    time: Scale
    memory: Scale
    names: tuple[str, ...]
    duration: tuple[int, ...]
    delta: tuple[int, ...]
    devices: tuple[tuple[int, ...], ...]
    preds: tuple[tuple[int, ...], ...]
    succs: tuple[tuple[int, ...], ...]
    capacity: tuple[int, ...]  # NO_LIMIT when unlimited
    static: tuple[int, ...]

    @classmethod
    def build(cls, placement: Placement, time_resolution: int = TIME_RESOLUTION) -> IntProblem:
        blocks = placement.blocks
        time = _make_scale([b.duration for b in blocks], time_resolution)
        mem_values = [b.memory for b in blocks] + list(placement.static_memory)
        mem_values += [c for c in placement.capacity if math.isfinite(c)]
        memory = _make_scale(mem_values, MEMORY_RESOLUTION)
        index = placement.index
        return cls(
            placement,
            time,
            memory,
            tuple(b.name for b in blocks),
            tuple(max(1, time.up(b.duration)) for b in blocks),
            _balanced_deltas(placement, memory),
            tuple(b.devices for b in blocks),
            tuple(tuple(dict.fromkeys(index[a] for a in b.after)) for b in blocks),
            tuple(tuple(dict.fromkeys(index[s] for s in placement.successors[b.name])) for b in blocks),
            tuple(NO_LIMIT if math.isinf(c) else memory.down(c) for c in placement.capacity),
            tuple(memory.up(s) for s in placement.static_memory),
        )

    @property
    def exact(self) -> bool:
        """No rounding in time or memory: what the integer problem proves holds for the real one."""
        return self.time.exact and self.memory.exact

    @property
    def size(self) -> int:
        return len(self.names)

    @property
    def num_devices(self) -> int:
        return self.placement.num_devices

    @cached_property
    def on_device(self) -> tuple[tuple[int, ...], ...]:
        return tuple(
            tuple(i for i in range(self.size) if d in self.devices[i]) for d in range(self.num_devices)
        )

    @cached_property
    def topo(self) -> tuple[int, ...]:
        return tuple(self.placement.index[n] for n in self.placement.topological_order)

    @cached_property
    def work(self) -> tuple[int, ...]:
        return tuple(sum(self.duration[i] for i in on) for on in self.on_device)

    @cached_property
    def head(self) -> tuple[int, ...]:
        out = [0] * self.size
        for i in self.topo:
            out[i] = max((out[p] + self.duration[p] for p in self.preds[i]), default=0)
        return tuple(out)

    @cached_property
    def tail(self) -> tuple[int, ...]:
        out = [0] * self.size
        for i in reversed(self.topo):
            out[i] = max((out[s] + self.duration[s] for s in self.succs[i]), default=0)
        return tuple(out)

    @property
    def critical_path(self) -> int:
        return max(self.head[i] + self.duration[i] for i in range(self.size))

    @cached_property
    def net(self) -> tuple[int, ...]:
        """Memory a micro-batch leaves behind on each device (0 for a well-formed training placement)."""
        return tuple(sum(self.delta[i] for i in on) for on in self.on_device)

    def limited(self, device: int) -> bool:
        return self.capacity[device] < NO_LIMIT

    def makespan_bound(self, n: int) -> int:
        """Integer makespan lower bound: critical path; per device min head + n*W_d + min tail."""
        bound = self.critical_path
        for d, on in enumerate(self.on_device):
            if on:
                heads = min(self.head[i] for i in on)
                tails = min(self.tail[i] for i in on)
                bound = max(bound, heads + n * self.work[d] + tails)
        return bound
