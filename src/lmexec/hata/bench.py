"""``lmexec hata bench``: per-layer decode latency of dense SDPA and the selection methods, next to this
machine's memory bandwidth and each method's bytes-bound time, measured in the same run.

One decode step of one layer, as the model runs it, on a synthetic cache (random K/V, ``N`` cached
tokens, batch ``B``, ``H_q``/``H_kv`` heads, head_dim ``d``):

* ``dense``: append the new K/V row in place, then ``torch.nn.functional.scaled_dot_product_attention``
  with the group's ``G`` query heads as ``G`` query rows of their KV head (no K/V copies) over all rows;
* ``hata``: append, encode the new key (codes beside the cache) and the query heads, then
  ``method.attend``: Hamming score + top-k and gather attention over the selected rows, fused into one
  kernel on CPU (:mod:`lmexec.hata.kernels`);
* ``quest`` (pages of 16, min/max updated on append), ``loki`` (rank ``d/4``, basis fitted on the
  first 8192 cached keys of batch row 0): their own torch scoring, ``torch.topk`` through the shared
  selection code, then the gather-attention kernel HATA's fused kernel uses.

Each step is timed alone (``perf_counter``), warm-up steps first, and the median is reported; after a
step the cache is cut back to ``N`` so every step sees the same context. The methods' steps are
interleaved (one step of each per round), so a drift of the machine's speed moves them alike. The memory bandwidth is a
streaming ``torch.sum`` over a 1 GiB tensor with all threads, measured before and after the rows; the
larger value bounds every method: ``bound = bytes / bandwidth``, with bytes = what a step must read:

* dense: all K and V rows (the ``N`` cached and the one appended by the step: ``N + 1``, as every
  method's per-token bytes);
* hata: key codes (``bits/8`` B per token and KV head, in whole 8-byte words) + the ``k`` selected K/V rows + ``W``;
* quest: page min/max (``2 d`` elements per page) + the selected rows;
* loki: the rank-``r`` projected keys (``r`` elements per token) + the selected rows + the basis.

The selected rows of hata and loki lie scattered over the cache, and a CPU reads scattered rows well
below its streaming rate however they are read. So the same run also measures the random-row read rate
(:mod:`lmexec.hata.row_reads`, rows of the cache's row size) and reports a second, *access* bound: the
streamed bytes at the streaming bandwidth plus the gathered rows at the random-row rate (never faster
than streaming). Quest's whole pages are contiguous and count as streamed, dense reads everything in order.
The access bound is a model: it assumes the streamed and the gathered reads do not overlap. It is measured
on CPU only; on CUDA the access bound is the bytes bound.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from lmexec.errors import UserError, check_distinct
from lmexec.hata import kernels
from lmexec.hata.budget import Budget
from lmexec.hata.cache import GrowableBuffer, LayerCache
from lmexec.hata.codes import check_bits, code_bytes
from lmexec.hata.selection import Hata, Loki, Quest, fit_basis
from lmexec.hata.selection.base import SelectionMethod
from lmexec.reporting import save_figure

METHODS = ("dense", "hata", "quest", "loki")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYER = 5  # any sparse layer index; the methods keep per-layer state under it
EVICT_MB = {"cpu": 64, "cuda": 512}
"""Default MiB read between steps: several times the last-level cache (this machine's L3; 50-60 MB of L2
on an H100/H200)."""


MAX_PROBE_GIB = 16
"""Most memory a probe (the random-row buffer, the eviction read) may take: many times any last-level cache."""


@dataclass
class BenchConfig:
    contexts: tuple[int, ...] = (8192, 32768, 131072)
    batches: tuple[int, ...] = (1, 8)
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    bits: int = 128
    budget: float = 2048
    sink: int = 0
    recent: int = 1
    dtypes: tuple[str, ...] = ("float32",)
    methods: tuple[str, ...] = METHODS
    repeats: int = 20
    warmup: int = 3
    threads: int = 0
    """Threads for torch and numba (0: all cores)."""
    max_cache_gib: float = 12.0
    """Rows whose K+V would exceed this are skipped (reported as skipped)."""
    seed: int = 0
    kernels: str = "auto"
    evict_mb: int | None = None
    """Before every step (untimed) read this many MiB elsewhere, so each step starts with cold caches,
    as a layer's step does in a model whose other layers ran since (0: leave the caches warm; None:
    ``EVICT_MB`` of the device, several times its last-level cache)."""
    device: str = "cpu"
    """``cpu`` or ``cuda``: where the cache lives and the kernels run (numba on CPU, Triton on CUDA)."""
    cuda_graph: bool = False
    """On CUDA, time replays of a CUDA graph of each method's step (captured after the warm-up) instead of
    the step itself: the GPU's time without the host's per-launch work, as a serving engine runs decode."""
    huge_pages: bool = True
    """Back the K/V buffers with 2 MiB pages (``madvise``) as a serving engine would; every method,
    dense included, reads the same buffers."""
    row_probe_gib: float = 1.0
    """Size of the buffer the random-row probe reads from (CPU): several times the last-level cache, so
    the rows come from memory as a long cache's do."""

    def validate(self) -> None:
        check_bits(self.bits)
        Budget(self.budget, self.sink, self.recent)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise UserError(f"unknown methods {unknown}: use some of {', '.join(METHODS)}")
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad or not self.dtypes:
            raise UserError(f"unknown dtypes {bad}: use some of {', '.join(DTYPES)}")
        if self.kv_heads < 1 or self.heads < 1 or self.heads % self.kv_heads:
            raise UserError(
                f"--heads {self.heads} must be a positive multiple of --kv-heads {self.kv_heads} (>= 1)"
            )
        for flag, values in (("methods", self.methods), ("dtype", self.dtypes), ("contexts", self.contexts),
                             ("batch", self.batches)):  # fmt: skip
            check_distinct(f"--{flag}", values)
        for name, flag in (("contexts", "contexts"), ("batches", "batch")):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise UserError(f"--{flag} must be positive whole numbers, got {values}")
        if not self.max_cache_gib > 0:
            raise UserError(f"--max-cache-gib must be > 0, got {self.max_cache_gib}")
        for flag, value, least in (("head-dim", self.head_dim, 1), ("repeats", self.repeats, 1),
                                   ("warmup", self.warmup, 0), ("evict-mb", self.evict_mb or 0, 0),
                                   ("threads", self.threads, 0), ("row-probe-gib", self.row_probe_gib, 1e-3)):  # fmt: skip
            if not value >= least:
                raise UserError(f"--{flag} must be >= {least}, got {value}")
        for flag, value, most in (("row-probe-gib", self.row_probe_gib, MAX_PROBE_GIB),
                                  ("evict-mb", self.evict_mb or 0, MAX_PROBE_GIB * 1024)):  # fmt: skip
            if not value <= most:  # inf, nan, or more than the probe needs: would fail after minutes
                raise UserError(f"--{flag} must be at most {most:g}, got {value}")
        if self.kernels not in kernels.BACKENDS:
            raise UserError(f"--kernels must be one of {', '.join(kernels.BACKENDS)}")
        if self.device not in EVICT_MB:
            raise UserError(f"--device must be one of {', '.join(EVICT_MB)}, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA GPU on this machine")
        if self.cuda_graph and self.device != "cuda":
            raise UserError("--cuda-graph needs --device cuda")

    @property
    def evict(self) -> int:
        """MiB read before each step (``evict_mb``, or the device's default)."""
        return EVICT_MB[self.device] if self.evict_mb is None else self.evict_mb


