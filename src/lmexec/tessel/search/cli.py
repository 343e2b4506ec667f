"""``lmexec tessel search``: run the search, print what it proved, compare with the baselines."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any

from lmexec.reporting import console, output_path, picture_path, print_table, write_json
from lmexec.tessel.baselines import applicable_baselines

if TYPE_CHECKING:
    from lmexec.tessel.search.driver import SearchResult


def register_search(sub: argparse._SubParsersAction) -> None:
    """Add the ``search`` subcommand to ``lmexec tessel``."""
    from lmexec.tessel.cli import add_placement_args, micro_batch_count, positive_int

    p = sub.add_parser("search", help="search a repetend schedule (modulo scheduling) and complete it for N")
    add_placement_args(p)
    p.add_argument(
        "--micro-batches",
        "-n",
        type=micro_batch_count,
        default=None,
        help="micro-batches (default 4 x devices)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=30.0,
        help="seconds for the solvers (default 30); building, checking and comparing the N micro-batches' "
        "schedules adds time that grows with N",
    )
    p.add_argument("--solver", choices=["cpsat", "z3"], default="cpsat", help="repetend solver")
    p.add_argument("--workers", type=positive_int, default=2, help="CP-SAT worker threads (default 2)")
    p.add_argument("--json", type=output_path, help="write the result and the baselines' figures as JSON")
    p.add_argument("--png", type=picture_path, help="Gantt chart of the schedule")
    p.add_argument("--trace", type=output_path, help="Chrome trace / Perfetto JSON of the schedule")
    p.add_argument(
        "--save", type=output_path, help="write the schedule JSON (lmexec tessel validate reads it)"
    )
    p.set_defaults(handler=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    from lmexec.tessel.cli import placement_from_args, write_outputs
    from lmexec.tessel.search.driver import search

    placement = placement_from_args(args)
    n = args.micro_batches or 4 * placement.num_devices
    with console.status("searching ...") as status:

        def progress(event: dict[str, Any]) -> None:
            best = "-" if event["best"] is None else f"{event['best']}"
            status.update(
                f"candidates tried {event['tried']} | period {event['period']} {event['status']} | "
                f"best {best} | bound {event['bound']} | {event['seconds']:.1f} s (integer units)"
            )

        result = search(
            placement,
            n,
            time_limit=args.time_limit,
            solver=args.solver,
            workers=args.workers,
            progress=progress,
        )
    rows, payload = _comparison(result)
    print_table(
        f"{placement.name} on {placement.num_devices} devices, {n} micro-batches, memory "
        f"{_capacity(placement.capacity)}",
        ["schedule", "period", "bound", "steady bubble", "makespan", "makespan bound", "bubble", "peak memory",
         "fits", "seconds"],
        rows,
    )  # fmt: skip
    seconds = (
        f"search {result.search_seconds:.2f} s (repetend {result.repetend_seconds:.2f} s, "
        f"completion {result.completion_seconds:.2f} s)"
    )
    if result.periodic:
        proof = (
            "optimal (proven)"
            if result.period_optimal
            else f"not proven optimal (bound {result.period_bound:g})"
        )
        console.print(
            f"period {result.period:g} {proof}; work bound {result.work_bound:g}; {result.in_flight} micro-batches "
            f"in flight; {seconds}"
        )
    else:
        console.print(
            f"no periodic schedule: a micro-batch keeps memory on a device, so no repetend fits {n} micro-batches; "
            f"the schedule is the direct solver's (makespan {result.makespan:g}); {seconds}"
        )
    if args.json:
        console.print(f"json: {write_json(args.json, payload)}")
    write_outputs(result.schedule, args)
    return 0


def _capacity(capacity: tuple[float, ...]) -> str:
    values = {c for c in capacity}
    text = [("inf" if math.isinf(c) else f"{c:g}") for c in capacity]
    return text[0] if len(values) == 1 else ",".join(text)


def _comparison(result: SearchResult) -> tuple[list[list[Any]], dict[str, Any]]:
    """Rows for the table (search first, then each applicable baseline) and the JSON payload."""
    placement, n = result.placement, result.micro_batches
    metrics = result.schedule.metrics()
    peak = "/".join(f"{v:g}" for v in metrics.peak_memory)
    periodic = (
        [result.period, result.period_bound, f"{result.steady_bubble_rate:.1%}"]
        if result.periodic
        else [None] * 3
    )
    rows = [
        ["tessel search", *periodic, metrics.makespan,
         result.makespan_bound, f"{metrics.bubble_rate:.1%}", peak, "yes", round(result.search_seconds, 2)]
    ]  # fmt: skip
    baselines = {}
    for name, schedule in (result.baselines or applicable_baselines(placement, n)).items():
        m = schedule.metrics()
        fits = not any(v.kind == "memory" for v in schedule.validate())
        baselines[name] = {**m.to_dict(), "fits_memory": fits}
        rows.append(
            [name, None, None, None, m.makespan, result.makespan_bound, f"{m.bubble_rate:.1%}",
             "/".join(f"{v:g}" for v in m.peak_memory), "yes" if fits else "no", None]
        )  # fmt: skip
    return rows, {"search": result.to_dict(), "baselines": baselines}
