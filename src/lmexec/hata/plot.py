"""Picture of a fidelity sweep: attention-mass recall vs budget, one line per method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmexec.reporting import save_figure


def plot_mass_recall(result: dict[str, Any], path: str | Path) -> Path:
    """Write a PNG of mass recall (y) against budget tokens (x, log scale) for every table row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = list(dict.fromkeys(r["label"] for r in result["results"]))
    for label in labels:
        rows = sorted((r for r in result["results"] if r["label"] == label), key=lambda r: r["budget_tokens"])
        if label == "dense":
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":", label="dense")
            continue
        bytes_ = rows[0]["selection_bytes_per_token"]
        suffix = f" ({bytes_:g} B/token)" if bytes_ is not None else ""
        ax.plot(
            [r["budget_tokens"] for r in rows],
            [r["mass_recall"] for r in rows],
            marker="o",
            label=label + suffix,
        )
    model = result["model"]
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (tokens attended per decode step)")
    ax.set_ylabel("attention-mass recall")
    ax.set_title(
        f"{model['name']}: context {result['config']['context']}, layers >= {result['config']['dense_layers']}"
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