@dataclass
class Row:
    dtype: str
    batch: int
    context: int
    method: str
    budget_tokens: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    bytes: int
    bound_ms: float
    samples: list[float] = field(default_factory=list)
    cpu_ms: float = 0.0
    """Median process CPU time of a step (all threads)."""
    timing: str = "eager"
    """``eager`` (the step as the library runs it) or ``cuda-graph`` (replays of its captured graph); a
    method that cannot be captured is timed eagerly and says why."""
    speedup_vs_dense: float | None = None
    speedup_vs_dense_bound: float | None = None
    gathered_bytes: int = 0
    """The part of ``bytes`` that is scattered rows (read at the random-row rate in the access bound)."""
    access_bound_ms: float = 0.0
    """Streamed bytes / bandwidth + gathered bytes / random-row rate."""

    @property
    def of_bound(self) -> float:
        """Measured time over the bytes-bound time (1 = at the physical limit)."""
        return self.median_ms / self.bound_ms

    @property
    def of_access_bound(self) -> float:
        """Measured time over the access bound (1 = as fast as this machine streams and gathers)."""
        return self.median_ms / self.access_bound_ms


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU), so a wall-clock interval covers it."""
    if device == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(gib: float = 1.0, repeats: int = 7, device: str = "cpu") -> float:
    """Streaming-read bandwidth in bytes/s: best of ``repeats`` ``torch.sum`` over a ``gib`` GiB tensor."""
    x = torch.ones(int(gib * 2**30) // 4, device=device)
    x.sum()
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def method_bytes(method: str, cfg: BenchConfig, batch: int, n: int, k: int, element: int) -> int:
    """Bytes one decode step of one layer must read (see the module docstring)."""
    rows = batch * cfg.kv_heads
    d = cfg.head_dim
    selected = selected_row_bytes(cfg, batch, k, element)
    if method == "dense":
        return rows * n * 2 * d * element
    if method == "hata":
        return rows * n * code_bytes(cfg.bits) + selected + cfg.kv_heads * d * cfg.bits * 4
    if method == "quest":
        return rows * math.ceil(n / 16) * 2 * d * element + selected
    if method == "loki":
        rank = max(1, d // 4)
        return rows * n * rank * element + selected + cfg.kv_heads * d * rank * 4
    raise UserError(f"unknown method {method!r}")


def selected_row_bytes(cfg: BenchConfig, batch: int, k: int, element: int) -> int:
    """Bytes of the ``k`` selected K and V rows of every (batch, KV head)."""
    return batch * cfg.kv_heads * k * 2 * cfg.head_dim * element


def gathered_bytes(method: str, cfg: BenchConfig, batch: int, k: int, element: int) -> int:
    """The bytes of :func:`method_bytes` that are scattered rows: hata's and loki's selected K/V rows."""
    return selected_row_bytes(cfg, batch, k, element) if method in ("hata", "loki") else 0


def row_bandwidths(cfg: BenchConfig) -> dict[str, float] | None:
    """Random-row read rate (bytes/s) per dtype of the run, for rows of that dtype's K/V row size, read
    from memory (the device's default eviction when ``--evict-mb 0``). None on CUDA: not measured there,
    so a GPU row's access bound is its bytes bound."""
    if cfg.device != "cpu":
        return None
    from lmexec.hata.row_reads import measure_row_bandwidths

    sizes = {name: cfg.head_dim * (torch.finfo(DTYPES[name]).bits // 8) for name in cfg.dtypes}
    rates = measure_row_bandwidths(
        list(sizes.values()),
        lambda: _evict(cfg.evict or EVICT_MB[cfg.device], cfg.device),
        gib=cfg.row_probe_gib,
        huge_pages=cfg.huge_pages,
    )
    return {name: rates[size] for name, size in sizes.items()}


class _Case:
    """One (dtype, batch, context) cache shared by every method (each keeps its own features)."""

    def __init__(self, cfg: BenchConfig, dtype: torch.dtype, batch: int, n: int) -> None:
        device = cfg.device
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        h, d = cfg.kv_heads, cfg.head_dim
        self.n = n
        self.keys = GrowableBuffer(batch, h, d, dtype, device, capacity=n + 16, huge_pages=cfg.huge_pages)
        self.values = GrowableBuffer(batch, h, d, dtype, device, capacity=n + 16, huge_pages=cfg.huge_pages)
        for buffer, shift in ((self.keys, 0.3), (self.values, 0.0)):
            chunk = 8192
            for start in range(0, n, chunk):  # fill in slices: no full-size float32 temporary
                stop = min(n, start + chunk)
                part = torch.randn(batch, h, stop - start, d, generator=gen, device=device) + shift
                buffer.data[:, :, start:stop] = part.to(dtype)
            buffer.length = n
        self.query = torch.randn(batch, cfg.heads, d, generator=gen, device=device).to(dtype)
        self.new_k = torch.randn(batch, h, 1, d, generator=gen, device=device).to(dtype)
        self.new_v = torch.randn(batch, h, 1, d, generator=gen, device=device).to(dtype)

    def cache(self) -> LayerCache:
        return LayerCache(self.keys, self.values)


def _method(name: str, cfg: BenchConfig, case: _Case) -> SelectionMethod | None:
    if name == "dense":
        return None
    if name == "hata":
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # random W: the speed of learned W is the same
        return Hata(weights=torch.randn(cfg.kv_heads, cfg.head_dim, cfg.bits, generator=gen).to(cfg.device))
    if name == "quest":
        return Quest(page=16)
    basis = fit_basis(case.keys.data[:1, :, : min(case.n, 8192)])
    return Loki(rank=max(1, cfg.head_dim // 4), bases={LAYER: basis})


_EVICT = torch.empty(0)


def _evict(mib: int, device: str = "cpu") -> None:
    """Read ``mib`` MiB (more than the last-level cache) so the next step finds its data in DRAM. A read,
    not a write: written lines would be dirty, and the timed step would pay for writing them back."""
    global _EVICT
    if mib <= 0:
        return
    if _EVICT.numel() != mib * 2**18 or _EVICT.device.type != device:
        _EVICT = torch.ones(mib * 2**18, device=device)
    _EVICT.sum()
    sync(device)


class _Stepper:
    """One method's decode step on a case: its own view of the shared K/V (its features kept beside),
    and the reset that cuts the cache back to ``N`` and evicts the caches before the next step."""

    def __init__(self, cfg: BenchConfig, case: _Case, name: str, budget: Budget) -> None:
        self.cfg, self.case, self.name = cfg, case, name
        self.cache = cache = case.cache()
        method = _method(name, cfg, case)
        if method is not None:
            method.prepare(cache, LAYER)
        self.lengths = {key: b.length for key, b in cache.extras.items()}
        q, scale = case.query, 1.0 / math.sqrt(cfg.head_dim)
        b, h, d = q.shape[0], cfg.kv_heads, cfg.head_dim
        grouped = q.reshape(b, h, cfg.heads // h, d)

        if method is None:

            def step() -> None:
                cache.append(case.new_k, case.new_v)
                torch.nn.functional.scaled_dot_product_attention(
                    grouped, cache.keys, cache.values, scale=scale
                )

        else:

            def step() -> None:
                start = cache.append(case.new_k, case.new_v)
                method.on_append(cache, LAYER, start)
                method.attend(q, cache, LAYER, budget, scale)

        self.step = step

    def capture(self) -> str:
        """Make :attr:`step` the replay of a CUDA graph of the step (see ``BenchConfig.cuda_graph``).
        Every timed step is the same step (the cache is cut back after each), so replaying its kernels
        with the arguments captured once does the same work. Returns the timing mode."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch's capture notes advise
            for _ in range(2):
                self.step()
                self.reset()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph):
                self.step()
        except Exception as error:  # noqa: BLE001  a step that waits for the host cannot be captured
            cause = error.__context__ or error  # capture_end's own error hides the step's
            return f"eager (capture failed: {type(cause).__name__}: {str(cause)[:160]})"
        finally:
            torch.cuda.set_stream(stream)  # a failed capture can leave its side stream current
            self.reset()
        self.graph = graph
        self.step = graph.replay
        return "cuda-graph"

    def reset(self) -> None:
        self.case.keys.length = self.case.values.length = self.case.n
        for key, length in self.lengths.items():
            self.cache.extras[key].length = length
        _evict(self.cfg.evict, self.cfg.device)

    def timed(self) -> tuple[float, float]:
        """Wall-clock and process CPU milliseconds of one step (CPU time sums all threads, so
        ``cpu / threads`` is what the step would take on otherwise idle cores)."""
        c = time.process_time()
        t = time.perf_counter()
        self.step()
        sync(self.cfg.device)
        wall = (time.perf_counter() - t) * 1e3
        cpu = (time.process_time() - c) * 1e3
        self.reset()
        return wall, cpu


def run_methods(
    cfg: BenchConfig, case: _Case, names: tuple[str, ...], budget: Budget
) -> dict[str, tuple[list[float], list[float], str]]:
    """Timed decode steps of every method on ``case``, interleaved: each round times one step of each
    method (in alternating order), so a drift of the machine's speed during the case (this VM's streaming
    bandwidth drifts by up to 1.4x within minutes) moves every method alike and their ratios hold.
    Returns per method the wall and CPU milliseconds of each timed step and the timing mode."""
    steppers: list[_Stepper] = []
    try:
        for name in names:
            steppers.append(_Stepper(cfg, case, name, budget))
        for stepper in steppers:
            stepper.reset()
        for _ in range(cfg.warmup):
            for stepper in steppers:
                stepper.step()
                stepper.reset()
        timing = {s.name: s.capture() if cfg.cuda_graph else "eager" for s in steppers}
        times: dict[str, tuple[list[float], list[float], str]] = {
            name: ([], [], timing[name]) for name in names
        }
        for round_ in range(cfg.repeats):
            for stepper in steppers if round_ % 2 == 0 else steppers[::-1]:
                wall, cpu = stepper.timed()
                times[stepper.name][0].append(wall)
                times[stepper.name][1].append(cpu)
        return times
    finally:
        for stepper in steppers:
            stepper.cache.extras.clear()
        case.keys.length = case.values.length = case.n


def machine(device: str = "cpu") -> dict[str, object]:
    info: dict[str, object] = {"cores": os.cpu_count(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        if kernels.triton_available():
            import triton

            info["triton"] = triton.__version__
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, object]:
    cfg.validate()
    import numba

    threads = cfg.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    note = progress or (lambda _msg: None)
    load_start = load_average()
    bandwidth = [measure_bandwidth(device=cfg.device)]
    row_rates = [row_bandwidths(cfg)]
    rows: list[Row] = []
    skipped = []
    with kernels.use_backend(cfg.kernels):
        for dtype_name in cfg.dtypes:
            dtype = DTYPES[dtype_name]
            element = torch.finfo(dtype).bits // 8
            for batch in cfg.batches:
                for n in cfg.contexts:
                    gib = batch * cfg.kv_heads * n * 2 * cfg.head_dim * element / 2**30
                    if gib > cfg.max_cache_gib:
                        skipped.append({"dtype": dtype_name, "batch": batch, "context": n, "cache_gib": gib})
                        note(f"skip {dtype_name} B={batch} N={n}: K+V {gib:.1f} GiB > --max-cache-gib")
                        continue
                    note(f"{dtype_name} B={batch} N={n}: filling {gib:.2f} GiB of K/V")
                    case = _Case(cfg, dtype, batch, n)
                    budget = Budget(cfg.budget, cfg.sink, cfg.recent)
                    k = budget.tokens(n + 1)
                    note(f"{dtype_name} B={batch} N={n}: {', '.join(cfg.methods)}, interleaved")
                    times = run_methods(cfg, case, cfg.methods, budget)
                    for name in cfg.methods:
                        samples, cpu, timing = times[name]
                        # the step attends over the N cached keys and the one it appends
                        nbytes = method_bytes(
                            name, cfg, batch, n + 1, n + 1 if name == "dense" else k, element
                        )
                        qs = (
                            statistics.quantiles(samples, n=10, method="inclusive")
                            if len(samples) > 1
                            else samples * 9
                        )
                        rows.append(
                            Row(
                                dtype_name,
                                batch,
                                n,
                                name,
                                n + 1 if name == "dense" else k,
                                statistics.median(samples),
                                qs[0],
                                qs[-1],
                                nbytes,
                                0.0,
                                samples,
                                statistics.median(cpu),
                                timing=timing,
                                gathered_bytes=gathered_bytes(name, cfg, batch, k, element),
                            )
                        )
                    del case
    bandwidth.append(measure_bandwidth(device=cfg.device))
    row_rates.append(row_bandwidths(cfg))
    best = max(bandwidth)
    # never faster than streaming; where not measured (CUDA), the access bound is the bytes bound
    best_rows = {
        name: min(best, max(r[name] for r in row_rates)) if row_rates[0] else best for name in cfg.dtypes
    }
    for row in rows:
        row.bound_ms = row.bytes / best * 1e3
        streamed = row.bytes - row.gathered_bytes
        row.access_bound_ms = (streamed / best + row.gathered_bytes / best_rows[row.dtype]) * 1e3
    for row in rows:
        dense = next(
            (
                r
                for r in rows
                if r.method == "dense"
                and (r.dtype, r.batch, r.context) == (row.dtype, row.batch, row.context)
            ),
            None,
        )
        if dense is not None:
            row.speedup_vs_dense = dense.median_ms / row.median_ms
            row.speedup_vs_dense_bound = dense.bound_ms / row.median_ms
    return {
        "config": asdict(cfg),
        "machine": {
            **machine(cfg.device),
            "threads": threads,
            "load_average_start": load_start,
            "load_average_end": load_average(),
        },
        "huge_pages": cfg.huge_pages,
        "bandwidth_gbs": [b / 1e9 for b in bandwidth],
        "bandwidth_used_gbs": best / 1e9,
        "row_bandwidth_gbs": (
            {name: [r[name] / 1e9 for r in row_rates] for name in cfg.dtypes} if row_rates[0] else None
        ),
        "row_bandwidth_used_gbs": {name: rate / 1e9 for name, rate in best_rows.items()},
        "evict_mb_used": cfg.evict,
        "rows": [{**asdict(r), "of_bound": r.of_bound, "of_access_bound": r.of_access_bound} for r in rows],
        "skipped": skipped,
        "checks": targets(rows),
    }


def targets(rows: list[Row]) -> list[dict[str, object]]:
    """The issue's targets on every (dtype, batch, context) that has hata and dense rows."""
    checks = []
    for hata in (r for r in rows if r.method == "hata"):
        same = {
            r.method: r
            for r in rows
            if (r.dtype, r.batch, r.context) == (hata.dtype, hata.batch, hata.context)
        }
        check: dict[str, object] = {"dtype": hata.dtype, "batch": hata.batch, "context": hata.context}
        check["timing"] = {method: r.timing for method, r in same.items()}  # compare like with like
        if "dense" in same:
            check["vs_dense"] = hata.speedup_vs_dense
            check["vs_dense_bound"] = hata.speedup_vs_dense_bound
        check["of_own_bound"] = hata.of_bound
        check["of_own_access_bound"] = hata.of_access_bound
        for other in ("quest", "loki"):
            if other in same:
                check[f"vs_{other}"] = same[other].median_ms / hata.median_ms
                # > 1: HATA as measured beats any implementation of the other method on this machine
                check[f"vs_{other}_bound"] = same[other].bound_ms / hata.median_ms
        checks.append(check)
    return checks


def plot(result: dict[str, object], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    assert isinstance(rows, list)
    if not rows:
        raise UserError("no case ran (every one was over --max-cache-gib): nothing to plot")
    panels = sorted({(r["dtype"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (dtype, batch) in zip(axes[0], panels, strict=True):
        for method in METHODS:
            mine = sorted(
                (r for r in rows if (r["dtype"], r["batch"], r["method"]) == (dtype, batch, method)),
                key=lambda r: r["context"],
            )
            if not mine:
                continue
            xs = [r["context"] for r in mine]
            line = ax.plot(xs, [r["median_ms"] for r in mine], marker="o", label=method)[0]
            ax.plot(xs, [r["bound_ms"] for r in mine], linestyle=":", color=line.get_color())
            if any(r.get("gathered_bytes") for r in mine):  # rows read at the random-row rate
                ax.plot(xs, [r["access_bound_ms"] for r in mine], linestyle="--", color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("per-layer decode step (ms)")
        ax.set_title(f"{dtype}, batch {batch}\ndotted: bytes / bandwidth; dashed: access bound", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return str(save_figure(fig, path))
