"""``lmexec hata bench`` and ``lmexec hata bench-e2e``: argument parsing, tables, JSON and PNG output."""

from __future__ import annotations

import argparse

from lmexec.reporting import output_path, picture_path


def _ints(text: str) -> tuple[int, ...]:
    from lmexec.errors import UserError

    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise UserError(f"expected comma-separated whole numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="per-layer decode latency: dense SDPA vs hata/quest/loki, against memory bandwidth",
        description="Time one decode step of one attention layer per method on a synthetic cache, "
        "measure this machine's memory bandwidth in the same run and show each method against its "
        "bytes-bound time.",
    )
    bench.add_argument("--contexts", default="8192,32768,131072", help="cached tokens (default: 8K,32K,128K)")
    bench.add_argument("--batch", default="1,8", help="batch sizes (default: 1,8)")
    bench.add_argument("--heads", type=int, default=32, help="query heads (default: 32)")
    bench.add_argument("--kv-heads", type=int, default=8, help="KV heads (default: 8)")
    bench.add_argument("--head-dim", type=int, default=128, help="head dimension (default: 128)")
    bench.add_argument("--bits", type=int, default=128, help="hash code bits (default: 128)")
    bench.add_argument("--budget", default="2048", help="tokens per step: count or ratio < 1 (default: 2048)")
    bench.add_argument("--sink", type=int, default=0, help="first tokens always kept (default: 0)")
    bench.add_argument("--recent", type=int, default=1, help="last tokens always kept (default: 1)")
    bench.add_argument("--dtype", default="float32", help="cache dtypes: float32,bfloat16 (default: float32)")
    bench.add_argument("--methods", default="dense,hata,quest,loki", help="methods (default: all four)")
    bench.add_argument("--repeats", type=int, default=20, help="timed steps per row (default: 20)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    bench.add_argument("--threads", type=int, default=0, help="torch/numba threads (default: all cores)")
    bench.add_argument(
        "--evict-mb",
        type=int,
        default=None,
        help="MiB read (untimed) before each step so it starts with cold caches, as in a model; 0: warm "
        "(default: 64 on CPU, 512 on CUDA)",
    )
    bench.add_argument(
        "--device",
        default="cpu",
        help="where the cache lives: cpu (numba kernels) or cuda (Triton kernels, synchronised timing) "
        "(default: cpu)",
    )
    bench.add_argument(
        "--max-cache-gib", type=float, default=12.0, help="skip rows whose K+V exceed this (default: 12)"
    )
    bench.add_argument(
        "--kernels", default="auto", help="kernel backend: auto, torch, numba, triton (default: auto)"
    )
    bench.add_argument(
        "--huge-pages",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="back the K/V buffers with 2 MiB pages via madvise (default: on)",
    )
    bench.add_argument(
        "--row-probe-gib",
        type=float,
        default=1.0,
        help="GiB the random-row read probe (CPU) reads its rows from; several times the last-level cache "
        "(default: 1)",
    )
    bench.add_argument(
        "--cuda-graph",
        action="store_true",
        help="with --device cuda: time replays of each method's step captured in a CUDA graph (the GPU's "
        "time without per-launch host work, as serving engines decode)",
    )
    bench.add_argument("--json", type=output_path, default=None, help="write the full result here")
    bench.add_argument("--png", type=picture_path, default=None, help="plot latency vs context here")
    bench.set_defaults(handler=_bench)

    e2e = sub.add_parser(
        "bench-e2e",
        help="end-to-end generate() tokens/s, dense vs HATA, next to the bytes-per-step ceiling",
        description="Prefill a context, decode new tokens with generate() densely and with HATA, and "
        "compare decode tokens/s with the ceiling from the bytes each step reads (weights + KV).",
    )
    e2e.add_argument("--model", default="smollm2", help="model (default: smollm2)")
    e2e.add_argument("--context", type=int, default=8192, help="prompt tokens (default: 8192)")
    e2e.add_argument("--batch", default="1,4", help="batch sizes (default: 1,4)")
    e2e.add_argument("--new-tokens", type=int, default=128, help="tokens generated (default: 128)")
    e2e.add_argument(
        "--budget",
        default="0.015625",
        help="tokens per step; default 1/64 of the context (2048 of 128K scaled to the context)",
    )
    e2e.add_argument("--method", default="hata", help="sparse method (default: hata, shipped weights)")
    e2e.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    e2e.add_argument("--json", type=output_path, default=None, help="write the result here")
    e2e.set_defaults(handler=_bench_e2e)


def _bench(args: argparse.Namespace) -> int:
    from lmexec.hata.bench import BenchConfig, plot, run_bench
    from lmexec.hata.budget import parse_budget
    from lmexec.reporting import console, print_table, write_json

    cfg = BenchConfig(
        contexts=_ints(args.contexts),
        batches=_ints(args.batch),
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        bits=args.bits,
        budget=parse_budget(args.budget),
        sink=args.sink,
        recent=args.recent,
        dtypes=_names(args.dtype),
        methods=_names(args.methods),
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        evict_mb=args.evict_mb,
        max_cache_gib=args.max_cache_gib,
        kernels=args.kernels,
        huge_pages=args.huge_pages,
        row_probe_gib=args.row_probe_gib,
        device=args.device,
        cuda_graph=args.cuda_graph,
    )
    cfg.validate()
    result = run_bench(cfg, lambda msg: console.print(msg, style="dim"))
    m = result["machine"]
    print_table(
        f"HATA decode, one layer: {cfg.heads}/{cfg.kv_heads} heads, d={cfg.head_dim}, {cfg.bits}-bit codes, "
        f"budget {args.budget}; {m.get('gpu', 'CPU')}; bandwidth {result['bandwidth_used_gbs']:.1f} GB/s "
        f"(random rows: {_rates(result['row_bandwidth_gbs'], result['row_bandwidth_used_gbs'])}); "
        f"{m['threads']} threads; {'CUDA graph replays; ' if cfg.cuda_graph else ''}"
        f"load {m['load_average_start']} -> {m['load_average_end']}",
        (
            "dtype",
            "batch",
            "context",
            "method",
            "k",
            "median ms",
            "p10-p90 ms",
            "cpu ms",
            "MB read",
            "bound ms",
            "x bound",
            "x access bound",
            "vs dense",
            "vs ideal dense",
        ),
        [
            (
                r["dtype"],
                r["batch"],
                r["context"],
                r["method"],
                r["budget_tokens"],
                r["median_ms"],
                f"{r['p10_ms']:.2f}-{r['p90_ms']:.2f}",
                r["cpu_ms"],
                r["bytes"] / 1e6,
                r["bound_ms"],
                r["of_bound"],
                r["of_access_bound"],
                r["speedup_vs_dense"],
                r["speedup_vs_dense_bound"],
            )
            for r in result["rows"]
        ],
    )
    for r in result["rows"]:
        if r["timing"].startswith("eager ("):
            console.print(f"note: {r['method']} {r['dtype']} B={r['batch']} N={r['context']}: {r['timing']}")
    print_table(
        "HATA against the targets (speedups: other time / HATA time; 'bound' = bytes / bandwidth; 'access "
        "bound' reads the selected rows at the random-row rate)",
        ("dtype", "batch", "context", "vs dense", "vs ideal dense", "x own bound", "x own access bound",
         "vs quest", "vs loki", "vs quest bound", "vs loki bound"),
        [
            (c["dtype"], c["batch"], c["context"], c.get("vs_dense"), c.get("vs_dense_bound"), c["of_own_bound"],
             c["of_own_access_bound"], c.get("vs_quest"), c.get("vs_loki"), c.get("vs_quest_bound"),
             c.get("vs_loki_bound"))
            for c in result["checks"]
        ],
    )  # fmt: skip
    if args.json:
        console.print(f"wrote {write_json(args.json, result)}")
    if args.png:
        console.print(f"wrote {plot(result, args.png)}")
    return 0


def _rates(measured: dict[str, list[float]] | None, used: dict[str, float]) -> str:
    """The random-row rates the access bounds used, per dtype (not measured on CUDA)."""
    if measured is None:
        return "not measured"
    return ", ".join(f"{dtype} {rate:.1f} GB/s" for dtype, rate in used.items())


def _bench_e2e(args: argparse.Namespace) -> int:
    from lmexec.hata.bench_e2e import E2EConfig, run_e2e
    from lmexec.hata.budget import parse_budget
    from lmexec.reporting import console, print_table, write_json

    cfg = E2EConfig(
        model=args.model,
        context=args.context,
        batches=_ints(args.batch),
        new_tokens=args.new_tokens,
        budget=parse_budget(args.budget),
        method=args.method,
        threads=args.threads,
    )
    cfg.validate()
    result = run_e2e(cfg, lambda msg: console.print(msg, style="dim"))
    print_table(
        f"{cfg.model} generate(), context {cfg.context}, {cfg.new_tokens} new tokens, budget {args.budget}, "
        f"bandwidth {result['bandwidth_gbs']:.1f} GB/s, load {result['load_average']}",
        ("batch", "method", "decode tok/s", "MB/step", "ceiling tok/s", "speedup", "ceiling speedup"),
        [
            (
                r["batch"],
                r["method"],
                r["tokens_per_s"],
                r["bytes_per_step"] / 1e6,
                r["ceiling_tokens_per_s"],
                r["speedup"],
                r["ceiling_speedup"],
            )
            for r in result["rows"]
        ],
    )
    if args.json:
        console.print(f"wrote {write_json(args.json, result)}")
    return 0
