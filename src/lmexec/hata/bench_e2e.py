"""``lmexec hata bench-e2e``: decode tokens/s of ``generate()`` with dense attention and with HATA on a real
model, next to the ceiling each gets from the bytes a decode step must read.

Per batch size the prompt (``context`` tokens of evaluation prose, the same text in every row) is
prefilled once, densely, into an in-place :class:`~lmexec.hata.hf.cache.HataCache`; each method decodes
from its own fork of that cache with ``model.generate(max_new_tokens=...)`` (greedy). A logits
processor time-stamps every step; decode tokens/s = ``batch * (steps - 1) / (last - first stamp)``,
so prefill is excluded.

* ``dense``: the ``dense`` method (stock SDPA over the in-place cache; no ``torch.cat`` per step);
* ``hata`` (or ``--method``): shipped learned weights when present, else ``simhash`` (random ``W``: the
  same work per step), first 2 layers dense, budget scaled to the context.

Ceiling: a decode step reads every weight once (fp32) and the KV bytes of its attention (dense: all K/V
of every layer; sparse layers: codes + the ``k`` selected K/V rows); ``ceiling tok/s = batch * bandwidth /
bytes``, with the bandwidth measured in the same run (streaming read). The ceiling speedup is the ratio
of the bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from lmexec.errors import UserError
from lmexec.hata.bench import load_average, measure_bandwidth
from lmexec.hata.budget import Budget

if TYPE_CHECKING:
    from lmexec.hata.selection import SelectionMethod


@dataclass
class E2EConfig:
    model: str = "smollm2"
    context: int = 8192
    batches: tuple[int, ...] = (1, 4)
    new_tokens: int = 128
    budget: float = 1 / 64
    method: str = "hata"
    threads: int = 1
    dense_layers: int = 2
    bits: int = 128

    def validate(self) -> None:
        Budget(self.budget)
        if self.context < 16 or self.new_tokens < 2 or not self.batches or min(self.batches) < 1:
            raise UserError("--context must be >= 16, --new-tokens >= 2 and --batch positive")
        if self.method == "dense":
            raise UserError("--method is the sparse method compared with dense; 'dense' always runs")
        from lmexec.hata.selection import METHODS

        if self.method not in METHODS:
            raise UserError(
                f"unknown --method {self.method!r}: use one of {', '.join(m for m in METHODS if m != 'dense')}"
            )
        if self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")


class _Stamps:
    """A logits processor that records when each step's logits arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def step_bytes(model, batch: int, n: int, method: SelectionMethod, k: int, dense_layers: int) -> int:
    """Bytes one decode step reads: fp32 weights once, plus KV: all of it for ``dense``, else the
    method's selection traffic (``selection_bytes_per_token``: codes, page bounds, a slice of K...) and
    the k selected K/V rows in each sparse layer."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    layers = cfg.num_hidden_layers
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    element = next(model.parameters()).element_size()
    full_layer = n * kv_heads * head_dim * 2 * element
    per_token = method.selection_bytes_per_token(head_dim, element)
    if per_token is None:  # dense
        kv = layers * full_layer
    else:
        sparse = round(n * kv_heads * per_token) + k * kv_heads * head_dim * 2 * element
        kv = dense_layers * full_layer + (layers - dense_layers) * sparse
    return weights + batch * kv


def run_e2e(cfg: E2EConfig, progress: Callable[[str], None] | None = None) -> dict[str, object]:
    cfg.validate()
    from transformers import LogitsProcessorList

    import lmexec.hata as hata_pkg
    from lmexec.hata.hf.cache import HataCache, HataSettings
    from lmexec.hata.hf.enable import default_weights_file
    from lmexec.hata.models import check_positions, load_model
    from lmexec.hata.selection import Dense
    from lmexec.hata.texts import token_block

    note = progress or (lambda _msg: None)
    torch.set_num_threads(cfg.threads)
    load_start = load_average()
    note(f"loading {cfg.model}")
    model, tokenizer = load_model(cfg.model)
    check_positions(model, cfg.context, "--context")  # decoding past the table is only timed, not judged
    method = cfg.method
    if method == "hata" and default_weights_file(model, cfg.bits) is None:
        method = "simhash"
        note("no shipped hata weights for this model: using simhash (random W, the same work per step)")
    handle = hata_pkg.enable(
        model, budget=cfg.budget, method=method, dense_layers=cfg.dense_layers, bits=cfg.bits
    )
    bandwidth = [measure_bandwidth()]
    ids = token_block(tokenizer, "prose", "evaluation", cfg.context)
    k = Budget(cfg.budget).tokens(cfg.context)
    rows = []
    for batch in cfg.batches:
        prompt = ids[None].expand(batch, -1).contiguous()
        note(f"batch {batch}: dense prefill of {cfg.context} tokens")
        base = HataCache(HataSettings(Dense(), Budget(1), cfg.dense_layers), model.config.num_hidden_layers)
        with torch.no_grad():
            t = time.perf_counter()
            model(input_ids=prompt[:, :-1], cache=base, use_cache=True, logits_to_keep=1)
            prefill_s = time.perf_counter() - t
        measured = {}
        for name in ("dense", method):
            settings = (
                HataSettings(Dense(), Budget(1), cfg.dense_layers, capacity=cfg.context + cfg.new_tokens + 8)
                if name == "dense"
                else handle.settings()
            )
            cache = base.fork(settings, room=cfg.new_tokens + 8)
            stamps = _Stamps()
            note(f"batch {batch}: {name} generate({cfg.new_tokens} tokens)")
            with torch.no_grad():
                out = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    cache=cache,
                    max_new_tokens=cfg.new_tokens,
                    min_new_tokens=cfg.new_tokens,
                    do_sample=False,
                    logits_processor=LogitsProcessorList([stamps]),
                )
            steps = len(stamps.times)
            elapsed = stamps.times[-1] - stamps.times[0]
            tokens_per_s = batch * (steps - 1) / elapsed if elapsed > 0 else None
            nbytes = step_bytes(model, batch, cfg.context, settings.method, k, cfg.dense_layers)
            sparse_steps = int(settings.stats["steps"])  # decode calls that went sparse (layer x step)
            measured[name] = {
                "batch": batch,
                "method": name,
                "tokens_per_s": tokens_per_s,
                "steps": steps,
                "decode_s": elapsed,
                "bytes_per_step": nbytes,
                "generated": int(out.shape[1] - prompt.shape[1]),
                "prefill_s": prefill_s,
                "sparse_layer_steps": sparse_steps,
            }
        rows.extend(measured.values())
    bandwidth.append(measure_bandwidth())
    best = max(bandwidth)
    for row in rows:
        row["ceiling_tokens_per_s"] = row["batch"] * best / row["bytes_per_step"]
        dense = next(r for r in rows if r["batch"] == row["batch"] and r["method"] == "dense")
        row["speedup"] = (
            row["tokens_per_s"] / dense["tokens_per_s"]
            if row["tokens_per_s"] and dense["tokens_per_s"]
            else None
        )
        row["ceiling_speedup"] = dense["bytes_per_step"] / row["bytes_per_step"]
    return {
        "config": asdict(cfg),
        "method_used": method,
        "budget_tokens": k,
        "bandwidth_gbs": best / 1e9,
        "load_average": [load_start, load_average()],
        "threads": cfg.threads,
        "cores": os.cpu_count(),
        "rows": rows,
    }
