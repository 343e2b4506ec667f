"""What happened vs what was planned: a Chrome trace with both, and a side-by-side Gantt picture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmexec.reporting import save_figure
from lmexec.tessel.block import BlockKind
from lmexec.tessel.runtime.pipelining_adapter import stage_chain
from lmexec.tessel.runtime.plan import PlannedRun
from lmexec.tessel.runtime.train import RunResult

COLOURS = {"F": "#4472C4", "B": "#ED7D31", "I": "#C55A11", "W": "#70AD47"}


def planned_events(run: PlannedRun) -> list[dict[str, Any]]:
    """The plan as events shaped like measured ones (rank, stage, kind, micro_batch, start, end in ms)."""
    chain = stage_chain(run.schedule.placement)
    out = []
    for task in run.schedule.tasks:
        block = run.schedule.placement.block(task.block)
        stage, kind = chain.action(task.block)
        out.append({"rank": block.devices[0], "stage": stage, "kind": kind, "micro_batch": task.micro_batch,
                    "start": task.start, "end": task.start + block.duration})  # fmt: skip
    return out


def chrome_trace(pairs: list[tuple[PlannedRun, RunResult]]) -> dict[str, Any]:
    """One process per (schedule, planned|measured), one thread per rank; 1 ms = 1000 us."""
    events: list[dict[str, Any]] = []
    for i, (plan, result) in enumerate(pairs):
        step = result.steady_step()
        for j, (label, items) in enumerate(
            (("planned", planned_events(plan)), (f"measured step {step}", result.events[step]))
        ):
            pid = 2 * i + j
            events.append(
                {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"{plan.name}: {label}"}}
            )
            for rank in sorted({e["rank"] for e in items}):
                events.append(
                    {
                        "ph": "M",
                        "name": "thread_name",
                        "pid": pid,
                        "tid": rank,
                        "args": {"name": f"rank {rank}"},
                    }
                )
            for e in items:
                events.append({
                    "ph": "X", "pid": pid, "tid": e["rank"], "name": f"{e['stage']}{e['kind']}{e['micro_batch']}",
                    "cat": e["kind"], "ts": e["start"] * 1e3, "dur": (e["end"] - e["start"]) * 1e3,
                    "args": {"stage": e["stage"], "micro_batch": e["micro_batch"]},
                })  # fmt: skip
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def draw_planned_vs_measured(
    pairs: list[tuple[PlannedRun, RunResult]], path: str | Path, title: str = ""
) -> Path:
    """One row of two Gantt charts per schedule: planned (profiled durations) | measured (steady step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    path = Path(path)
    fig, axes = plt.subplots(len(pairs), 2, figsize=(16, 1.0 + 1.5 * len(pairs) * 1.2), squeeze=False)
    kinds_used: set[str] = set()
    for row, (plan, result) in enumerate(pairs):
        step = result.steady_step()
        sides = (
            ("planned", planned_events(plan), plan.predicted_ms),
            (f"measured (step {step})", result.events[step], result.makespan_ms[step]),
        )
        span = max(s[2] for s in sides)
        ranks = plan.schedule.placement.num_devices
        for col, (label, items, makespan) in enumerate(sides):
            ax = axes[row][col]
            t0 = min(e["start"] for e in items)
            for e in items:
                kinds_used.add(e["kind"])
                ax.add_patch(Rectangle((e["start"] - t0, e["rank"] + 0.08), e["end"] - e["start"], 0.84,
                                       facecolor=COLOURS[e["kind"]], edgecolor="black", linewidth=0.4))  # fmt: skip
                width = e["end"] - e["start"]
                if width > span / 60:
                    ax.text(e["start"] - t0 + width / 2, e["rank"] + 0.5, str(e["micro_batch"]), ha="center",
                            va="center", color="white", fontsize=7)  # fmt: skip
            ax.set_xlim(0, span * 1.02)
            ax.set_ylim(ranks, 0)
            ax.set_yticks([r + 0.5 for r in range(ranks)], [f"rank {r}" for r in range(ranks)])
            ax.set_title(f"{plan.name} {label}: makespan {makespan:.0f} ms", fontsize=9, loc="left")
            if row == len(pairs) - 1:
                ax.set_xlabel("ms")
    names = {"F": BlockKind.FORWARD.value, "B": BlockKind.BACKWARD.value, "I": BlockKind.BACKWARD_INPUT.value,
             "W": BlockKind.BACKWARD_WEIGHT.value}  # fmt: skip
    handles = [
        Patch(facecolor=COLOURS[k], edgecolor="black", label=names[k]) for k in "FBIW" if k in kinds_used
    ]
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return save_figure(fig, path, dpi=110)
