"""Schedule: a start time for every (block, micro-batch), with an independent validator and metrics.

The validator trusts nothing about who produced the schedule: it re-checks completeness,
dependencies, device exclusivity and memory at every instant, and reports each violation with the
blocks, device and time involved.

Memory model: a block's memory delta is applied on each of its devices at its start time; memory on
a device at time t is its static memory plus the deltas of all blocks started at or before t.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmexec.errors import UserError
from lmexec.tessel.placement import Placement

MAX_MICRO_BATCHES = 100_000
"""Far past any training step; bounds the work a typo (``1e300``) would ask for."""

EPS = 1e-9
"""Relative float noise tolerated when times or memory levels are compared (see the tolerances below)."""


@dataclass(frozen=True, order=True)
class Task:
    """One block instance: ``block`` of micro-batch ``micro_batch`` starting at ``start``."""

    start: float
    block: str
    micro_batch: int

    def label(self) -> str:
        return f"{self.block}#{self.micro_batch}"


@dataclass(frozen=True)
class Violation:
    """One broken rule, located precisely."""

    kind: str  # missing | duplicate | unknown | dependency | overlap | memory | negative-start
    message: str
    tasks: tuple[str, ...] = ()
    device: int | None = None
    time: float | None = None

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


@dataclass(frozen=True)
class Metrics:
    makespan: float
    busy: tuple[float, ...]
    bubble_rate: float
    peak_memory: tuple[float, ...]
    throughput: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "makespan": self.makespan,
            "busy": list(self.busy),
            "bubble_rate": self.bubble_rate,
            "peak_memory": list(self.peak_memory),
            "throughput": self.throughput,
        }


@dataclass
class Schedule:
    """Start times of every block of ``num_micro_batches`` micro-batches of ``placement``.

    ``repetend`` optionally marks the steady-state window [start, end) for pictures.
    """

    placement: Placement
    num_micro_batches: int
    tasks: list[Task]
    name: str = ""
    repetend: tuple[float, float] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tasks = sorted(self.tasks)

    # ---- geometry --------------------------------------------------------------------------
    def duration(self, task: Task) -> float:
        return self.placement.block(task.block).duration

    def end(self, task: Task) -> float:
        return task.start + self.duration(task)

    @property
    def makespan(self) -> float:
        if not self.tasks:
            return 0.0
        return max(self.end(t) for t in self.tasks) - min(t.start for t in self.tasks)

    def time_tolerance(self) -> float:
        """How far apart two times may be and still count as equal: float noise relative to the
        schedule's times, and far below its shortest block (an absolute 1e-9 let blocks of 1e-10
        overlap unseen)."""
        durations = [b.duration for b in self.placement.blocks]
        starts = [abs(t.start) for t in self.tasks if math.isfinite(t.start)]
        scale = max(durations + starts, default=1.0)
        return min(EPS * scale, 1e-6 * min(durations, default=scale))

    def memory_tolerance(self) -> float:
        """Float noise tolerated on a memory level, relative to the placement's memory figures."""
        p = self.placement
        figures = [abs(b.memory) for b in p.blocks] + [abs(s) for s in p.static_memory]
        figures += [c for c in p.capacity if math.isfinite(c)]
        return EPS * max(figures + [1e-300])

    def tasks_on(self, device: int) -> list[Task]:
        index = self.placement.index  # unknown block names are reported by validate(), not here
        return [t for t in self.tasks if t.block in index and device in self.placement.block(t.block).devices]

    def device_orders(self) -> list[list[tuple[str, int]]]:
        """Per device, the (block, micro-batch) sequence in start order: the schedule's IR."""
        return [
            [(t.block, t.micro_batch) for t in self.tasks_on(d)] for d in range(self.placement.num_devices)
        ]

    def memory_profile(self, device: int, tolerance: float | None = None) -> list[tuple[float, float]]:
        """Step function (time, memory after all deltas at that time) for one device; starts closer
        than ``tolerance`` (default :meth:`time_tolerance`) count as one time."""
        deltas: dict[float, float] = defaultdict(float)
        tolerance = self.time_tolerance() if tolerance is None else tolerance
        for task in self.tasks_on(device):
            deltas[_quantize(task.start, tolerance)] += self.placement.block(task.block).memory
        level = self.placement.static_memory[device]
        profile = [(-math.inf, level)]
        for time in sorted(deltas):
            level += deltas[time]
            profile.append((time, level))
        return profile

    def checked_part(self) -> Schedule:
        """This schedule without the tasks :meth:`validate` cannot place (unknown block, start not finite),
        so an invalid file still gets figures for the rest."""
        kept = [t for t in self.tasks if t.block in self.placement.index and math.isfinite(t.start)]
        if len(kept) == len(self.tasks):
            return self
        return Schedule(
            self.placement, self.num_micro_batches, kept, self.name, self.repetend, dict(self.info)
        )

    # ---- checks ----------------------------------------------------------------------------
    def validate(self) -> list[Violation]:
        """All violations (empty when the schedule is valid)."""
        p = self.placement
        out: list[Violation] = []
        eps, memory_eps = self.time_tolerance(), self.memory_tolerance()
        seen: dict[tuple[str, int], Task] = {}
        bad_start: set[tuple[str, int]] = set()
        for task in self.tasks:
            key = (task.block, task.micro_batch)
            if not math.isfinite(task.start):
                bad_start.add(key)
                out.append(Violation("bad-start", f"{task.label()} starts at {task.start} (not a finite time)",
                                     (task.label(),)))  # fmt: skip
                continue
            if task.block not in p.index or not 0 <= task.micro_batch < self.num_micro_batches:
                out.append(
                    Violation(
                        "unknown", f"{task.label()} is not a block of this placement/batch", (task.label(),)
                    )
                )
                continue
            if key in seen:
                out.append(Violation("duplicate", f"{task.label()} runs twice (at {seen[key].start:g} and {task.start:g})",
                                     (task.label(),), time=task.start))  # fmt: skip
                continue
            if task.start < -eps:
                out.append(Violation("negative-start", f"{task.label()} starts at {task.start:g} < 0", (task.label(),),
                                     time=task.start))  # fmt: skip
            seen[key] = task
        for m in range(self.num_micro_batches):
            for block in p.blocks:
                if (block.name, m) not in seen and (block.name, m) not in bad_start:
                    out.append(Violation("missing", f"{block.name}#{m} never runs", (f"{block.name}#{m}",)))
        for (name, m), task in seen.items():
            for dep in p.block(name).after:
                pre = seen.get((dep, m))
                if pre is not None and self.end(pre) > task.start + eps:
                    out.append(Violation(
                        "dependency",
                        f"{task.label()} starts at {task.start:g} before its dependency {pre.label()} ends at {self.end(pre):g}",
                        (pre.label(), task.label()), time=task.start))  # fmt: skip
        for device in range(p.num_devices):
            running: Task | None = None
            for task in sorted(t for t in seen.values() if device in p.block(t.block).devices):
                if running is not None and task.start < self.end(running) - eps:
                    out.append(Violation(
                        "overlap",
                        f"device {device}: {task.label()} starts at {task.start:g} while {running.label()} runs "
                        f"until {self.end(running):g}",
                        (running.label(), task.label()), device=device, time=task.start))  # fmt: skip
                if running is None or self.end(task) > self.end(running):
                    running = task
            cap = p.capacity[device]
            for time, level in self.memory_profile(device, eps):
                if level > cap + memory_eps:
                    started = tuple(
                        t.label() for t in self.tasks_on(device) if abs(_quantize(t.start, eps) - time) <= eps
                    )
                    where = "static memory" if math.isinf(time) else f"time {time:g}"
                    out.append(Violation(
                        "memory",
                        f"device {device}: memory {level:g} exceeds capacity {cap:g} at {where}"
                        + (f" (started then: {', '.join(started)})" if started else ""),
                        started, device=device, time=None if math.isinf(time) else time))  # fmt: skip
                    break
        return out

    def check(self) -> Schedule:
        """Raise :class:`UserError` listing the first violations unless the schedule is valid."""
        problems = self.validate()
        if problems:
            more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
            raise UserError(f"invalid schedule {self.name!r}: " + "; ".join(map(str, problems[:5])) + more)
        return self

    # ---- metrics ---------------------------------------------------------------------------
    def metrics(self) -> Metrics:
        p = self.placement
        makespan = self.makespan
        busy = tuple(sum(self.duration(t) for t in self.tasks_on(d)) for d in range(p.num_devices))
        eps = self.time_tolerance()
        peak = tuple(max(level for _, level in self.memory_profile(d, eps)) for d in range(p.num_devices))
        bubble = 1.0 - sum(busy) / (p.num_devices * makespan) if makespan > 0 else 0.0
        return Metrics(makespan, busy, bubble, peak, self.num_micro_batches / makespan if makespan else 0.0)

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "micro_batches": self.num_micro_batches,
            "placement": self.placement.to_dict(),
            "repetend": list(self.repetend) if self.repetend else None,
            "tasks": [{"block": t.block, "micro_batch": t.micro_batch, "start": t.start} for t in self.tasks],
            "metrics": self.metrics().to_dict(),
            "info": self.info,
        }

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        try:
            placement = Placement.from_dict(data["placement"])
            tasks = [Task(_time(t["start"], "a task's start"), str(t["block"]), _whole(t["micro_batch"], "micro_batch"))
                     for t in data["tasks"]]  # fmt: skip
            repetend = tuple(_time(v, "repetend") for v in data["repetend"]) if data.get("repetend") else None
            if repetend is not None and (len(repetend) != 2 or not all(math.isfinite(v) for v in repetend)):
                raise UserError(f"schedule JSON: repetend must be [start, end], finite, got {list(repetend)}")
            micro_batches = _whole(data["micro_batches"], "micro_batches")
            if not 1 <= micro_batches <= MAX_MICRO_BATCHES:
                raise UserError(
                    f"schedule JSON: micro_batches must be in 1..{MAX_MICRO_BATCHES}, got {micro_batches}"
                )
            name = data.get("name", "")
            if not isinstance(name, str):
                raise UserError(f"schedule JSON: name must be a string, got {name!r}")
            return cls(placement, micro_batches, tasks, name, repetend, dict(data.get("info") or {}))
        except UserError:
            raise
        except KeyError as error:
            raise UserError(f"schedule JSON is missing the key {error.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError) as error:
            raise UserError(f"schedule JSON is malformed: {error}") from None

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        """Read a schedule file (``--save``), or the one schedule of a ``baseline --json`` report."""
        try:
            data = json.loads(Path(path).read_text())
            if isinstance(data, dict) and "tasks" not in data:
                data = _only_schedule_of_report(path, data)
            return cls.from_dict(data)
        except OSError as error:
            raise UserError(f"cannot read schedule file {path}: {error.strerror}") from None
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None
        except UnicodeDecodeError:
            raise UserError(f"schedule file {path} is not a JSON text file") from None
        except RecursionError:
            raise UserError(f"{path}: JSON nested too deeply to be a schedule") from None


def _time(value: Any, what: str) -> float:
    """A time from JSON: a number ("5" or true are mistakes; a non-finite start is the validator's to report)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"schedule JSON: {what} must be a number, got {value!r}")
    return float(value)


def _whole(value: Any, what: str) -> int:
    """A whole number from JSON; 1.7, "8" or true are mistakes, not numbers to round."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(float(value))
        or not float(value).is_integer()
    ):
        raise UserError(f"schedule JSON: {what} must be a whole number, got {value!r}")
    return int(value)


