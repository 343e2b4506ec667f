"""``lmexec demo``: the main job, a short tour of both systems that grows as features land."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmexec.reporting import console, print_table, write_json


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="run the demo of both systems")
    parser.add_argument("--out", default="demo-out", help="folder for pictures and JSON (default demo-out)")
    parser.set_defaults(handler=run)


def tessel_demo(out: Path) -> dict:
    """A placement, the classical schedules on it, and their pictures."""
    from lmexec.tessel.baselines import applicable_baselines
    from lmexec.tessel.draw import draw_gantt
    from lmexec.tessel.render import ascii_gantt
    from lmexec.tessel.shapes import build_placement

    console.rule("Tessel: placement and baseline schedules")
    placement = build_placement("vshape", 4, capacity=4)
    console.print(
        f"placement {placement.name}: {placement.num_devices} devices, {len(placement.blocks)} blocks per "
        f"micro-batch, work per device {placement.max_work:g}, memory capacity 4 per device"
    )
    n = 8
    rows, summary = [], {}
    for name, schedule in applicable_baselines(placement, n).items():
        metrics = schedule.metrics()
        valid = not schedule.validate()
        picture = draw_gantt(schedule, out / f"tessel-{placement.name}-{name}.png")
        rows.append([name, metrics.makespan, f"{metrics.bubble_rate:.1%}", max(metrics.peak_memory),
                     "yes" if valid else "no", picture.name])  # fmt: skip
        summary[name] = {**metrics.to_dict(), "within_memory": valid, "png": str(picture)}
        if name == "1f1b":
            print(ascii_gantt(schedule))
    print_table(
        f"{placement.name}, 4 devices, {n} micro-batches (lower bound {placement.makespan_lower_bound(n):g})",
        ["schedule", "makespan", "bubble", "peak memory", "fits memory 4", "picture"],
        rows,
    )
    return {"placement": placement.name, "micro_batches": n, "baselines": summary}


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"tessel": tessel_demo(out)}
    console.print(f"demo report: {write_json(out / 'demo.json', report)}")
    return 0
