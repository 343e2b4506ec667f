"""HATA on a CUDA GPU: generate() through the Triton kernels, and ``lmexec hata bench --device cuda``.

CI has no GPU, so these skip there; the Triton kernels themselves are checked on CPU under the
interpreter (``test_kernels_triton.py``). Run on a GPU machine with ``TRITON_INTERPRET=0``."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("needs a CUDA GPU and compiled (not interpreted) Triton", allow_module_level=True)
pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

from test_hf import check_full_budget_equals_dense, hash_weights, tiny  # noqa: E402  (tests/hata is on sys.path)

from lmexec.hata import enable  # noqa: E402
from lmexec.hata.kernels import gpu  # noqa: E402


def _decode(model, ids, handle, steps=8):
    out = model.generate(
        ids, max_new_tokens=steps, do_sample=False, pad_token_id=0, cache=handle.cache(),
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("method", ["hata", "simhash", "quest", "loki"])
def test_full_budget_on_cuda_equals_dense(method):
    ids = torch.randint(1, 96, (2, 150), generator=torch.Generator().manual_seed(1)).cuda()
    check_full_budget_equals_dense(tiny().cuda(), ids, method)


def test_small_budget_on_cuda_runs_the_triton_kernels_and_matches_cpu(monkeypatch):
    calls = {"topk": 0, "attention": 0}
    for name, key in (("hamming_topk", "topk"), ("gather_attention", "attention")):
        original = getattr(gpu, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(gpu, name, counted)
    model = tiny()
    ids = torch.randint(1, 96, (2, 400), generator=torch.Generator().manual_seed(2))
    runs = {}
    for device in ("cpu", "cuda"):
        model = model.to(device)
        handle = enable(model, weights=hash_weights(4), method="hata", budget=32, bits=64, dense_layers=1)
        runs[device] = _decode(model, ids.to(device), handle)
        handle.disable()
    assert calls["topk"] == calls["attention"] == 7 * 3  # 7 decode steps x 3 sparse layers, on the GPU only
    assert torch.equal(runs["cpu"][0], runs["cuda"][0].cpu())
    torch.testing.assert_close(runs["cpu"][1], runs["cuda"][1].cpu(), atol=1e-4, rtol=1e-4)


def test_bfloat16_model_decodes_on_cuda():
    model = tiny(dtype=torch.bfloat16).cuda()
    ids = torch.randint(1, 96, (1, 300), generator=torch.Generator().manual_seed(3)).cuda()
    handle = enable(model, weights=hash_weights(4), method="hata", budget=48, bits=64, dense_layers=1)
    sequences, logits = _decode(model, ids, handle)
    assert sequences.shape == (1, 308) and torch.isfinite(logits).all()


def test_bench_on_cuda_times_every_method():
    from lmexec.hata.bench import BenchConfig, run_bench

    cfg = BenchConfig(
        contexts=(4096, 16384), batches=(1, 2), heads=8, kv_heads=2, head_dim=64, bits=128, budget=256,
        dtypes=("float32", "bfloat16"), repeats=3, warmup=1, device="cuda",
    )  # fmt: skip
    result = run_bench(cfg)
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2 * 4
    assert all(r["median_ms"] > 0 and r["bound_ms"] > 0 for r in rows)
    assert result["machine"]["gpu"] and result["bandwidth_used_gbs"] > 100
    # the random-row rate is measured on CPU only: on the GPU the access bound is the bytes bound
    assert result["row_bandwidth_gbs"] is None
    assert all(r["access_bound_ms"] == pytest.approx(r["bound_ms"]) for r in rows)


def test_long_context_kernels_equal_the_reference_on_cuda():
    """The bench's geometry (8 KV heads, group 4, d=128, 128-bit codes) at a context past 128K that is
    no multiple of any block, k = 2048: the selection equals the reference exactly, the output closely."""
    from lmexec.hata.kernels import reference as ref

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, h, g, n, d, k = 2, 8, 4, 131072 + 37, 128, 2048
    keys = torch.randn(b, h, n, d, device="cuda", generator=gen) + 0.3
    values = torch.randn(b, h, n, d, device="cuda", generator=gen)
    query = torch.randn(b, h * g, d, device="cuda", generator=gen)
    w = torch.randn(h, d, 128, device="cuda", generator=gen)
    key_codes, query_codes = gpu.encode(keys, w), gpu.encode(query.reshape(b, h, g, d), w)
    assert torch.equal(gpu.hamming_scores(query_codes, key_codes), ref.hamming_scores(query_codes, key_codes))
    for sink, recent in ((0, 1), (4, 64)):
        idx = gpu.hamming_topk(query_codes, key_codes, k, sink, recent)
        assert torch.equal(idx, ref.hamming_topk(query_codes, key_codes, k, sink, recent))
    for dtype in (torch.float32, torch.bfloat16):
        q, kk, vv = query.to(dtype), keys.to(dtype), values.to(dtype)
        torch.testing.assert_close(
            gpu.gather_attention(q, kk, vv, idx).float(), ref.gather_attention(q, kk, vv, idx).float(),
            atol=1e-2 if dtype == torch.bfloat16 else 2e-5, rtol=1e-2 if dtype == torch.bfloat16 else 2e-5,
        )  # fmt: skip


def test_bench_times_cuda_graph_replays():
    """``--cuda-graph``: the HATA step (append, encode, three selection kernels, attention, merge) has no
    host synchronisation, so it is captured and replayed; a method that cannot be captured says why."""
    from lmexec.hata.bench import BenchConfig, run_bench

    cfg = BenchConfig(
        contexts=(20000,), batches=(2,), heads=8, kv_heads=2, head_dim=64, bits=128, budget=256,
        repeats=3, warmup=1, device="cuda", cuda_graph=True,
    )  # fmt: skip
    rows = {r["method"]: r for r in run_bench(cfg)["rows"]}
    assert rows["hata"]["timing"] == "cuda-graph" and rows["dense"]["timing"] == "cuda-graph"
    assert all(
        r["timing"] == "cuda-graph" or r["timing"].startswith("eager (capture failed") for r in rows.values()
    )
    assert all(r["median_ms"] > 0 for r in rows.values())
