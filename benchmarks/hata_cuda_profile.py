"""Where a HATA decode step's time goes on a CUDA GPU: GPU kernel time per step vs wall time per step.

Builds the same one-layer case as ``lmexec hata bench --device cuda`` (32/8 heads, d=128, 128-bit codes,
budget 2048), runs steps of ``hata`` and ``dense`` under ``torch.profiler`` and prints, per method, the
wall time of a step, the summed GPU kernel time of a step (the rest is launch and host overhead), and
the kernels that take the most GPU time. Needs a CUDA GPU.

    PYTHONPATH=src python benchmarks/hata_cuda_profile.py --contexts 131072 --batch 1,8 --json prof.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lmexec.hata.bench import DTYPES, BenchConfig, _Case, _Stepper, sync
from lmexec.hata.budget import Budget
from lmexec.reporting import write_json


def profile_method(cfg: BenchConfig, case: _Case, name: str, steps: int) -> dict[str, object]:
    stepper = _Stepper(cfg, case, name, Budget(cfg.budget, cfg.sink, cfg.recent))
    for _ in range(3):
        stepper.step()
        stepper.reset()
    walls = [stepper.timed()[0] for _ in range(steps)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            stepper.step()
            sync(cfg.device)
            stepper.reset()
    kernels = []
    for event in prof.key_averages():
        gpu_us = getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0)
        if str(getattr(event, "device_type", "")).endswith("CUDA") and gpu_us > 0:
            kernels.append({"kernel": event.key[:80], "calls_per_step": event.count / steps,
                            "gpu_us_per_step": gpu_us / steps})  # fmt: skip
    kernels.sort(key=lambda k: -k["gpu_us_per_step"])
    evict = [k for k in kernels if "reduce" in k["kernel"].lower() and k["calls_per_step"] == 1.0]
    stepper.cache.extras.clear()
    return {
        "method": name,
        "wall_ms": statistics.median(walls),
        "gpu_ms_all_kernels": sum(k["gpu_us_per_step"] for k in kernels) / 1e3,
        "note": "gpu_ms_all_kernels includes the untimed eviction read (a reduce kernel) of each reset",
        "eviction_candidates": evict[:2],
        "kernels": kernels[:12],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="131072")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda", help="cuda (cpu only checks that the script runs)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = []
    for dtype in args.dtype.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
            for n in (int(c) for c in args.contexts.split(",")):
                cfg = BenchConfig(contexts=(n,), batches=(batch,), dtypes=(dtype,), device=args.device)
                cfg.validate()
                t = time.perf_counter()
                case = _Case(cfg, DTYPES[dtype], batch, n)
                for name in ("dense", "hata"):
                    result = {"dtype": dtype, "batch": batch, "context": n,
                              **profile_method(cfg, case, name, args.steps)}  # fmt: skip
                    results.append(result)
                    print(f"\n{dtype} B={batch} N={n} {name}: wall {result['wall_ms']:.3f} ms/step, GPU kernels "
                          f"{result['gpu_ms_all_kernels']:.3f} ms/step (eviction included)")  # fmt: skip
                    for k in result["kernels"]:
                        print(f"  {k['gpu_us_per_step']:9.1f} us  x{k['calls_per_step']:.0f}  {k['kernel']}")
                del case
                print(f"({time.perf_counter() - t:.1f} s)")
    if args.json:
        gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
        write_json(args.json, {"gpu": gpu, "results": results})


if __name__ == "__main__":
    main()
