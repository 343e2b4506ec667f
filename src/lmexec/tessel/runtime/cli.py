"""``lmexec tessel train`` and ``lmexec tessel profile``: profile a GPT, plan, run on torch.distributed.

``train`` profiles the model's stages (or reads a profiled placement JSON), plans every requested
schedule on that one placement, spawns one process per device (or runs as one rank under
``torchrun``), trains, and prints loss, step time and measured vs predicted makespan per schedule.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmexec.errors import UserError
from lmexec.reporting import console, output_path, picture_path, print_table, write_json
from lmexec.tessel.cli import micro_batch_count, positive_int, whole_number
from lmexec.tessel.placement import Placement
from lmexec.tessel.runtime.settings import MIN_GAIN, PROFILE_REPEATS, PROFILE_WARMUP, TIMEOUT_S
from lmexec.tessel.runtime.settings import PROFILE_SHAPES as SHAPES

if TYPE_CHECKING:
    from lmexec.tessel.runtime.model import GPTConfig
    from lmexec.tessel.runtime.profile import ProfileJob, StageProfile

DEFAULT_SCHEDULES = "searched,1f1b,gpipe"


def _split(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer counts per stage like 3,5, got {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", "-d", type=positive_int, default=2, help="processes / devices (default 2)")
    p.add_argument(
        "--placement",
        "-p",
        default="zerobubble",
        help=f"{', '.join(SHAPES)} (profiled now) or a profiled JSON",
    )
    p.add_argument(
        "--chunks", type=positive_int, default=2, help="stages per device for interleaved (default 2)"
    )
    p.add_argument("--layers", type=positive_int, default=8, help="decoder layers (default 8)")
    p.add_argument("--hidden", type=positive_int, default=256, help="model width (default 256)")
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads (default 4)")
    p.add_argument("--vocab", type=positive_int, default=512, help="vocabulary size (default 512)")
    p.add_argument("--seq-len", type=positive_int, default=64, help="sequence length (default 64)")
    p.add_argument(
        "--micro-batch-size", type=positive_int, default=2, help="sequences per micro-batch (default 2)"
    )
    p.add_argument("--split", type=_split, help="decoder layers per stage, e.g. 3,5 (default: even)")
    p.add_argument("--seed", type=int, default=0, help="model and data seed (default 0)")
    p.add_argument(
        "--warmup",
        type=whole_number(0),
        default=None,
        help=f"profiling warm-up runs (default {PROFILE_WARMUP})",
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help=f"profiling runs, median taken (default {PROFILE_REPEATS})",
    )
    p.add_argument(
        "--profile-mode", choices=("ranks", "alone"), default="ranks",
        help="ranks: each of --devices processes profiles its own stages, all at once, so the numbers "
        "include the sharing of a real run (default); alone: every stage in this one process",
    )  # fmt: skip
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per rank (default 1)")


def register_train(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``profile`` to ``lmexec tessel``."""
    p = sub.add_parser(
        "train", help="profile a GPT, plan schedules, run them on torch.distributed (gloo/NCCL)"
    )
    _model_args(p)
    p.add_argument(
        "--micro-batches", "-n", type=micro_batch_count, default=8, help="micro-batches per step (default 8)"
    )
    p.add_argument("--steps", type=positive_int, default=10, help="training steps per schedule (default 10)")
    p.add_argument(
        "--schedule", "-s", default=DEFAULT_SCHEDULES,
        help=f"comma list of searched, 1f1b, gpipe, interleaved, zbh1 (default {DEFAULT_SCHEDULES})",
    )  # fmt: skip
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--time-limit", type=float, default=20.0, help="search seconds (default 20)")
    p.add_argument(
        "--min-gain", type=float, default=MIN_GAIN,
        help="run the searched order only if predicted this fraction faster than the best baseline, else "
        f"that baseline (default {MIN_GAIN}; 0 = always the searched order)",
    )  # fmt: skip
    p.add_argument(
        "--timeout", type=_positive_float, default=TIMEOUT_S,
        help=f"stop every rank once profiling and training together took this many seconds (default {TIMEOUT_S:g})",
    )  # fmt: skip
    p.add_argument("--json", type=output_path, help="write config, placement, plans and measurements as JSON")
    p.add_argument(
        "--trace", type=output_path, help="Chrome trace: planned and measured timeline per schedule"
    )
    p.add_argument("--png", type=picture_path, help="planned vs measured Gantt picture (.png, .svg or .pdf)")
    p.add_argument(
        "--profile-out",
        type=output_path,
        help="write the profiled placement JSON (input of lmexec tessel search)",
    )
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("profile", help="profile a GPT's stages into a placement JSON")
    _model_args(p)
    p.add_argument("--out", "-o", type=output_path, required=True, help="placement JSON to write")
    p.add_argument("--json", type=output_path, help="write the per-stage measurements as JSON")
    p.set_defaults(handler=cmd_profile)


