"""Gantt pictures of schedules and placements (matplotlib, PNG or SVG by file suffix).

One row per device, time on the x axis, one box per block instance coloured by block kind and
labelled with its micro-batch; a multi-device block spans the rows of its devices (one box per
contiguous run of devices); the repetend's bounds are thick red lines.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from lmexec.reporting import save_figure  # noqa: E402
from lmexec.tessel.block import BlockKind  # noqa: E402
from lmexec.tessel.schedule import Schedule  # noqa: E402

KIND_COLOURS = {
    BlockKind.FORWARD: "#4472C4",
    BlockKind.BACKWARD: "#ED7D31",
    BlockKind.BACKWARD_INPUT: "#C55A11",
    BlockKind.BACKWARD_WEIGHT: "#70AD47",
}
MULTI_DEVICE_HATCH = "//"


def _runs(devices: tuple[int, ...]) -> list[tuple[int, int]]:
    """Contiguous runs of device numbers as (first, last)."""
    out: list[tuple[int, int]] = []
    for device in sorted(devices):
        if out and device == out[-1][1] + 1:
            out[-1] = (out[-1][0], device)
        else:
            out.append((device, device))
    return out


def draw_gantt(schedule: Schedule, path: str | Path, title: str | None = None) -> Path:
    """Write the schedule's Gantt chart to ``path`` (format from the suffix: .png, .svg or .pdf)."""
    path = Path(path)
    placement = schedule.placement
    devices = placement.num_devices
    makespan = schedule.makespan or 1.0
    steps = makespan / min(b.duration for b in placement.blocks)
    width = min(40.0, max(8.0, 2.0 + 0.25 * steps))
    fig, ax = plt.subplots(figsize=(width, 0.6 * devices + 1.6))
    label_size = max(5.0, min(9.0, 400.0 / max(1, len(schedule.tasks) / devices)))
    for task in schedule.tasks:
        block = placement.block(task.block)
        colour = KIND_COLOURS[block.kind]
        for first, last in _runs(block.devices):
            ax.add_patch(Rectangle(
                (task.start, first + 0.05), block.duration, last - first + 0.9,
                facecolor=colour, edgecolor="black", linewidth=0.5,
                hatch=MULTI_DEVICE_HATCH if block.multi_device else None,
            ))  # fmt: skip
            ax.text(task.start + block.duration / 2, (first + last + 1) / 2, str(task.micro_batch),
                    ha="center", va="center", color="white", fontsize=label_size)  # fmt: skip
    if schedule.repetend is not None:
        for bound in schedule.repetend:
            ax.axvline(bound, color="red", linewidth=2.5)
    first = min((t.start for t in schedule.tasks), default=0.0)
    ax.set_xlim(first, first + max(makespan, 1e-9))  # makespan is a length, from the first start
    ax.set_ylim(devices, 0)
    ax.set_yticks([d + 0.5 for d in range(devices)], [f"device {d}" for d in range(devices)])
    ax.set_xlabel("time")
    kinds = sorted({placement.block(t.block).kind for t in schedule.tasks}, key=list(BlockKind).index)
    handles = [Patch(facecolor=KIND_COLOURS[k], edgecolor="black", label=k.value) for k in kinds]
    if any(b.multi_device for b in placement.blocks):
        handles.append(
            Patch(facecolor="white", edgecolor="black", hatch=MULTI_DEVICE_HATCH, label="multi-device")
        )
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    metrics = schedule.metrics()
    ax.set_title(
        title
        or f"{schedule.name or placement.name}: {placement.name}, {devices} devices, "
        f"{schedule.num_micro_batches} micro-batches, makespan {metrics.makespan:g}, "
        f"bubble {metrics.bubble_rate:.1%}",
        fontsize=10,
        loc="left",
    )
    fig.tight_layout()
    return save_figure(fig, path)
