"""``lmexec tessel ...`` subcommands: a thin layer over placements, baselines, validation and pictures."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

from lmexec.errors import UserError
from lmexec.reporting import console, output_path, picture_path, print_table, write_json
from lmexec.tessel.baselines import BASELINES, baseline_schedule
from lmexec.tessel.placement import Placement
from lmexec.tessel.render import ascii_gantt, chrome_trace
from lmexec.tessel.schedule import MAX_MICRO_BATCHES, Schedule, Task
from lmexec.tessel.shapes import SHAPES, build_placement, load_placement, parse_overrides


def add_placement_args(parser: argparse.ArgumentParser, *, memory_flag: bool = True) -> None:
    """Flags every command that takes a placement shares."""
    parser.add_argument(
        "--placement", "-p", required=True, help=f"built-in ({', '.join(SHAPES)}) or a JSON file"
    )
    parser.add_argument("--devices", "-d", type=int, help="device count (built-in placements)")
    if memory_flag:
        parser.add_argument(
            "--memory", "-m", type=_memory, help="memory capacity per device: one number or a,b,c,d"
        )
    parser.add_argument(
        "--static-memory", type=_memory, help="static memory per device: one number or a,b,c,d"
    )
    parser.add_argument("--inference", action="store_true", help="forward blocks only, no activation memory")
    parser.add_argument(
        "--chunks", type=int, help="model chunks per device (interleaved placement, default 2)"
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="ROLE.KEY=VALUE",
        help="override a block role, e.g. B.duration=2 (repeatable)",
    )


def placement_from_args(args: argparse.Namespace) -> Placement:
    builtin = args.placement in SHAPES
    if not builtin and (args.set or args.chunks is not None):
        raise UserError("--set and --chunks apply to built-in placements only")
    extra = {}
    if builtin and args.set:
        extra["overrides"] = parse_overrides(args.set)
    if builtin and args.chunks is not None:
        extra["chunks"] = args.chunks
    return load_placement(
        args.placement,
        args.devices,
        inference=args.inference,
        capacity=getattr(args, "memory", None),
        static_memory=args.static_memory,
        **extra,
    )


def _memory(text: str) -> float | list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or a comma-separated list, got {text!r}"
        ) from None
    if any(math.isnan(v) for v in values):
        raise argparse.ArgumentTypeError(f"memory must be a number (inf: unlimited), got {text!r}")
    return values[0] if len(values) == 1 else values


def micro_batch_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_MICRO_BATCHES:
        raise argparse.ArgumentTypeError(f"at most {MAX_MICRO_BATCHES} micro-batches, got {value}")
    return value


def whole_number(least: int) -> Callable[[str], int]:
    """argparse type of an integer >= ``least``."""
    wanted = "a positive integer" if least == 1 else f"a whole number >= {least}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value

    return parse


positive_int = whole_number(1)


def write_outputs(schedule: Schedule, args: argparse.Namespace) -> None:
    """Write the picture, Chrome trace and schedule files the user asked for."""
    if getattr(args, "png", None):
        from lmexec.tessel.draw import draw_gantt

        console.print(f"picture: {draw_gantt(schedule, args.png)}")
    if getattr(args, "trace", None):
        console.print(f"chrome trace: {write_json(args.trace, chrome_trace(schedule))}")
    if getattr(args, "save", None):
        schedule.save(args.save)
        console.print(f"schedule: {args.save}")


# ---- commands -------------------------------------------------------------------------------
def cmd_placements(args: argparse.Namespace) -> int:
    rows = []
    payload = []
    for name, shape in SHAPES.items():
        devices = max(4, shape.min_devices)
        placement = build_placement(name, devices)
        rows.append(
            [name, len(placement.blocks), placement.max_work, placement.critical_path, shape.description]
        )
        payload.append({"name": name, "description": shape.description, "blocks_at_4_devices": len(placement.blocks),
                        "max_work_at_4_devices": placement.max_work, "critical_path_at_4_devices": placement.critical_path})  # fmt: skip
    print_table(
        "built-in placements (figures at 4 devices)",
        ["name", "blocks", "max work", "critical path", "shape"],
        rows,
    )
    if args.json:
        write_json(args.json, {"placements": payload})
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    placement = placement_from_args(args)
    if args.export:
        placement.to_json(args.export)
        console.print(f"placement JSON: {args.export}")
    rows = [[b.name, b.kind.value, b.duration, b.memory, ",".join(map(str, b.devices)), ",".join(b.after)]
            for b in placement.blocks]  # fmt: skip
    print_table(
        f"placement {placement.name}: {placement.num_devices} devices",
        ["block", "kind", "duration", "memory", "devices", "after"],
        rows,
    )
    one = Schedule(placement, 1, _one_micro_batch(placement), name=f"{placement.name} (one micro-batch)")
    print(ascii_gantt(one))
    console.print(
        f"work per device {list(placement.device_work)}; critical path {placement.critical_path:g}; "
        f"min peak memory per device {list(placement.min_peak_memory)}; capacity "
        f"{[c if c != float('inf') else None for c in placement.capacity]}"
    )
    write_outputs(one, args)
    if args.json:
        write_json(args.json, {"placement": placement.to_dict(), "device_work": placement.device_work,
                               "critical_path": placement.critical_path, "min_peak_memory": placement.min_peak_memory})  # fmt: skip
    return 0


def _one_micro_batch(placement: Placement) -> list[Task]:
    """ASAP times of a single micro-batch in the placement's own block order (a picture of its shape)."""
    from lmexec.tessel.schedule import orders_from_sequence, retime

    return retime(
        placement, orders_from_sequence(placement, [(n, 0) for n in placement.topological_order]), 1
    ).tasks


