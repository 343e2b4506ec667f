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


def tessel_search_demo(out: Path) -> dict:
    """Tessel's search on the paper's GPT case (mshape, 4 devices, memory 6) beside the baselines."""
    from lmexec.tessel.baselines import applicable_baselines
    from lmexec.tessel.draw import draw_gantt
    from lmexec.tessel.search.driver import search
    from lmexec.tessel.shapes import build_placement

    console.rule("Tessel: schedule search (mshape, 4 devices, memory 6)")
    placement = build_placement("mshape", 4, capacity=6)
    n = 16
    result = search(placement, n, time_limit=10.0)
    picture = draw_gantt(result.schedule, out / "tessel-mshape-search.png")
    rows = [
        [
            "tessel search",
            result.makespan,
            f"{result.schedule.metrics().bubble_rate:.1%}",
            max(result.schedule.metrics().peak_memory),
            "yes" if not result.schedule.validate() else "no",
        ]
    ]
    for name, schedule in applicable_baselines(placement, n).items():
        m = schedule.metrics()
        rows.append(
            [
                name,
                m.makespan,
                f"{m.bubble_rate:.1%}",
                max(m.peak_memory),
                "yes" if not schedule.validate() else "no",
            ]
        )
    console.print(
        f"repetend period {result.period:g} (lower bound {result.period_bound:g}, "
        f"{'optimal' if result.period_optimal else 'not proven optimal'}), found in {result.search_seconds:.2f} s; "
        f"picture {picture}"
    )
    print_table(
        f"mshape, 4 devices, memory 6, {n} micro-batches (makespan lower bound {result.makespan_bound:g})",
        ["schedule", "makespan", "bubble", "peak memory", "fits memory 6"],
        rows,
    )
    return {"placement": "mshape", "devices": 4, "memory": 6, "micro_batches": n, "search": result.to_dict(),
            "png": str(picture)}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from lmexec.hata.hf.demo import hata_demo

    report = {"tessel": tessel_demo(out), "tessel_search": tessel_search_demo(out)}
    console.rule("HATA: passkey on SmolLM2-135M-Instruct, dense vs HATA through generate()")
    report["hata"] = hata_demo(out)
    console.print(f"demo report: {write_json(out / 'demo.json', report)}")
    return 0