# ---- shared steps ---------------------------------------------------------------------------------
def _config(args: argparse.Namespace) -> GPTConfig:
    from lmexec.tessel.runtime.model import GPTConfig

    return GPTConfig(args.layers, args.hidden, args.heads, args.vocab, args.seq_len)


def _profile_job(args: argparse.Namespace, shape: str) -> ProfileJob:
    from lmexec.tessel.runtime.model import split_layers
    from lmexec.tessel.runtime.profile import ProfileJob, stage_count

    stages = stage_count(shape, args.devices, args.chunks)
    split_layers(args.layers, stages, args.split)  # a bad split is refused here, not inside the ranks
    warmup = PROFILE_WARMUP if args.warmup is None else args.warmup
    repeats = PROFILE_REPEATS if args.repeats is None else args.repeats
    return ProfileJob(_config(args), stages, args.micro_batch_size, args.split, args.seed, warmup, repeats)


def _profile(
    args: argparse.Namespace, shape: str, measured: list[StageProfile] | None = None
) -> tuple[Placement, list[StageProfile]]:
    """Profile (unless ``measured`` is given) and build the placement."""
    from lmexec.tessel.runtime.model import lm_loss
    from lmexec.tessel.runtime.profile import profile_in_ranks, profile_stages, profiled_placement

    job = _profile_job(args, shape)
    if measured is not None:
        profiles = measured
    elif args.profile_mode == "ranks":
        from lmexec.tessel.runtime.launcher import RankFailure, launch

        with console.status(f"profiling {job.num_stages} stages in {args.devices} processes ..."):
            try:
                profiles = launch(
                    profile_in_ranks, args.devices, job, threads=args.threads, timeout=_time_left(args),
                )[0]  # fmt: skip
            except RankFailure as error:
                raise RankFailure(f"profiling failed: {error}", error.rank, error.pids) from None
    else:
        stages, inputs, targets = job.build()
        with console.status(f"profiling {job.num_stages} stages ..."):
            profiles = profile_stages(
                stages, inputs, targets, lm_loss, warmup=job.warmup, repeats=job.repeats, threads=args.threads
            )
    return profiled_placement(profiles, shape, args.devices, chunks=args.chunks), profiles


def _time_left(args: argparse.Namespace) -> float:
    """Seconds left of ``--timeout`` (one budget for profiling and training; ``profile`` has no flag)."""
    deadline = getattr(args, "deadline", None)
    return TIMEOUT_S if deadline is None else max(1e-3, deadline - time.monotonic())


def _print_profiles(profiles: list[StageProfile]) -> None:
    print_table(
        "stage profile (one micro-batch, median; ms and MB)",
        ["stage", "F", "B", "I", "W", "I+W", "activations", "kept for W", "params", "static"],
        [[p.stage, p.forward_ms, p.backward_ms, p.input_grad_ms, p.weight_grad_ms, p.input_grad_ms + p.weight_grad_ms,
          p.activation_mb, p.weight_grad_mb, p.param_mb, p.static_mb] for p in profiles],
    )  # fmt: skip


