"""Accuracy of sparse decoding inside transformers: ``lmexec hata eval``.

For every sample the prompt is prefilled **once** with dense attention into a :class:`HataCache`
(prefill is dense for every method, so its K/V are shared); each (method, budget) then decodes from
its own fork of that cache (K/V copied, method features built by ``prepare``), through the model's
ordinary forward with the registered ``hata`` attention. Passkey/NIAH decode greedily and score the
answer; ``lm`` teacher-forces held-out text and compares each decode step's logits with dense
(top-1 agreement, KL(dense || method), perplexity). Recall@k of each selection against the exact
top-k at the same budget is recorded per decode step and layer.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lmexec.errors import UserError, check_distinct, check_seed
from lmexec.hata.budget import Budget
from lmexec.hata.hf.cache import HataCache, HataSettings
from lmexec.hata.hf.tasks import DEFAULT_DEPTHS, TASKS, Sample, is_correct, make_samples
from lmexec.hata.selection import Dense
from lmexec.reporting import save_figure

Progress = Callable[[str, int], Callable[[], None]]


@dataclass
class EvalConfig:
    model: str = "smollm2"
    tasks: tuple[str, ...] = ("passkey",)
    contexts: tuple[int, ...] = (1024, 2048, 4096, 8192)
    budgets: tuple[float, ...] = (64, 128, 256, 512)
    methods: tuple[str, ...] = ("dense", "hata", "oracle", "simhash", "loki", "quest")
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    dense_layers: int = 2
    sink: int = 0
    recent: int = 1
    bits: int | None = None
    """Code width: ``None`` = the weights file's own (hata), 128 for simhash and the shipped file."""
    hata_weights: str | None = None
    lm_steps: int = 32
    seed: int = 0
    threads: int = 1
    record_recall: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        from lmexec.hata.codes import check_bits
        from lmexec.hata.selection import METHODS

        for flag, values in (("--task", self.tasks), ("--methods", self.methods), ("--depths", self.depths)):
            if not values:
                raise UserError(f"{flag} needs at least one value")
        for flag, values in (("--task", self.tasks), ("--methods", self.methods), ("--depths", self.depths),
                             ("--contexts", self.contexts), ("--budgets", self.budgets)):  # fmt: skip
            check_distinct(flag, values)
        if self.bits is not None:
            check_bits(self.bits)
        check_seed(self.seed)
        if self.dense_layers < 0:
            raise UserError(f"--dense-layers must be >= 0, got {self.dense_layers}")
        for task in self.tasks:
            if task not in TASKS:
                raise UserError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
        for method in self.methods:
            if method not in METHODS:
                raise UserError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        if not self.contexts or any(c < 64 for c in self.contexts):
            raise UserError(f"contexts must be token counts >= 64, got {list(self.contexts)}")
        if not self.budgets:
            raise UserError("give at least one budget (--budgets)")
        for budget in self.budgets:
            Budget(budget, self.sink, self.recent)
        if any(not 0 <= d <= 1 for d in self.depths):
            raise UserError(f"depths must lie in [0, 1], got {list(self.depths)}")
        if self.lm_steps < 2:
            raise UserError(f"--lm-steps must be >= 2, got {self.lm_steps}")
        if self.threads < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads}")


def budget_label(budget: float) -> str:
    if budget >= 1:
        return str(int(budget))
    inverse = 1 / budget
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-6 else f"{budget:g}"


