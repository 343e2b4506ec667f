"""Start one process per device and make failures loud and bounded.

Two ways in, one worker body:

* :func:`launch` (one machine): ``torch.multiprocessing`` spawns ``world`` processes; the parent
  watches them. When a rank raises or dies (killed, segfault), the parent terminates every other rank
  within ``grace`` seconds (SIGTERM, then SIGKILL) and raises :class:`RankFailure` naming the rank.
  When nothing finishes within ``timeout`` seconds, all ranks are stopped the same way.
* :func:`torchrun_env` / :func:`run_in_this_process` (several machines, ``torchrun``): each process
  reads ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``; torchrun's agent stops the other
  workers when one fails, and the process-group timeout bounds any remaining wait.

Backend: gloo on CPU, NCCL when CUDA is available (one GPU per local rank).
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Worker = Callable[..., Any]  # worker(ctx: RankContext, *args) -> picklable result


@dataclass(frozen=True)
class RankContext:
    """What a worker knows about its place in the job."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str


class RankFailure(RuntimeError):
    """A rank failed (raised, was killed, or the job timed out); ``rank`` is the first to fail."""

    def __init__(self, message: str, rank: int | None, pids: list[int]) -> None:
        super().__init__(message)
        self.rank = rank
        self.pids = pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device_and_backend(local_rank: int) -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count()), "nccl"
    return torch.device("cpu"), "gloo"


def _init(rank: int, world: int, local_rank: int, pg_timeout: float, threads: int | None) -> RankContext:
    if threads is not None:
        torch.set_num_threads(threads)
    device, backend = _device_and_backend(local_rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout))
    return RankContext(rank, world, local_rank, device, backend)


def _spawned(index: int, world: int, port: int, out_dir: str, pg_timeout: float, threads: int | None,
             worker: Worker, args: tuple) -> None:  # fmt: skip
    """Body of each spawned process: init, run, write the result, destroy the process group, then leave
    without the interpreter's finalisation (``os._exit``)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = _init(index, world, index, pg_timeout, threads)
    try:
        result = worker(ctx, *args)
        with open(Path(out_dir) / f"rank{index}.pkl", "wb") as fh:
            pickle.dump(result, fh)
        dist.barrier()  # no rank tears down while another still finishes a collective (gloo aborted then)
    finally:
        # also on an exception: a process group left alive aborts the interpreter at exit ("terminate
        # called without an active exception"), which would hide the exception behind a SIGABRT
        dist.destroy_process_group()
    # Done and the result is on disk: leave without the interpreter's finalisation. Even after
    # destroy_process_group, one run in 60 of a stress loop aborted there the same way (a rank's
    # SIGABRT with no Python frame left), and the launcher reported a finished job as failed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(worker: Worker, world: int, *args: Any, timeout: float = 600.0, grace: float = 5.0,
           pg_timeout: float = 120.0, threads: int | None = 1) -> list[Any]:  # fmt: skip
    """Run ``worker(ctx, *args)`` on ``world`` spawned ranks; return their results by rank.

    ``threads`` sets torch's intra-op threads per rank (1: one rank per core on a small machine).
    A rank that returns leaves through ``os._exit`` (see :func:`_spawned`): ``worker`` must close or
    flush whatever it writes itself (atexit handlers and unflushed buffers do not run there).
    Raises :class:`RankFailure` when a rank fails or the job exceeds ``timeout``; by then every
    process of the job has exited.
    """
    with tempfile.TemporaryDirectory(prefix="lmexec-launch-") as out_dir:
        port = free_port()
        context = mp.start_processes(
            _spawned, args=(world, port, out_dir, pg_timeout, threads, worker, args), nprocs=world,
            join=False, start_method="spawn",
        )  # fmt: skip
        pids = [p.pid for p in context.processes]
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=0.2, grace_period=grace):
                if time.monotonic() > deadline:
                    running = [r for r, p in enumerate(context.processes) if p.is_alive()]
                    _stop(context.processes, grace)
                    raise RankFailure(
                        f"timed out after {timeout:g} s; rank(s) {running} had not finished and were stopped",
                        running[0] if running else None,
                        pids,
                    )
        except mp.ProcessRaisedException as error:
            _stop(context.processes, grace)
            raise RankFailure(_raised_message(error, world), error.error_index, pids) from None
        except mp.ProcessExitedException as error:
            _stop(context.processes, grace)
            how = f"signal {error.signal_name}" if error.signal_name else f"exit code {error.exit_code}"
            others = [r for r in range(world) if r != error.error_index]
            raise RankFailure(
                f"rank {error.error_index} died ({how}, pid {error.error_pid}); stopped rank(s) {others}",
                error.error_index,
                pids,
            ) from None
        except BaseException:
            _stop(context.processes, grace)
            raise
        results = []
        for rank in range(world):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as fh:
                results.append(pickle.load(fh))
        return results


def _stop(processes: list, grace: float) -> None:
    """SIGTERM every live process, SIGKILL what is left after ``grace`` seconds, reap all."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
        p.join()


def _raised_message(error: mp.ProcessRaisedException, world: int) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else "unknown error"
    others = [r for r in range(world) if r != error.error_index]
    return f"rank {error.error_index} failed: {last}; stopped rank(s) {others}"


# ---- torchrun ---------------------------------------------------------------------------------------
def torchrun_env() -> bool:
    """True when this process was started by torchrun (or any launcher setting the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def run_in_this_process(
    worker: Worker, *args: Any, pg_timeout: float = 120.0, threads: int | None = 1
) -> tuple[int, Any]:
    """Run ``worker`` as the rank given by torchrun's environment; returns (rank, result).

    A failure is printed with the rank and re-raised, so torchrun reports it and stops the others.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ctx = _init(rank, world, int(os.environ.get("LOCAL_RANK", rank)), pg_timeout, threads)
    try:
        result = worker(ctx, *args)
        dist.barrier()  # as in _spawned: nobody tears down while another rank is mid-collective
        return rank, result
    except BaseException:
        print(f"rank {rank} failed:\n{traceback.format_exc()}", flush=True)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
