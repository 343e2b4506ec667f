"""Learned HATA codes vs SimHash at 32/64/128/256 bits on SmolLM2 (held-out text, context 4096, budget 256).

For every width: train weights with ``lmexec hata train`` defaults (reusing a file already in --work,
and the shipped file at 128 bits unless --retrain), then run the fidelity experiment with
``simhash,hata`` and collect recall@k and mass recall (averaged over layers >= 2). Writes a JSON file,
prints a markdown table and plots recall vs bits.

    .venv/bin/python benchmarks/hata_bits.py --bits 32,64,128,256 --json hata_bits.json --png hata_bits.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmexec.hata.fidelity import FidelityConfig, run_fidelity
from lmexec.hata.training.trainer import TrainConfig, train
from lmexec.hata.weights import default_weights
from lmexec.reporting import write_json


def weights_for(bits: int, work: Path, recipe: str, retrain: bool) -> Path:
    """A trained weights file for ``bits`` (shipped, cached in ``work``, or trained now)."""
    shipped = default_weights("smollm2", bits)
    if shipped and recipe == "rank" and not retrain:
        return shipped
    path = work / f"smollm2-{bits}-{recipe}.safetensors"
    if not path.is_file() or retrain:
        result = train(TrainConfig(bits=bits, recipe=recipe), path)
        print(f"trained {bits} bits in {result.timings['total_s']:.0f} s -> {path}", flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="32,64,128,256")
    parser.add_argument("--recipe", default="rank", choices=("rank", "paper"))
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--budget", type=float, default=256)
    parser.add_argument("--positions", type=int, default=32)
    parser.add_argument("--work", default="hata-bits-work", help="folder for trained weights")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--json", default="hata_bits.json")
    parser.add_argument("--png", default="hata_bits.png")
    args = parser.parse_args()
    work = Path(args.work)
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        path = weights_for(bits, work, args.recipe, args.retrain)
        config = FidelityConfig(
            context=args.context,
            budget=args.budget,
            methods=("simhash", "hata"),
            bits=bits,
            positions=args.positions,
            hata_weights=str(path),
        )
        result = run_fidelity(config)
        by = {r["label"]: r for r in result["table"]}
        rows.append(
            {
                "bits": bits,
                "weights": str(path),
                **{f"{m}_{k}": by[m][k] for m in ("simhash", "hata") for k in ("recall", "mass_recall")},
            }
        )
        print(rows[-1], flush=True)
    write_json(
        args.json, {"context": args.context, "budget": args.budget, "recipe": args.recipe, "rows": rows}
    )
    print("| bits | B/token | SimHash recall@k | learned recall@k | SimHash mass | learned mass |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['bits']} | {r['bits'] // 8} | {r['simhash_recall']:.3f} | {r['hata_recall']:.3f} "
            f"| {r['simhash_mass_recall']:.3f} | {r['hata_mass_recall']:.3f} |"
        )
    _plot(rows, args.png)


def _plot(rows: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = [r["bits"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in (
        (axes[0], "recall", "top-k recall"),
        (axes[1], "mass_recall", "attention-mass recall"),
    ):
        ax.plot(bits, [r[f"hata_{key}"] for r in rows], "o-", label="learned (HATA)")
        ax.plot(bits, [r[f"simhash_{key}"] for r in rows], "s--", label="SimHash")
        ax.set_xscale("log", base=2)
        ax.set_xticks(bits, [str(b) for b in bits])
        ax.set_xlabel("code bits")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("SmolLM2-135M, held-out text, context 4096, budget 256")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