@torch.no_grad()
def prefill(model: Any, ids: torch.Tensor, dense_layers: int) -> tuple[HataCache, torch.Tensor]:
    """Dense prefill of ``ids [T]`` into a feature-less cache -> (cache, logits of the next token ``[V]``)."""
    settings = HataSettings(Dense(), Budget(1), dense_layers)
    cache = HataCache(settings, model.config.num_hidden_layers)
    out = model(input_ids=ids[None], cache=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[0, -1].float()


@torch.no_grad()
def decode(model: Any, cache: HataCache, first: torch.Tensor, steps: int, forced: torch.Tensor | None = None):
    """Greedy decode (or teacher-forced with ``forced [steps]``) from ``first`` logits.

    Returns (tokens ``[steps]``, logits ``[steps - 1, V]`` of the decode steps, seconds per step).
    """
    token = int(first.argmax()) if forced is None else int(forced[0])
    tokens, logits = [token], []
    start = time.perf_counter()
    for step in range(1, steps):
        out = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
        row = out.logits[0, -1].float()
        logits.append(row)
        token = int(row.argmax()) if forced is None else int(forced[step])
        tokens.append(token)
    elapsed = time.perf_counter() - start
    stacked = torch.stack(logits) if logits else torch.empty(0)
    return torch.tensor(tokens), stacked, elapsed / max(1, steps - 1)


def _variants(config: EvalConfig) -> list[tuple[str, float | None]]:
    """(method, budget) pairs; dense first, always: it is the reference of every other row."""
    rows: list[tuple[str, float | None]] = [("dense", None)]
    for method in config.methods:
        if method != "dense":
            rows.extend((method, b) for b in config.budgets)
    return rows


def run_eval(config: EvalConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run every task x context x sample x (method, budget); return rows, per-sample records, timings."""
    from lmexec.hata.hf.attention import register
    from lmexec.hata.hf.enable import make_method, model_shape
    from lmexec.hata.models import check_positions, load_model

    config.validate()
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    model, tokenizer = load_model(config.model)
    shape = model_shape(model)
    if config.dense_layers > shape.n_layers:
        raise UserError(f"--dense-layers {config.dense_layers} exceeds the model's {shape.n_layers} layers")
    weights_file = None
    if "hata" in config.methods:
        from lmexec.hata.hf.enable import default_weights_file

        weights_file = config.hata_weights or default_weights_file(model, config.bits)
    methods = {
        name: make_method(
            name, shape, config.dense_layers, weights_file if name == "hata" else None, config.bits, model
        )
        for name in config.methods
    }
    if "dense" not in methods:
        methods["dense"] = Dense()
    model.set_attn_implementation(register())
    for context in config.contexts:
        check_positions(model, context)
    variants = _variants(config)
    records: list[dict[str, Any]] = []
    prefill_s = 0.0
    for task in config.tasks:
        for context in config.contexts:
            samples = make_samples(task, tokenizer, context, config.depths, config.seed, config.lm_steps)
            tick = progress(f"{task} @ {context}", len(samples) * len(variants)) if progress else None
            for sample in samples:
                t0 = time.perf_counter()
                base, first = prefill(model, sample.input_ids, config.dense_layers)
                prefill_s += time.perf_counter() - t0
                records.extend(
                    _run_sample(model, tokenizer, config, methods, variants, sample, base, first, tick)
                )
                del base
    result = {
        "config": asdict(config),
        "model": {
            "name": config.model,
            "family": shape.family,
            "layers": shape.n_layers,
            "kv_heads": shape.n_kv_heads,
            "heads": shape.n_heads,
            "head_dim": shape.head_dim,
        },
        "hata_weights": str(weights_file) if weights_file else None,
        "records": records,
        "rows": summarize(records),
        "timings": {"total_s": time.perf_counter() - started, "prefill_s": prefill_s},
    }
    return result


def _run_sample(model, tokenizer, config, methods, variants, sample: Sample, base: HataCache, first, tick):
    out = []
    reference = None
    for method_name, budget in variants:
        budget_obj = Budget(budget if budget is not None else 1, config.sink, config.recent)
        settings = HataSettings(
            copy.deepcopy(methods[method_name]),
            budget_obj,
            config.dense_layers,
            record_recall=config.record_recall and method_name != "dense",
        )
        cache = base.fork(settings, room=sample.max_new_tokens + 8)
        steps = sample.max_new_tokens
        tokens, logits, step_s = decode(model, cache, first, steps, sample.targets)
        record: dict[str, Any] = {
            "task": sample.task,
            "context": sample.context,
            "depth": sample.depth,
            "prompt_tokens": int(sample.input_ids.shape[0]),
            "method": method_name,
            "budget": budget,
            "budget_label": budget_label(budget) if budget else "all",
            "budget_tokens": budget_obj.tokens(int(sample.input_ids.shape[0]))
            if budget
            else int(sample.input_ids.shape[0]),
            "recall": settings.mean_recall,
            "decode_s_per_token": step_s,
        }
        if sample.task == "lm":
            assert sample.targets is not None
            targets = sample.targets[1:]
            logp = torch.log_softmax(logits, dim=-1)
            nll = -logp.gather(1, targets[:, None]).squeeze(1)
            record["ppl"] = math.exp(float(nll.mean()))
            if reference is None:
                reference = logits
            ref_logp = torch.log_softmax(reference, dim=-1)
            record["top1_agreement"] = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
            record["kl"] = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
        else:
            text = tokenizer.decode(tokens)
            record["output"] = text
            record["answer"] = sample.answer
            record["correct"] = is_correct(sample, text)
            if reference is None:
                reference = record["correct"]
            record["dense_correct"] = reference
        out.append(record)
        del cache
        if tick:
            tick()
    return out


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method, context, budget): accuracy and retention, or lm agreement/KL/PPL."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["method"], r["context"], r["budget"]), []).append(r)
    rows = []
    for (task, method, context, budget), items in groups.items():
        row: dict[str, Any] = {
            "task": task,
            "method": method,
            "context": context,
            "budget": budget,
            "budget_label": items[0]["budget_label"],
            "budget_tokens": items[0]["budget_tokens"],
            "samples": len(items),
            "recall": _mean([r["recall"] for r in items if r["recall"] is not None]),
            "decode_s_per_token": _mean([r["decode_s_per_token"] for r in items]),
        }
        if task == "lm":
            for key in ("top1_agreement", "kl", "ppl"):
                row[key] = _mean([r[key] for r in items])
        else:
            correct = sum(r["correct"] for r in items)
            dense_ok = [r for r in items if r["dense_correct"]]
            row["correct"] = correct
            row["accuracy"] = correct / len(items)
            row["dense_correct"] = len(dense_ok)
            row["retained"] = sum(r["correct"] for r in dense_ok) / len(dense_ok) if dense_ok else None
        rows.append(row)
    return rows


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def plot_eval(result: dict[str, Any], path: str) -> str:
    """Accuracy (passkey/niah) or top-1 agreement (lm) vs budget tokens, one panel per task x context."""
    import matplotlib

    matplotlib.use("Agg")

    import matplotlib.pyplot as plt

    rows = result["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(
        len(tasks), len(contexts), figsize=(3.6 * len(contexts), 3.0 * len(tasks)), squeeze=False
    )
    for i, task in enumerate(tasks):
        key = "top1_agreement" if task == "lm" else "accuracy"
        for j, context in enumerate(contexts):
            ax = axes[i][j]
            cell = [r for r in rows if r["task"] == task and r["context"] == context]
            for method in dict.fromkeys(r["method"] for r in cell):
                line = sorted((r for r in cell if r["method"] == method), key=lambda r: r["budget_tokens"])
                if method == "dense":
                    ax.axhline(line[0][key], color="black", linestyle=":", linewidth=1, label="dense")
                    continue
                ax.plot([r["budget_tokens"] for r in line], [r[key] for r in line], marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{task}, context {context}", fontsize=9)
            ax.set_xlabel("budget (tokens)", fontsize=8)
            ax.set_ylabel("top-1 agreement" if task == "lm" else "accuracy", fontsize=8)
            ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(
        f"{result['model']['name']}: sparse decoding in transformers (layers >= {result['config']['dense_layers']})",
        fontsize=10,
    )
    fig.tight_layout()
    return str(save_figure(fig, path, dpi=110))