def cmd_baseline(args: argparse.Namespace) -> int:
    placement = placement_from_args(args)
    names = list(BASELINES) if args.schedule == "all" else [args.schedule]
    if len(names) > 1:
        asked = [flag for flag in ("png", "trace", "save") if getattr(args, flag, None)]
        if asked:
            raise UserError(
                f"--{'/--'.join(asked)} write one schedule: pick it with -s NAME ({', '.join(BASELINES)})"
            )
    results = {}
    rows = []
    for name in names:
        try:
            schedule = baseline_schedule(placement, name, args.micro_batches)
        except UserError as error:
            if args.schedule != "all":
                raise
            console.print(f"{name}: not applicable ({error})", style="dim")
            continue
        problems = schedule.validate()
        m = schedule.metrics()
        results[name] = {**schedule.to_dict(), "violations": [str(v) for v in problems]}
        rows.append([name, m.makespan, f"{m.bubble_rate:.1%}", m.throughput, " ".join(f"{x:g}" for x in m.peak_memory),
                     "valid" if not problems else f"{len(problems)} violations"])  # fmt: skip
        if args.ascii or len(names) == 1:
            print(ascii_gantt(schedule))
        if len(names) == 1:
            write_outputs(schedule, args)
    bound = placement.makespan_lower_bound(args.micro_batches)
    print_table(
        f"{placement.name}, {placement.num_devices} devices, {args.micro_batches} micro-batches (makespan lower bound {bound:g})",
        ["schedule", "makespan", "bubble", "throughput", "peak memory per device", "memory check"],
        rows,
    )
    if args.json:
        write_json(args.json, {"placement": placement.to_dict(), "micro_batches": args.micro_batches,
                               "lower_bound": bound, "schedules": results})  # fmt: skip
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    schedule = Schedule.load(args.schedule)
    problems = schedule.validate()
    for problem in problems:
        console.print(str(problem), markup=False)
    checked = schedule.checked_part()
    m = checked.metrics()
    console.print(
        f"{'valid' if not problems else 'INVALID'}: makespan {m.makespan:g}, bubble {m.bubble_rate:.1%}"
    )
    write_outputs(checked, args)
    if args.json:
        write_json(
            args.json,
            {"valid": not problems, "violations": [p.__dict__ for p in problems], "metrics": m.to_dict()},
        )
    return 0 if not problems else 1


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("tessel", help="schedule search for distributed execution")
    sub = parser.add_subparsers(dest="tessel_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("placements", help="list the built-in placements")
    p.add_argument("--json", type=output_path, help="write the list as JSON")
    p.set_defaults(handler=cmd_placements)

    p = sub.add_parser("show", help="describe and draw one micro-batch of a placement")
    add_placement_args(p)
    p.add_argument("--png", type=picture_path, help="picture of one micro-batch (.png, .svg or .pdf)")
    p.add_argument(
        "--export", type=output_path, help="write the placement as JSON (a starting point for your own)"
    )
    p.add_argument("--json", type=output_path, help="write the placement and its bounds as JSON")
    p.set_defaults(handler=cmd_show)

    p = sub.add_parser("baseline", help="classical schedules: gpipe, 1f1b, interleaved, chimera, zbh1")
    add_placement_args(p)
    p.add_argument(
        "--micro-batches", "-n", type=micro_batch_count, default=8, help="number of micro-batches (default 8)"
    )
    p.add_argument(
        "--schedule", "-s", default="all", choices=[*BASELINES, "all"], help="which baseline (default all)"
    )
    p.add_argument("--png", type=picture_path, help="Gantt chart (.png, .svg or .pdf), for a single schedule")
    p.add_argument("--trace", type=output_path, help="Chrome trace / Perfetto JSON, for a single schedule")
    p.add_argument(
        "--save", type=output_path, help="write the schedule JSON (validate it with `lmexec tessel validate`)"
    )
    p.add_argument("--ascii", action="store_true", help="print the ASCII Gantt of every schedule")
    p.add_argument("--json", type=output_path, help="write metrics and schedules as JSON")
    p.set_defaults(handler=cmd_baseline)

    p = sub.add_parser("validate", help="check a schedule JSON file and print its metrics")
    p.add_argument("schedule", type=Path, help="schedule JSON (from --save)")
    p.add_argument("--png", type=picture_path, help="Gantt chart")
    p.add_argument("--json", type=output_path, help="write the verdict as JSON")
    p.set_defaults(handler=cmd_validate)

    _register_extensions(sub)


def _register_extensions(sub: argparse._SubParsersAction) -> None:
    """Subcommands that live in their own modules: search (issue 4), train/profile (issue 7)."""
    from lmexec.tessel.runtime.cli import register_train
    from lmexec.tessel.search.cli import register_search

    register_search(sub)
    register_train(sub)


__all__ = ["register", "add_placement_args", "placement_from_args", "write_outputs", "json"]