def _quantize(time: float, tolerance: float) -> float:
    """Group event times that differ only by float noise (``tolerance``)."""
    return round(time / tolerance) * tolerance if math.isfinite(time) else time


DeviceOrders = list[list[tuple[str, int]]]


def retime(placement: Placement, orders: DeviceOrders, num_micro_batches: int, name: str = "") -> Schedule:
    """Start every task as soon as possible, keeping each device's order and all dependencies.

    This is the pass that turns the order IR (what each device runs, in which order) into times.
    A multi-device block must appear in the order of each of its devices; it starts when all of
    them reach it. Raises :class:`UserError` when the orders deadlock.
    """
    position = [0] * placement.num_devices
    free = [0.0] * placement.num_devices
    done: dict[tuple[str, int], float] = {}
    tasks: list[Task] = []
    total = sum(len(o) for o in orders)
    remaining = total
    while remaining:
        progressed = False
        for device in range(placement.num_devices):
            if position[device] >= len(orders[device]):
                continue
            key = orders[device][position[device]]
            block = placement.block(key[0])
            if any(position[d] >= len(orders[d]) or orders[d][position[d]] != key for d in block.devices):
                continue
            if any((dep, key[1]) not in done for dep in block.after):
                continue
            start = max([free[d] for d in block.devices] + [done[(dep, key[1])] for dep in block.after])
            done[key] = start + block.duration
            tasks.append(Task(start, key[0], key[1]))
            for d in block.devices:
                free[d] = start + block.duration
                position[d] += 1
            remaining -= len(block.devices)
            progressed = True
        if not progressed:
            heads = [
                f"device {d}: {orders[d][position[d]][0]}#{orders[d][position[d]][1]}"
                for d in range(placement.num_devices)
                if position[d] < len(orders[d])
            ]
            raise UserError(f"device orders deadlock; waiting heads: {', '.join(heads)}")
    return Schedule(placement, num_micro_batches, tasks, name)


def orders_from_sequence(placement: Placement, sequence: Iterable[tuple[str, int]]) -> DeviceOrders:
    """Split one global task sequence into per-device orders (a multi-device task goes to each device)."""
    orders: DeviceOrders = [[] for _ in range(placement.num_devices)]
    for key in sequence:
        for d in placement.block(key[0]).devices:
            orders[d].append(key)
    return orders


def _only_schedule_of_report(path: str | Path, data: dict[str, Any]) -> dict[str, Any]:
    """A ``--json`` report in place of a schedule file: its single schedule, or an error that says how to get one."""
    schedules = data.get("schedules")
    if isinstance(schedules, dict) and len(schedules) == 1:
        return next(iter(schedules.values()))
    if isinstance(schedules, dict) and schedules:
        raise UserError(
            f"{path} is a --json report of {len(schedules)} schedules ({', '.join(schedules)}): "
            "write the one to check with --save"
        )
    if "search" in data:
        raise UserError(
            f"{path} is a search --json report (figures, no tasks): write the schedule with --save"
        )
    return data
