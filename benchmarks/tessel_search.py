"""Benchmark the Tessel search on every built-in placement at 4, 8, 16 and 32 devices.

For each placement, device count and mode (training, inference) it runs one search for N = 4D,
re-completes the same repetend for N = 128, and compares with the best applicable baseline that
fits the same memory. A second table repeats the paper-code configurations at N = 128.

    .venv/bin/python benchmarks/tessel_search.py --json benchmarks/tessel_search.json

Memory per device: the device count (2x for interleaved, whose virtual stages hold twice as many
activations). Time limits per search: 2 s at 4 and 8 devices, 10 s at 16, 30 s at 32.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from lmexec.errors import UserError
from lmexec.reporting import print_table, write_json
from lmexec.tessel.baselines import applicable_baselines
from lmexec.tessel.search import schedule_for, search
from lmexec.tessel.shapes import SHAPES, build_placement

LIMITS = {4: 2.0, 8: 2.0, 16: 10.0, 32: 30.0}
COMPLETION = {4: 0.5, 8: 0.5, 16: 2.0, 32: 4.0}
LONG = 128
PAPER = [  # placement, devices, memory, the paper's code at N = 128 (re-timed), see docs/tessel-search.md
    ("vshape", 4, 4, 530), ("mshape", 4, 6, 780), ("mshape", 4, 4, 905), ("kshape", 4, 6, 774),
    ("xshape", 4, 4, 1036), ("nnshape", 4, 6, 1036), ("finetune", 4, 4, 646), ("alphafold", 4, 4, 774),
]  # fmt: skip


def best_baseline(placement, n: int) -> tuple[str, float] | None:
    """The fastest applicable baseline that fits the placement's memory."""
    fits = [
        (s.makespan, name)
        for name, s in applicable_baselines(placement, n).items()
        if not any(v.kind == "memory" for v in s.validate())
    ]
    return (min(fits)[1], min(fits)[0]) if fits else None


def run_one(
    shape: str, devices: int, inference: bool, memory: float, limit: float, completion: float
) -> dict:
    placement = build_placement(shape, devices, inference=inference, capacity=memory)
    began = time.perf_counter()
    result = search(placement, 4 * devices, time_limit=limit, completion_limit=completion)
    seconds = time.perf_counter() - began
    long = schedule_for(result, LONG, time_limit=completion)
    assert not result.schedule.validate() and not long.validate()
    short_base, long_base = best_baseline(placement, 4 * devices), best_baseline(placement, LONG)
    return {
        "placement": shape, "devices": devices, "mode": "inference" if inference else "training",
        "memory": memory, "search_seconds": seconds, "period": result.period,
        "period_bound": result.period_bound, "work_bound": result.work_bound,
        "period_optimal": result.period_optimal, "steady_bubble_rate": result.steady_bubble_rate,
        "in_flight": result.in_flight,
        "makespan_4d": result.makespan, "bubble_4d": result.schedule.metrics().bubble_rate,
        "makespan_4d_bound": result.makespan_bound,
        "makespan_128": long.makespan, "bubble_128": long.metrics().bubble_rate,
        "makespan_128_bound": placement.makespan_lower_bound(LONG),
        "baseline_4d": short_base, "baseline_128": long_base,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="4,8,16,32", help="comma-separated device counts")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated placements")
    parser.add_argument("--json", help="write all rows as JSON")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    began = time.perf_counter()
    for devices in [int(d) for d in args.devices.split(",")]:
        for shape in args.shapes.split(","):
            for inference in (False, True):
                memory = 2 * devices if shape == "interleaved" else devices
                try:
                    rows.append(
                        run_one(shape, devices, inference, memory, LIMITS[devices], COMPLETION[devices])
                    )
                except UserError as error:
                    rows.append({"placement": shape, "devices": devices, "error": str(error)})
                print(_line(rows[-1]), flush=True)
    paper = []
    for shape, devices, memory, theirs in PAPER:
        row = run_one(shape, devices, False, memory, LIMITS[devices], COMPLETION[devices])
        paper.append({**row, "paper_makespan_128": theirs})
    total = time.perf_counter() - began
    print_table(
        f"Tessel search, all built-ins (N = 4D and N = {LONG}); total {total:.0f} s",
        ["placement", "D", "mode", "mem", "search s", "period", "bound", "opt", "steady bubble",
         "N=4D makespan", "bubble", f"N={LONG} makespan", "bubble", "best baseline 4D", f"best baseline {LONG}"],
        [_cells(r) for r in rows if "error" not in r],
    )  # fmt: skip
    print_table(
        f"Against the paper's code at N = {LONG} (training)",
        ["placement", "D", "mem", "period", "bound", f"makespan {LONG}", "paper's code", f"bound {LONG}",
         "search s"],
        [[r["placement"], r["devices"], r["memory"], r["period"], r["period_bound"], r["makespan_128"],
          r["paper_makespan_128"], r["makespan_128_bound"], round(r["search_seconds"], 2)] for r in paper],
    )  # fmt: skip
    if args.json:
        write_json(args.json, {"rows": rows, "paper": paper, "total_seconds": total})
    return 0


def _base(value) -> str:
    return "-" if value is None else f"{value[0]} {value[1]:g}"


def _cells(r: dict) -> list:
    return [r["placement"], r["devices"], r["mode"][:5], r["memory"], round(r["search_seconds"], 2), r["period"],
            r["period_bound"], "yes" if r["period_optimal"] else "no", f"{r['steady_bubble_rate']:.1%}",
            r["makespan_4d"], f"{r['bubble_4d']:.1%}", r["makespan_128"], f"{r['bubble_128']:.1%}",
            _base(r["baseline_4d"]), _base(r["baseline_128"])]  # fmt: skip


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['placement']} D={r['devices']}: {r['error']}"
    return (
        f"{r['placement']:11} D={r['devices']:2} {r['mode']:9} P={r['period']:g} (bound {r['period_bound']:g}) "
        f"{r['search_seconds']:.2f}s mk4D={r['makespan_4d']:g} mk128={r['makespan_128']:g} "
        f"base4D={_base(r['baseline_4d'])} base128={_base(r['baseline_128'])}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
