"""``lmexec hata train``: argument parsing, a rich progress bar per layer and one validation line per layer."""

from __future__ import annotations

import argparse

from lmexec.hata.training.config import DEFAULT_RECIPE, RECIPE_NAMES, TrainConfig
from lmexec.reporting import output_path

_DEFAULTS = TrainConfig()


def register_train(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand to ``lmexec hata``."""
    p = sub.add_parser(
        "train",
        help="learn the hash projections W from a model's own queries and keys",
        description=(
            "Capture post-RoPE q/k on calibration text, train W per layer, validate each layer against "
            "same-bits SimHash on held-out text, and write a weights file. Rerunning a killed run with the "
            "same flags resumes from the last finished layer (kept in OUT.partial/)."
        ),
    )
    p.add_argument("--model", default=_DEFAULTS.model, help="model name (smollm2) or a local folder")
    p.add_argument(
        "--bits", type=int, default=_DEFAULTS.bits, help="code bits: 32, 64, 128 or 256 (default: 128)"
    )
    p.add_argument("--out", type=output_path, required=True, help="weights file to write (safetensors)")
    p.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        choices=sorted(RECIPE_NAMES),
        help=f"training recipe: 'paper' (the reference's) or 'rank' (default: {DEFAULT_RECIPE})",
    )
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the recipe's)")
    p.add_argument(
        "--texts", type=int, default=_DEFAULTS.texts, help=f"calibration texts (default: {_DEFAULTS.texts})"
    )
    p.add_argument(
        "--context",
        type=int,
        default=_DEFAULTS.context,
        help=f"tokens per calibration text (default: {_DEFAULTS.context})",
    )
    p.add_argument(
        "--positions",
        type=int,
        default=_DEFAULTS.positions,
        help=f"query positions sampled per calibration text (default: {_DEFAULTS.positions})",
    )
    p.add_argument(
        "--dense-layers", type=int, default=_DEFAULTS.dense_layers, help="leading dense layers, not trained"
    )
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="seed (layer l uses seed + l)")
    p.add_argument("--val-context", type=int, default=_DEFAULTS.val_context, help="tokens per held-out text")
    p.add_argument(
        "--val-positions", type=int, default=_DEFAULTS.val_positions, help="held-out query positions"
    )
    p.add_argument(
        "--val-budget", type=float, default=_DEFAULTS.val_budget, help="budget of the validation line"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=_DEFAULTS.threads,
        help="torch threads (results repeat for the same count)",
    )
    p.add_argument(
        "--json", type=output_path, default=None, help="write per-layer validation and timings here"
    )
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lmexec.hata.training.trainer import Hooks, LayerResult, train
    from lmexec.reporting import console, print_table, write_json

    config = TrainConfig(
        model=args.model,
        bits=args.bits,
        recipe=args.recipe,
        epochs=args.epochs,
        texts=args.texts,
        context=args.context,
        positions=args.positions,
        dense_layers=args.dense_layers,
        seed=args.seed,
        val_context=args.val_context,
        val_positions=args.val_positions,
        val_budget=args.val_budget,
        threads=args.threads,
    )
    config.validate()  # bad flags fail before the model loads
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:

        def layer_start(layer: int, steps: int):
            task = progress.add_task(f"layer {layer}", total=steps, loss="-")
            return lambda loss: progress.update(task, advance=1, loss=f"{loss:.4g}")

        def layer_done(r: LayerResult) -> None:
            for task in list(progress.task_ids):
                progress.remove_task(task)
            tag = " (resumed)" if r.resumed else f" {r.seconds:.1f} s"
            console.print(
                f"layer {r.layer:2d}: recall@k {r.learned.recall:.3f} vs simhash {r.simhash.recall:.3f}, "
                f"mass {r.learned.mass:.3f} vs {r.simhash.mass:.3f}{tag}"
            )

        result = train(config, args.out, Hooks(console.print, layer_start, layer_done))
    s = result.summary()
    print_table(
        f"held-out validation, {len(result.layers)} layers, budget {args.val_budget:g} of {args.val_context} tokens",
        ("codes", "bits", "recall@k", "mass recall"),
        [
            (f"learned ({args.recipe})", args.bits, s["learned_recall"], s["learned_mass_recall"]),
            ("simhash", args.bits, s["simhash_recall"], s["simhash_mass_recall"]),
        ],
    )
    t = result.timings
    console.print(
        f"wrote {result.path}; time {t['total_s']:.1f} s (capture {t['capture_s']:.1f} s, train {t['train_s']:.1f} s)"
    )
    if args.json:
        console.print(f"wrote {write_json(args.json, result.as_dict())}")
    return 0
