"""``hata_demo``: a ~2K-token passkey prompt answered by SmolLM2 with dense attention and with HATA.

Both answers come from ``model.generate``; the dense run uses the stock SDPA attention and
``DynamicCache``, the HATA run the registered ``hata`` attention with a :class:`HataCache` at a budget
of 1/16 of the context. Decode speed is tokens after the first divided by the time after the first
(prefill excluded). Recall@k (HATA's selection against the exact top-k at the same budget, averaged
over sparse layers, KV heads and decode steps) comes from a third run that also computes the exact
scores, so it does not slow the timed run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


class _Clock:
    """A logits processor that stamps the time of each generated token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores

    def tokens_per_s(self) -> float | None:
        if len(self.stamps) < 2:
            return None
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


def _generate(model, tokenizer, ids: torch.Tensor, new_tokens: int, **kwargs) -> tuple[str, _Clock, float]:
    from transformers import LogitsProcessorList

    clock = _Clock()
    start = time.perf_counter()
    out = model.generate(
        ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
        pad_token_id=tokenizer.pad_token_id or 0,
        **kwargs,
    )
    total = time.perf_counter() - start
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), clock, total


def hata_demo(out: Path, context: int = 2048, budget: float = 1 / 16, new_tokens: int = 16) -> dict[str, Any]:
    """Answer one passkey prompt densely and with HATA; print and return answers, speeds and recall."""
    from lmexec.hata.hf.enable import default_weights_file, enable
    from lmexec.hata.hf.tasks import is_correct, passkey_prompt
    from lmexec.hata.models import load_model
    from lmexec.reporting import console, print_table, write_json

    torch.set_num_threads(1)  # steadier than 2 threads on a 2-core machine
    model, tokenizer = load_model("smollm2")
    sample = passkey_prompt(tokenizer, context, depth=0.5, seed=0)
    ids = sample.input_ids[None]
    weights = default_weights_file(model)
    method = "hata" if weights else "simhash"

    dense_text, dense_clock, dense_total = _generate(model, tokenizer, ids, new_tokens)
    handle = enable(model, budget=budget, method=method)
    hata_text, hata_clock, hata_total = _generate(model, tokenizer, ids, new_tokens, cache=handle.cache())
    probe = enable(model, budget=budget, method=method, record_recall=True)
    cache = probe.cache()
    _generate(model, tokenizer, ids, 4, cache=cache)
    recall = cache.settings.mean_recall
    handle.disable()

    rows = [
        (
            "dense (sdpa)",
            dense_text.strip(),
            is_correct(sample, dense_text),
            dense_clock.tokens_per_s(),
            dense_total,
            "-",
        ),
        (
            f"{method} 1/{round(1 / budget)}" if budget < 1 else f"{method} {int(budget)}",
            hata_text.strip(),
            is_correct(sample, hata_text),
            hata_clock.tokens_per_s(),
            hata_total,
            recall,
        ),
    ]
    print_table(
        f"HATA in transformers: SmolLM2-135M, passkey {sample.answer} at depth 0.5 of {ids.shape[1]} tokens, "
        f"budget {handle.budget.tokens(ids.shape[1])} tokens, layers >= {handle.dense_layers} sparse",
        ("attention", "answer", "correct", "decode tok/s", "generate s", "recall@k"),
        rows,
    )
    if not weights:
        console.print("no learned weights shipped yet (hata/data/smollm2-128.safetensors): used simhash")
    report = {
        "prompt_tokens": int(ids.shape[1]),
        "passkey": sample.answer,
        "method": method,
        "weights": str(weights) if weights else None,
        "budget_tokens": handle.budget.tokens(ids.shape[1]),
        "dense": {
            "answer": dense_text,
            "correct": rows[0][2],
            "decode_tokens_per_s": rows[0][3],
            "total_s": dense_total,
        },
        "hata": {
            "answer": hata_text,
            "correct": rows[1][2],
            "decode_tokens_per_s": rows[1][3],
            "total_s": hata_total,
            "recall": recall,
        },
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "hata-demo.json", report)
    return report