def cmd_profile(args: argparse.Namespace) -> int:
    from lmexec.tessel.runtime.launcher import RankFailure

    if args.placement not in SHAPES:
        raise UserError(f"--placement must be one of {', '.join(SHAPES)} to profile")
    try:
        placement, profiles = _profile(args, args.placement)
    except RankFailure as error:  # as in train: a rank failure prints one line and exits 1
        console.print(f"error: {error}", markup=False)
        return 1
    _print_profiles(profiles)
    placement.to_json(args.out)
    console.print(f"placement JSON: {args.out} (try: lmexec tessel search -p {args.out})")
    if args.json:
        write_json(args.json, {"model": _config(args).to_dict(), "profiles": [p.to_dict() for p in profiles]})
    return 0


@dataclass
class _Prepared:
    placement: Placement
    profiles: list[StageProfile]
    plans: list[Any]
    job: Any


def _prepare(args: argparse.Namespace, measured: list[StageProfile] | None = None) -> _Prepared:
    """Profile (or load, or take ``measured``), plan and export every schedule; everything a run needs,
    checked up front."""
    from lmexec.tessel.runtime.model import split_layers
    from lmexec.tessel.runtime.pipelining_adapter import require_api, stage_chain
    from lmexec.tessel.runtime.plan import parse_schedules, plan_runs
    from lmexec.tessel.runtime.train import TrainJob

    require_api()
    names = parse_schedules(args.schedule)
    cfg = _config(args)
    if args.placement in SHAPES:
        placement, profiles = _profile(args, args.placement, measured)
        if args.profile_out:
            placement.to_json(args.profile_out)
            console.print(f"profiled placement: {args.profile_out}")
    else:
        profiling = [flag for flag in ("warmup", "repeats", "profile_out") if getattr(args, flag) is not None]
        if profiling:
            flags = ", ".join("--" + flag.replace("_", "-") for flag in profiling)
            raise UserError(f"{flags} apply when a built-in placement is profiled, not to {args.placement}")
        placement, profiles = Placement.load(args.placement), []
        if placement.num_devices != args.devices:
            raise UserError(
                f"{args.placement} has {placement.num_devices} devices but --devices is {args.devices}"
            )
    num_stages = stage_chain(placement).num_stages
    split_layers(cfg.layers, num_stages, args.split)  # every stage needs a layer or the embedding/head
    with console.status("planning schedules ..."):
        plans = plan_runs(placement, names, args.micro_batches, args.time_limit, args.min_gain)
    job = TrainJob(
        cfg, tuple(p.spec for p in plans), args.micro_batches, args.micro_batch_size, args.steps, args.seed,
        args.lr, args.split,
    )  # fmt: skip
    return _Prepared(placement, profiles, plans, job)


