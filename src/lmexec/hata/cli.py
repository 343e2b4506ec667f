"""``lmexec hata ...`` subcommands: a thin layer over the library (parsing, progress, output)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from lmexec.errors import UserError
from lmexec.reporting import output_path, picture_path


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _budgets(text: str) -> tuple[float, ...]:
    from lmexec.hata.budget import parse_budget

    return tuple(parse_budget(part) for part in _csv(text))


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("hata", help="hash-aware top-k attention for LLM decoding")
    sub = parser.add_subparsers(dest="hata_command", required=True, metavar="SUBCOMMAND")

    fid = sub.add_parser(
        "fidelity",
        help="compare selection methods against dense attention on a real model",
        description="Replay decode steps on real text and measure each selection method against dense attention.",
    )
    fid.add_argument(
        "--model", default="smollm2", help="model name (smollm2) or a local folder (default: smollm2)"
    )
    fid.add_argument("--context", type=int, default=4096, help="tokens of evaluation text (default: 4096)")
    fid.add_argument(
        "--budget", default="256", help="tokens attended per step: count >= 1 or ratio < 1 (default: 256)"
    )
    fid.add_argument(
        "--budgets",
        default="",
        help="comma-separated budgets for the sweep/plot (default with --png: 64..1024)",
    )
    fid.add_argument(
        "--methods", default="dense,oracle,simhash,loki,quest,sparq", help="comma-separated methods"
    )
    fid.add_argument(
        "--bits", type=int, default=128, help="hash code bits: 32, 64, 128 or 256 (default: 128)"
    )
    fid.add_argument(
        "--hata-weights", default=None, help="safetensors file of learned projections for 'hata'"
    )
    fid.add_argument("--sink", type=int, default=0, help="first tokens always attended (default: 0)")
    fid.add_argument("--recent", type=int, default=1, help="last tokens always attended (default: 1)")
    fid.add_argument(
        "--positions", type=int, default=32, help="decode positions from the last quarter (default: 32)"
    )
    fid.add_argument(
        "--dense-layers", type=int, default=2, help="leading layers kept dense, not measured (default: 2)"
    )
    fid.add_argument(
        "--texts", default="prose,code", help="evaluation texts, one sequence each (default: prose,code)"
    )
    fid.add_argument(
        "--equal-bytes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run loki/sparq/quest at the hash code's selection bytes (default: on)",
    )
    fid.add_argument("--seed", type=int, default=0, help="seed of the random SimHash projections")
    fid.add_argument("--json", type=output_path, default=None, help="write the full result here")
    fid.add_argument("--png", type=picture_path, default=None, help="plot mass recall vs budget here")
    fid.set_defaults(handler=_fidelity)

    from lmexec.hata.training.cli import register_train

    register_train(sub)

    from lmexec.hata.bench_cli import add_bench_parsers

    add_bench_parsers(sub)

    from lmexec.hata.hf.cli import add_eval_parser  # transformers is imported only when eval runs

    add_eval_parser(sub)


def _progress_factory(progress) -> Callable[[str, int], Callable[[], None]]:
    def start(description: str, total: int) -> Callable[[], None]:
        task = progress.add_task(description, total=total)
        return lambda: progress.advance(task)

    return start


def _fidelity(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lmexec.hata.budget import parse_budget
    from lmexec.hata.fidelity import DEFAULT_SWEEP, FidelityConfig, run_fidelity
    from lmexec.reporting import console, print_table, write_json

    budget = parse_budget(args.budget)
    given = _budgets(args.budgets)
    too_big = [f"{b:g}" for b in given if b >= 1 and b > args.context]
    if too_big:  # a budget past the context is dense attention: not a point of the sweep
        raise UserError(f"--budgets {', '.join(too_big)} exceed --context {args.context}")
    sweep = given or (tuple(b for b in DEFAULT_SWEEP if b <= args.context) if args.png else ())
    config = FidelityConfig(
        model=args.model,
        context=args.context,
        budget=budget,
        budgets=sweep,
        methods=_csv(args.methods),
        bits=args.bits,
        sink=args.sink,
        recent=args.recent,
        positions=args.positions,
        dense_layers=args.dense_layers,
        texts=_csv(args.texts),
        hata_weights=args.hata_weights,
        equal_bytes=args.equal_bytes,
        seed=args.seed,
    )
    config.validate()  # fail on bad flags before loading the model
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        result = run_fidelity(config, _progress_factory(progress))
    model = result["model"]
    print_table(
        f"HATA fidelity: {model['name']}, context {config.context}, budget {args.budget}, "
        f"layers {result['layers'][0]}-{result['layers'][-1]}, {len(result['positions'])} positions x "
        f"{len(config.texts)} texts x {model['kv_heads']} KV heads",
        ("method", "settings", "select B/token", "budget", "recall@k", "mass recall", "output error"),
        [
            (
                r["label"],
                r["settings"],
                r["selection_bytes_per_token"],
                r["budget_tokens"],
                r["recall"],
                r["mass_recall"],
                r["output_error"],
            )
            for r in result["table"]
        ],
    )
    console.print(
        f"time: {result['timings']['total_s']:.1f} s (capture {result['timings']['capture_s']:.1f} s)"
    )
    if args.json:
        console.print(f"wrote {write_json(args.json, result)}")
    if args.png:
        from lmexec.hata.plot import plot_mass_recall

        console.print(f"wrote {plot_mass_recall(result, args.png)}")
    return 0
