"""Text renderings of a schedule: an ASCII Gantt for the terminal and a Chrome trace / Perfetto JSON."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from lmexec.tessel.schedule import Schedule


def ascii_gantt(schedule: Schedule, max_width: int = 160, unit: float | None = None) -> str:
    """One row per device, one cell per ``unit`` of time; a cell shows the block kind letter and the
    micro-batch (``F3``, ``B3`` ...), continued with ``-`` while the block runs, ``.`` when idle and
    ``|`` at the repetend's bounds. Long schedules are scaled down to ``max_width`` characters; a cell
    then shows the first block that starts in it (the trace and the PNG show every block)."""
    placement = schedule.placement
    if not schedule.tasks:
        return "(empty schedule)"
    if unit is None:
        unit = _common_unit([b.duration for b in placement.blocks])
    label_width = (
        max(len(f"{placement.block(t.block).kind.short}{t.micro_batch}") for t in schedule.tasks) + 1
    )
    start0 = min(t.start for t in schedule.tasks)
    steps = math.ceil(schedule.makespan / unit - 1e-9)
    scale = max(1, math.ceil(steps * label_width / max_width))
    cells = math.ceil(steps / scale)
    rows = []
    for device in range(placement.num_devices):
        row = ["." * label_width] * cells
        for task in schedule.tasks_on(device):
            block = placement.block(task.block)
            first = min(int(math.floor((task.start - start0) / unit + 1e-9)) // scale, cells - 1)
            last = max(
                first, int(math.ceil((task.start - start0 + block.duration) / unit - 1e-9)) // scale - 1
            )
            label = f"{block.kind.short}{task.micro_batch}".ljust(label_width, " ")
            if not row[first][0].isalnum():  # a block's start wins over another's tail (coarse cells)
                row[first] = label
            for cell in range(first + 1, min(last + 1, cells)):
                if row[cell].startswith("."):
                    row[cell] = "-" * label_width
        rows.append(row)
    if schedule.repetend is not None:
        for bound in schedule.repetend:
            cell = int(round((bound - start0) / unit)) // scale
            for row in rows:
                if 0 < cell < len(row):
                    row[cell] = "|" + row[cell][1:]
    header = f"time unit per cell: {unit * scale:g}"
    width = len(str(placement.num_devices - 1))
    return "\n".join([header] + [f"d{d:<{width}} " + "".join(r) for d, r in enumerate(rows)])


def _common_unit(durations: list[float]) -> float:
    """The largest time that divides every duration exactly (fractions with denominators up to 1000),
    or a quarter of the shortest one where there is none or it would be too fine to draw."""
    shortest = min(durations)
    unit = Fraction(0)
    for d in durations:
        frac = Fraction(d).limit_denominator(1000)
        if frac == 0 or float(frac) != d:
            return shortest / 4
        unit = _gcd(unit, frac)
    return float(unit) if float(unit) >= shortest / 20 else shortest / 4


def _gcd(a: Fraction, b: Fraction) -> Fraction:
    return Fraction(
        math.gcd(a.numerator * b.denominator, b.numerator * a.denominator), a.denominator * b.denominator
    )


def chrome_trace(schedule: Schedule, time_scale_us: float = 1000.0) -> dict[str, Any]:
    """Chrome trace / Perfetto JSON: one thread per device, one complete event per block instance.

    Times are multiplied by ``time_scale_us`` (default: one time unit shown as 1 ms).
    """
    placement = schedule.placement
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": 0, "args": {"name": schedule.name or placement.name}}
    ]
    for device in range(placement.num_devices):
        events.append(
            {"ph": "M", "name": "thread_name", "pid": 0, "tid": device, "args": {"name": f"device {device}"}}
        )
    for task in schedule.tasks:
        block = placement.block(task.block)
        for device in block.devices:
            events.append({
                "ph": "X", "pid": 0, "tid": device, "name": f"{task.block} mb{task.micro_batch}",
                "cat": block.kind.value, "ts": task.start * time_scale_us, "dur": block.duration * time_scale_us,
                "args": {"block": task.block, "micro_batch": task.micro_batch, "memory": block.memory},
            })  # fmt: skip
    return {"traceEvents": events, "displayTimeUnit": "ms"}
