"""``lmexec hata eval``: accuracy of sparse decoding through transformers (passkey, NIAH, lm)."""

from __future__ import annotations

import argparse

from lmexec.reporting import output_path, picture_path


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ints(text: str, flag: str) -> tuple[int, ...]:
    from lmexec.errors import UserError

    try:
        return tuple(int(part) for part in _csv(text))
    except ValueError:
        raise UserError(f"{flag} must be comma-separated whole numbers, got {text!r}") from None


def _floats(text: str, flag: str) -> tuple[float, ...]:
    from lmexec.errors import UserError

    try:
        return tuple(float(part) for part in _csv(text))
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval",
        help="accuracy of sparse decoding inside transformers generate (passkey, niah, lm)",
        description="Prefill each prompt densely once, then decode with every method and budget through "
        "the registered 'hata' attention; compare answers (passkey, niah) or logits (lm) with dense.",
    )
    ev.add_argument(
        "--model", default="smollm2", help="model name (smollm2) or a local folder (default: smollm2)"
    )
    ev.add_argument(
        "--task", default="passkey", help="passkey, niah, lm, or a comma-separated list (default: passkey)"
    )
    ev.add_argument(
        "--contexts", default="1024,2048,4096,8192", help="prompt lengths in tokens (default: 1024..8192)"
    )
    ev.add_argument(
        "--budgets", default="64,128,256,512", help="token counts (>= 1) or ratios (< 1, e.g. 0.0625 = 1/16)"
    )
    ev.add_argument(
        "--methods", default="dense,hata,oracle,simhash,loki,quest", help="comma-separated methods"
    )
    ev.add_argument(
        "--depths", default="0.1,0.5,0.9", help="needle depths for passkey/niah (default: 0.1,0.5,0.9)"
    )
    ev.add_argument("--lm-steps", type=int, default=32, help="teacher-forced tokens for lm (default: 32)")
    ev.add_argument("--dense-layers", type=int, default=2, help="leading layers kept dense (default: 2)")
    ev.add_argument("--sink", type=int, default=0, help="first tokens always attended (default: 0)")
    ev.add_argument("--recent", type=int, default=1, help="last tokens always attended (default: 1)")
    ev.add_argument(
        "--bits",
        type=int,
        default=None,
        help="hash code bits (default: a --hata-weights file's own width; 128 for simhash and the shipped weights)",
    )
    ev.add_argument(
        "--hata-weights", default=None, help="learned projections (default: the file shipped for the model)"
    )
    ev.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, steadier than 2)")
    ev.add_argument("--no-recall", action="store_true", help="skip the recall@k measurement (faster)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the prompts (default: 0)")
    ev.add_argument("--json", type=output_path, default=None, help="write the full result here")
    ev.add_argument("--png", type=picture_path, default=None, help="plot accuracy vs budget here")
    ev.set_defaults(handler=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lmexec.hata.budget import parse_budget
    from lmexec.hata.hf.evaluate import EvalConfig, plot_eval, run_eval
    from lmexec.reporting import console, write_json

    config = EvalConfig(
        model=args.model,
        tasks=_csv(args.task),
        contexts=_ints(args.contexts, "--contexts"),
        budgets=tuple(parse_budget(b) for b in _csv(args.budgets)),
        methods=_csv(args.methods),
        depths=_floats(args.depths, "--depths"),
        dense_layers=args.dense_layers,
        sink=args.sink,
        recent=args.recent,
        bits=args.bits,
        hata_weights=args.hata_weights,
        lm_steps=args.lm_steps,
        seed=args.seed,
        threads=args.threads,
        record_recall=not args.no_recall,
    )
    config.validate()  # bad flags fail before the model loads
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())

    def factory(progress):
        def start(description: str, total: int):
            task = progress.add_task(description, total=total)
            return lambda: progress.advance(task)

        return start

    with Progress(*columns, console=console, transient=True) as progress:
        result = run_eval(config, factory(progress))
    print_eval_tables(result)
    console.print(
        f"time: {result['timings']['total_s']:.0f} s (prefill {result['timings']['prefill_s']:.0f} s); "
        f"hata weights: {result['hata_weights'] or '-'}"
    )
    if args.json:
        console.print(f"wrote {write_json(args.json, result)}")
    if args.png:
        console.print(f"wrote {plot_eval(result, args.png)}")
    return 0


def print_eval_tables(result: dict) -> None:
    from lmexec.reporting import print_table

    model = result["model"]["name"]
    layers = result["config"]["dense_layers"]
    for task in dict.fromkeys(r["task"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["task"] == task]
        if task == "lm":
            print_table(
                f"lm: {model}, teacher-forced {result['config']['lm_steps']} tokens after the context, "
                f"layers >= {layers} sparse (agreement/KL vs dense)",
                ("method", "context", "budget", "tokens", "top-1 agree", "KL", "PPL", "recall@k", "s/token"),
                [
                    (
                        r["method"],
                        r["context"],
                        r["budget_label"],
                        r["budget_tokens"],
                        r["top1_agreement"],
                        r["kl"],
                        r["ppl"],
                        r["recall"],
                        r["decode_s_per_token"],
                    )
                    for r in rows
                ],
            )
        else:
            print_table(
                f"{task}: {model}, {rows[0]['samples']} depths per context, layers >= {layers} sparse",
                (
                    "method",
                    "context",
                    "budget",
                    "tokens",
                    "correct",
                    "accuracy",
                    "kept of dense",
                    "recall@k",
                    "s/token",
                ),
                [
                    (
                        r["method"],
                        r["context"],
                        r["budget_label"],
                        r["budget_tokens"],
                        f"{r['correct']}/{r['samples']}",
                        r["accuracy"],
                        r["retained"],
                        r["recall"],
                        r["decode_s_per_token"],
                    )
                    for r in rows
                ],
            )
