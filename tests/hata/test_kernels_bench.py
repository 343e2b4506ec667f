"""``lmexec hata bench`` on a tiny cache: every method runs, bytes and bounds are consistent, the JSON and
PNG are written; bad flags are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from lmexec.cli import main
from lmexec.hata.bench import BenchConfig, method_bytes, run_bench


def test_bench_cli_small(tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "new" / "b.png"  # the picture's folder is made
    code = main(
        [
            "hata", "bench", "--contexts", "300,1000", "--batch", "1,2", "--heads", "4", "--kv-heads", "2",
            "--head-dim", "16", "--bits", "64", "--budget", "64", "--dtype", "float32,bfloat16",
            "--repeats", "2", "--warmup", "1", "--threads", "1", "--evict-mb", "1", "--row-probe-gib", "0.05",
            "--json", str(out), "--png", str(png),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["config"]["evict_mb"] == 1
    assert png.stat().st_size > 0
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2 * 4
    assert {r["method"] for r in rows} == {"dense", "hata", "quest", "loki"}
    for r in rows:
        assert r["median_ms"] > 0 and r["bytes"] > 0
        assert r["bound_ms"] == pytest.approx(r["bytes"] / (result["bandwidth_used_gbs"] * 1e9) * 1e3)
        assert r["budget_tokens"] == (r["context"] + 1 if r["method"] == "dense" else 64)
        # the access bound reads the selected rows of hata/loki at the random-row rate, the rest streams
        element = 4 if r["dtype"] == "float32" else 2
        if r["method"] == "dense":  # every K and V row the step reads: the N cached and the appended one
            assert r["bytes"] == r["batch"] * 2 * (r["context"] + 1) * 2 * 16 * element
        gathered = r["batch"] * 2 * 64 * 2 * 16 * element if r["method"] in ("hata", "loki") else 0
        assert r["gathered_bytes"] == gathered
        stream, rate = result["bandwidth_used_gbs"] * 1e9, result["row_bandwidth_used_gbs"][r["dtype"]] * 1e9
        expected = ((r["bytes"] - gathered) / stream + gathered / rate) * 1e3
        assert r["access_bound_ms"] == pytest.approx(expected)
        assert r["access_bound_ms"] >= r["bound_ms"] * (1 - 1e-9)
        assert r["of_access_bound"] == pytest.approx(r["median_ms"] / r["access_bound_ms"])
    assert set(result["row_bandwidth_gbs"]) == {"float32", "bfloat16"}
    assert all(0 < rate <= result["bandwidth_used_gbs"] for rate in result["row_bandwidth_used_gbs"].values())
    assert len(result["checks"]) == 8
    assert all(c["of_own_access_bound"] <= c["of_own_bound"] * (1 + 1e-9) for c in result["checks"])
    for r in rows:  # 2 repeats: the percentiles lie within the samples, not extrapolated past them
        assert min(r["samples"]) <= r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] <= max(r["samples"])
    printed = "".join(capsys.readouterr().out.split())  # titles wrap at the console's width
    assert "HATAagainstthetargets" in printed and "(randomrows:float32" in printed


@pytest.mark.parametrize("rate_gbs", [2.0, 1e6])
def test_access_bound_reads_selected_rows_at_the_random_row_rate_capped_at_streaming(monkeypatch, rate_gbs):
    import lmexec.hata.row_reads as row_reads

    monkeypatch.setattr(
        row_reads, "measure_row_bandwidths", lambda sizes, *a, **k: {s: rate_gbs * 1e9 for s in sizes}
    )
    cfg = BenchConfig(
        contexts=(500,), batches=(1,), heads=4, kv_heads=2, head_dim=16, bits=64, budget=32,
        methods=("dense", "hata", "quest"), repeats=1, warmup=0, threads=1, evict_mb=1,
    )  # fmt: skip
    result = run_bench(cfg)
    stream = result["bandwidth_used_gbs"]
    rate = min(rate_gbs, stream)
    assert result["row_bandwidth_used_gbs"] == {"float32": pytest.approx(rate)}
    assert result["row_bandwidth_gbs"] == {"float32": [rate_gbs, rate_gbs]}
    rows = {r["method"]: r for r in result["rows"]}
    gathered = 2 * 32 * 2 * 16 * 4
    assert rows["hata"]["gathered_bytes"] == gathered and rows["quest"]["gathered_bytes"] == 0
    expected = ((rows["hata"]["bytes"] - gathered) / stream + gathered / rate) / 1e9 * 1e3
    assert rows["hata"]["access_bound_ms"] == pytest.approx(expected)
    for name in ("dense", "quest"):  # read in order: the access bound is the bytes bound
        assert rows[name]["access_bound_ms"] == pytest.approx(rows[name]["bound_ms"])
    if rate_gbs > stream:
        assert rows["hata"]["access_bound_ms"] == pytest.approx(rows["hata"]["bound_ms"])


def test_bytes_per_method():
    cfg = BenchConfig(heads=32, kv_heads=8, head_dim=128, bits=128)
    n, k = 131072, 2048
    assert method_bytes("dense", cfg, 1, n, n, 4) == 8 * n * 2 * 128 * 4
    rows = 8 * k * 2 * 128 * 4
    assert method_bytes("hata", cfg, 1, n, k, 4) == 8 * n * 16 + rows + 8 * 128 * 128 * 4
    assert method_bytes("quest", cfg, 1, n, k, 4) == 8 * (n // 16) * 2 * 128 * 4 + rows
    assert method_bytes("loki", cfg, 1, n, k, 4) == 8 * n * 32 * 4 + rows + 8 * 128 * 32 * 4
    short = BenchConfig(heads=32, kv_heads=8, head_dim=128, bits=32)  # one whole int64 word per key
    assert method_bytes("hata", short, 1, n, k, 4) == 8 * n * 8 + rows + 8 * 128 * 32 * 4


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--methods", "dense,magic"], "unknown methods"),
        (["--dtype", "float8"], "unknown dtypes"),
        (["--heads", "6", "--kv-heads", "4"], "multiple of --kv-heads"),
        (["--contexts", "1k"], "comma-separated whole numbers"),
        (["--bits", "100"], "hash bits"),
        (["--kernels", "cuda"], "--kernels must be one of"),
        (["--evict-mb", "-1"], "--evict-mb must be >= 0"),
        (["--threads", "-1"], "--threads must be >= 0"),
        (["--row-probe-gib", "0"], "--row-probe-gib must be >= 0.001"),
        (["--batch", "1,0"], "--batch must be positive whole numbers"),
        (["--max-cache-gib", "0"], "--max-cache-gib must be > 0"),
        (["--max-cache-gib", "-1"], "--max-cache-gib must be > 0"),
        (["--device", "tpu"], "--device must be one of cpu, cuda"),
        (["--cuda-graph"], "--cuda-graph needs --device cuda"),
        (["--heads", "0", "--kv-heads", "2"], "positive multiple of --kv-heads"),
        (["--heads", "-4", "--kv-heads", "2"], "positive multiple of --kv-heads"),  # was a traceback
        (["--row-probe-gib", "inf"], "--row-probe-gib must be at most 16"),
        (["--row-probe-gib", "nan"], "--row-probe-gib must be >= 0.001"),
        (["--evict-mb", "100000000"], "--evict-mb must be at most 16384"),
        (["--methods", "hata,hata,dense"], "--methods lists hata more than once"),
        (["--contexts", "40,40"], "--contexts lists 40 more than once"),
    ],
)
def test_bench_bad_flags(capsys, flags, message):
    assert main(["hata", "bench", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_bench_on_cuda_without_a_gpu_says_so(capsys):
    assert main(["hata", "bench", "--device", "cuda"]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_default_eviction_depends_on_the_device():
    from lmexec.hata.bench import EVICT_MB

    assert BenchConfig().evict == EVICT_MB["cpu"] and BenchConfig(device="cuda").evict == EVICT_MB["cuda"]
    assert BenchConfig(evict_mb=0, device="cuda").evict == 0


def test_every_timed_step_starts_after_an_eviction_and_methods_interleave(monkeypatch):
    """Each step, warm-up included, follows an untimed read of ``evict_mb`` MiB (cold caches, as in a
    model where the other layers ran in between); the methods take turns, one step each per round, in
    alternating order, so a drift of the machine's speed cannot favour one of them."""
    from lmexec.hata import bench
    from lmexec.hata.budget import Budget

    calls = []
    monkeypatch.setattr(bench, "_evict", lambda mib, device: calls.append((mib, device)))
    order = []
    timed = bench._Stepper.timed
    monkeypatch.setattr(bench._Stepper, "timed", lambda self: (order.append(self.name), timed(self))[1])
    cfg = bench.BenchConfig(heads=4, kv_heads=2, head_dim=16, bits=64, repeats=3, warmup=2, evict_mb=7)
    case = bench._Case(cfg, torch.float32, 1, 200)
    times = bench.run_methods(cfg, case, ("dense", "hata"), Budget(32))
    assert [len(times[m][0]) for m in ("dense", "hata")] == [3, 3]
    assert order == ["dense", "hata", "hata", "dense", "dense", "hata"]
    steps = 2 * (cfg.warmup + cfg.repeats)
    assert calls == [(7, "cpu")] * (
        2 + steps
    )  # one reset per stepper before the warm-up, one after every step
    assert case.keys.length == case.values.length == 200  # the cache is left as it was