def _torchrun_body(ctx: Any, args: argparse.Namespace) -> tuple[_Prepared, list[Any]] | None:
    """Under torchrun: every rank profiles its stages (or rank 0 alone), rank 0 plans, every rank gets the
    same job, all train."""
    import torch.distributed as dist

    from lmexec.tessel.runtime.profile import profile_in_ranks
    from lmexec.tessel.runtime.train import train_worker

    if args.devices != ctx.world:
        raise UserError(
            f"--devices {args.devices} but torchrun started {ctx.world} processes: make them equal"
        )
    measured = None
    if args.placement in SHAPES and args.profile_mode == "ranks":
        measured = profile_in_ranks(ctx, _profile_job(args, args.placement))  # all ranks at once
    box: list[Any] = [_prepare(args, measured) if ctx.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    prepared: _Prepared = box[0]
    results = train_worker(ctx, prepared.job)
    return (prepared, results) if ctx.rank == 0 and results is not None else None


def cmd_train(args: argparse.Namespace) -> int:
    from lmexec.tessel.runtime.launcher import RankFailure, launch, run_in_this_process, torchrun_env
    from lmexec.tessel.runtime.train import train_worker

    args.deadline = time.monotonic() + args.timeout
    try:
        if torchrun_env():
            rank, out = run_in_this_process(_torchrun_body, args, threads=args.threads)
            if rank != 0 or out is None:
                return 0
            prepared, results = out
        else:
            prepared = _prepare(args)
            console.print(
                f"running {', '.join(p.name for p in prepared.plans)} on {args.devices} processes "
                f"({args.steps} steps each) ..."
            )
            load_before = os.getloadavg()[0]
            results = launch(
                train_worker, args.devices, prepared.job, timeout=_time_left(args), threads=args.threads
            )[0]
            console.print(
                f"load average (1 min) before {load_before:.1f}, after {os.getloadavg()[0]:.1f} on "
                f"{os.cpu_count()} CPUs (other processes share them)"
            )
    except RankFailure as error:
        console.print(f"error: {error}", markup=False)
        return 1
    _report(args, prepared, results)
    return 0


def _report(args: argparse.Namespace, prepared: _Prepared, results: list[Any]) -> None:
    from lmexec.tessel.runtime.analysis import breakdown
    from lmexec.tessel.runtime.trace import chrome_trace, draw_planned_vs_measured

    if prepared.profiles:
        _print_profiles(prepared.profiles)
    rows, payload = [], []
    for plan, result in zip(prepared.plans, results, strict=True):
        steady_make = result.steady(result.makespan_ms)
        why = breakdown(plan, result)
        rows.append([
            plan.name if plan.schedule.name in ("", plan.name) else f"{plan.name} ({plan.schedule.name})",
            f"{result.losses[0]:.3f}->{result.losses[-1]:.3f}", result.steady(result.step_ms),
            result.steady(result.pipeline_ms), steady_make, plan.predicted_ms, f"{why.ratio:.2f}",
            f"{why.compute_inflation:.2f}", why.replay, f"{why.gap_ratio:.2f}",
            f"{plan.schedule.metrics().bubble_rate:.1%}",
        ])  # fmt: skip
        payload.append({
            "name": plan.name, "schedule": plan.schedule.name, "actions": plan.actions,
            "predicted_makespan_ms": plan.predicted_ms, "planned_bubble_rate": plan.schedule.metrics().bubble_rate,
            "losses": result.losses, "step_ms": result.step_ms, "pipeline_ms": result.pipeline_ms,
            "makespan_ms": result.makespan_ms, "steady_step_ms": result.steady(result.step_ms),
            "steady_makespan_ms": steady_make, "makespan_ratio": steady_make / plan.predicted_ms,
            "steady_step": result.steady_step(), "events": result.events[result.steady_step()],
            "planned_tasks": plan.schedule.to_dict()["tasks"], "breakdown": why.to_dict(),
        })  # fmt: skip
    print_table(
        f"{prepared.placement.name}, {args.devices} ranks, {args.micro_batches} micro-batches x "
        f"{args.micro_batch_size}, {args.steps} steps (times: median after step 0, ms)",
        ["schedule", "loss", "step", "pipeline", "makespan", "predicted", "ratio", "compute x", "replay",
         "gaps x", "plan bubble"],
        rows,
    )  # fmt: skip
    console.print(
        "makespan: measured, first compute start to last end; ratio = makespan / predicted; compute x = measured "
        "busy time / profiled; replay = planned order re-timed with measured durations; gaps x = makespan / replay "
        "(> 1: communication and dispatch gaps)"
    )
    pairs = list(zip(prepared.plans, results, strict=True))
    if args.trace:
        console.print(f"chrome trace (planned + measured): {write_json(args.trace, chrome_trace(pairs))}")
    if args.png:
        title = (
            f"{prepared.placement.name}: {args.devices} ranks, {args.layers} layers x {args.hidden}, "
            f"{args.micro_batches} micro-batches; left planned (profiled ms), right measured"
        )
        console.print(f"picture: {draw_planned_vs_measured(pairs, args.png, title)}")
    if args.json:
        write_json(args.json, {
            "model": _config(args).to_dict(), "devices": args.devices, "micro_batches": args.micro_batches,
            "micro_batch_size": args.micro_batch_size, "steps": args.steps, "threads": args.threads,
            "placement": prepared.placement.to_dict(), "profiles": [p.to_dict() for p in prepared.profiles],
            "runs": payload,
        })  # fmt: skip
        console.print(f"json: {args.json}")
