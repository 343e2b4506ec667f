"""The one module that touches torch.distributed.pipelining's private custom-schedule API.

Why one module: ``_PipelineScheduleRuntime``, ``_Action`` and the lowering helpers are private and
have changed between releases (see docs/tessel-runtime.md). Everything else in lmexec talks to this
module only, and :func:`api_problems` (run by a test and before every run) fails loudly when the
installed torch is not the pinned series or the names and signatures we use have moved.

What it does:

* :func:`stage_chain` reads a placement as a chain of single-device stages (forward f_0..f_{S-1},
  backward B or input-gradient I in reverse, optional weight-gradient W after each I);
* :func:`export_actions` turns a :class:`Schedule` into per-rank compute-only action lists
  (``0F3``, ``2I1``, ``2W1``): rank = device, order = the schedule's device order;
* :func:`validate_actions` checks them before anything runs (each stage on exactly one rank, every
  action exactly once, no cross-rank deadlock), then asks torch's own validator and send/recv
  lowering to agree;
* :class:`PipelineRun` builds ``PipelineStage`` objects and a ``_PipelineScheduleRuntime`` with
  that order, runs steps and records a per-action compute timeline.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmexec.errors import UserError
from lmexec.tessel.block import BlockKind
from lmexec.tessel.placement import Placement
from lmexec.tessel.schedule import Schedule

TORCH_SERIES = "2.13."  # the series this adapter was written and tested against

Actions = dict[int, list[str]]  # rank -> compute-only action strings, in execution order
ACTION_RE = re.compile(r"^(\d+)([FBIW])(\d+)$")


class ScheduleExportError(UserError):
    """The schedule cannot be executed by torch's pipeline runtime (a user-fixable problem)."""


# ---- API pin ------------------------------------------------------------------------------------
# name -> parameters it must accept (checked by signature), for every private symbol used below.
_EXPECTED_SIGNATURES: dict[str, tuple[str, ...]] = {
    "schedules._PipelineScheduleRuntime.__init__": ("self", "args", "kwargs"),
    "schedules._PipelineScheduleRuntime._prepare_schedule_with_comms": ("self", "actions", "format"),
    "schedules._PipelineScheduleRuntime._maybe_compute_loss": (
        "self",
        "stage",
        "output",
        "target_mbs",
        "mb_index",
        "loss_kwargs",
    ),  # fmt: skip
    "schedules.PipelineScheduleMulti.__init__": (
        "self",
        "stages",
        "n_microbatches",
        "loss_fn",
        "scale_grads",
    ),  # fmt: skip
    "schedules.PipelineScheduleMulti.step": ("self", "args", "target", "losses", "return_outputs"),
    "schedules._validate_schedule": ("actions", "pp_group_size", "num_stages", "num_microbatches"),
    "schedules._add_send_recv": ("compute_actions", "stage_to_rank", "num_stages"),
    "schedules._Action.from_str": ("action_string",),
    "stage.PipelineStage.__init__": ("self", "submodule", "stage_index", "num_stages", "device", "group"),
    "stage._PipelineStageBase.forward_one_chunk": ("self", "fwd_chunk_id", "args", "kwargs"),
    "stage._PipelineStageBase.backward_one_chunk": (
        "self",
        "bwd_chunk_id",
        "loss",
        "full_backward",
        "last_backward",
    ),  # fmt: skip
    "stage._PipelineStageBase.backward_weight_one_chunk": ("self", "bwd_chunk_id", "last_backward"),
    "_backward.stage_backward": ("stage_output", "output_grads", "input_values"),
    "_backward.stage_backward_input": ("stage_outputs_or_loss", "output_grads", "input_values", "weights"),
    "_backward.stage_backward_weight": ("weights", "param_groups"),
}
_EXPECTED_TYPES = {"F": "FORWARD", "B": "FULL_BACKWARD", "I": "BACKWARD_INPUT", "W": "BACKWARD_WEIGHT"}


def _resolve(dotted: str) -> Any:
    import torch.distributed.pipelining._backward as backward
    import torch.distributed.pipelining.schedules as schedules
    import torch.distributed.pipelining.stage as stage

    module_name, *attrs = dotted.split(".")
    obj: Any = {"schedules": schedules, "stage": stage, "_backward": backward}[module_name]
    for attr in attrs:
        obj = getattr(obj, attr)
    return obj


def api_problems() -> list[str]:
    """Everything about the installed torch that differs from what this adapter expects (empty: OK)."""
    problems: list[str] = []
    if not torch.__version__.startswith(TORCH_SERIES):
        problems.append(
            f"torch {torch.__version__} is installed but the adapter is pinned to {TORCH_SERIES}*"
        )
    try:
        import torch.distributed.pipelining.schedules as schedules
    except ImportError as error:  # pragma: no cover - depends on the torch build
        return problems + [f"cannot import torch.distributed.pipelining: {error}"]
    for dotted, params in _EXPECTED_SIGNATURES.items():
        try:
            obj = _resolve(dotted)
        except AttributeError:
            problems.append(f"torch.distributed.pipelining.{dotted} is gone")
            continue
        names = tuple(inspect.signature(obj).parameters)
        missing = [p for p in params if p not in names]
        if missing:
            problems.append(f"{dotted} lost parameter(s) {missing}; it now takes {names}")
    ctype = getattr(schedules, "_ComputationType", None)
    if ctype is None:
        problems.append("schedules._ComputationType is gone")
    else:
        for letter, member in _EXPECTED_TYPES.items():
            if getattr(ctype, member, None) is None or getattr(ctype, member).value != letter:
                problems.append(f"_ComputationType.{member} no longer has the value {letter!r}")
    try:
        parsed = schedules._Action.from_str("2I1")
        if (parsed.stage_index, parsed.computation_type.value, parsed.microbatch_index) != (2, "I", 1):
            problems.append(f"_Action.from_str('2I1') parses as {parsed!r}")
        if str(parsed) != "2I1":
            problems.append(f"_Action('2I1') prints as {str(parsed)!r}")
    except Exception as error:  # noqa: BLE001 - any failure here means the API moved
        problems.append(f"_Action.from_str('2I1') failed: {error}")
    return problems


def require_api() -> None:
    """Raise (with every difference listed) unless the pinned private API is present."""
    problems = api_problems()
    if problems:
        raise RuntimeError(
            "torch.distributed.pipelining's private schedule API is not what lmexec's adapter expects: "
            + "; ".join(problems)
            + ". Update src/lmexec/tessel/runtime/pipelining_adapter.py for this torch."
        )


# ---- placement -> stage chain ---------------------------------------------------------------------
@dataclass(frozen=True)
class StageChain:
    """A placement read as pipeline stages: stage s = (forward, backward-or-input, weight or None)."""

    forwards: tuple[str, ...]
    backwards: tuple[str, ...]  # indexed by stage
    weights: tuple[str | None, ...]
    devices: tuple[int, ...]  # rank of each stage
    num_ranks: int

    @property
    def num_stages(self) -> int:
        return len(self.forwards)

    def action(self, block: str) -> tuple[int, str]:
        """(stage, letter F/B/I/W) of a block name."""
        return self._actions[block]

    @property
    def _actions(self) -> dict[str, tuple[int, str]]:
        out: dict[str, tuple[int, str]] = {}
        for s in range(self.num_stages):
            out[self.forwards[s]] = (s, "F")
            out[self.backwards[s]] = (s, "I" if self.weights[s] else "B")
            if self.weights[s]:
                out[self.weights[s]] = (s, "W")  # type: ignore[index]
        return out

    def stages_on(self, rank: int) -> list[int]:
        return [s for s, d in enumerate(self.devices) if d == rank]


def stage_chain(placement: Placement) -> StageChain:
    """Recognise a chain of single-device stages, or say precisely why the placement is not one.

    Multi-device (tensor-parallel) blocks and branching DAGs have no representation in torch's
    runtime (a stage lives on one rank and talks to s-1 and s+1 only); see docs/tessel-runtime.md.
    """
    where = f"placement {placement.name!r}"
    multi = [b.name for b in placement.blocks if b.multi_device]
    if multi:
        raise ScheduleExportError(
            f"{where}: block(s) {', '.join(multi)} occupy several devices; torch's pipeline runtime runs "
            "one stage per rank (tensor-parallel blocks are not executable yet)"
        )
    forwards = [b for b in placement.blocks if b.kind is BlockKind.FORWARD]
    backs = {b.name: b for b in placement.blocks if b.kind in (BlockKind.BACKWARD, BlockKind.BACKWARD_INPUT)}
    weights = {b.name: b for b in placement.blocks if b.kind is BlockKind.BACKWARD_WEIGHT}
    if not forwards or not backs:
        raise ScheduleExportError(f"{where}: needs forward and backward blocks (training) to run on torch")
    by_dep: dict[tuple[str, ...], list[str]] = {}
    for b in placement.blocks:
        by_dep.setdefault(b.after, []).append(b.name)
    # forward chain: the unique forward without dependencies, then each forward's unique successor
    heads = [f for f in forwards if not f.after]
    if len(heads) != 1:
        raise ScheduleExportError(f"{where}: expected one first forward block, found {len(heads)}")
    chain_f = [heads[0]]
    fwd_names = {f.name for f in forwards}
    while True:
        nxt = [placement.block(n) for n in placement.successors[chain_f[-1].name] if n in fwd_names]
        if not nxt:
            break
        if len(nxt) > 1 or nxt[0].after != (chain_f[-1].name,):
            raise ScheduleExportError(
                f"{where}: forward blocks branch after {chain_f[-1].name!r}; not a chain"
            )
        chain_f.append(nxt[0])
    if len(chain_f) != len(forwards):
        raise ScheduleExportError(f"{where}: forward blocks do not form one chain")
    n_stages = len(chain_f)
    chain_b: list[Any] = []
    prev = chain_f[-1].name
    for s in reversed(range(n_stages)):
        cands = [backs[n] for n in placement.successors[prev] if n in backs]
        if len(cands) != 1 or cands[0].after != (prev,):
            raise ScheduleExportError(
                f"{where}: expected exactly one backward block of stage {s} right after {prev!r}"
            )
        if cands[0].devices != chain_f[s].devices:
            raise ScheduleExportError(
                f"{where}: backward {cands[0].name!r} runs on device {cands[0].devices[0]} but forward "
                f"{chain_f[s].name!r} of the same stage on device {chain_f[s].devices[0]}"
            )
        chain_b.append(cands[0])
        prev = cands[0].name
    chain_b.reverse()
    if len(chain_b) != len(backs):
        raise ScheduleExportError(f"{where}: backward blocks do not mirror the forward chain one to one")
    chain_w: list[str | None] = []
    used: set[str] = set()
    for b in chain_b:
        ws = [weights[n] for n in placement.successors[b.name] if n in weights]
        if b.kind is BlockKind.BACKWARD_INPUT:
            if len(ws) != 1 or ws[0].after != (b.name,) or ws[0].devices != b.devices:
                raise ScheduleExportError(
                    f"{where}: input-gradient block {b.name!r} needs exactly one weight-gradient block right "
                    "after it on the same device"
                )
            chain_w.append(ws[0].name)
            used.add(ws[0].name)
        elif ws:
            raise ScheduleExportError(f"{where}: weight-gradient block after a full backward {b.name!r}")
        else:
            chain_w.append(None)
    if used != set(weights):
        raise ScheduleExportError(
            f"{where}: weight-gradient block(s) {sorted(set(weights) - used)} belong to no stage"
        )
    devices = tuple(f.devices[0] for f in chain_f)
    idle = [d for d in range(placement.num_devices) if d not in devices]
    if idle:
        raise ScheduleExportError(
            f"{where}: device(s) {idle} hold no stage; torch needs one stage per rank at least"
        )
    return StageChain(
        tuple(f.name for f in chain_f),
        tuple(b.name for b in chain_b),
        tuple(chain_w),
        devices,
        placement.num_devices,
    )


# ---- export and validation ------------------------------------------------------------------------
def export_actions(schedule: Schedule) -> Actions:
    """Per-rank compute-only action lists in the schedule's device order (rank = device)."""
    chain = stage_chain(schedule.placement)
    out: Actions = {}
    for device, order in enumerate(schedule.device_orders()):
        out[device] = [f"{chain.action(block)[0]}{chain.action(block)[1]}{mb}" for block, mb in order]
    return out


def parse_actions(actions: Actions) -> dict[int, list[tuple[int, str, int]]]:
    parsed: dict[int, list[tuple[int, str, int]]] = {}
    for rank, items in actions.items():
        parsed[rank] = []
        for position, text in enumerate(items):
            match = ACTION_RE.match(text.strip())
            if not match:
                raise ScheduleExportError(
                    f"rank {rank}, position {position}: {text!r} is not a compute action like 0F3, 2I1, 2W1"
                )
            parsed[rank].append((int(match[1]), match[2], int(match[3])))
    return parsed


def validate_actions(
    actions: Actions, num_stages: int, num_micro_batches: int, *, with_torch: bool = True
) -> dict[int, int]:
    """Check per-rank action lists before running; return the stage -> rank map.

    Rules: ranks are 0..R-1; each stage on exactly one rank; for every (stage, micro-batch) one F
    and either one B or one I and one W; and the orders make progress when each rank runs its list
    in order and an action waits for its data (F of s after F of s-1; B/I of s after F of s and B/I
    of s+1; W after I): a deadlock names every rank's blocked action and what it waits for.
    """
    parsed = parse_actions(actions)
    ranks = sorted(parsed)
    if ranks != list(range(len(ranks))):
        raise ScheduleExportError(f"ranks must be 0..{len(ranks) - 1}, got {ranks}")
    owner: dict[int, int] = {}
    for rank in ranks:
        for stage, _, _ in parsed[rank]:
            if not 0 <= stage < num_stages:
                raise ScheduleExportError(
                    f"rank {rank} runs unknown stage {stage} (stages are 0..{num_stages - 1})"
                )
            if owner.setdefault(stage, rank) != rank:
                raise ScheduleExportError(
                    f"stage {stage} is assigned to both rank {owner[stage]} and rank {rank}"
                )
    missing_stages = [s for s in range(num_stages) if s not in owner]
    if missing_stages:
        raise ScheduleExportError(f"stage(s) {missing_stages} run on no rank")
    seen: dict[tuple[int, str, int], int] = {}
    for rank in ranks:
        for action in parsed[rank]:
            if not 0 <= action[2] < num_micro_batches:
                raise ScheduleExportError(
                    f"rank {rank}: {_fmt(action)} names micro-batch {action[2]} of {num_micro_batches}"
                )
            if action in seen:
                raise ScheduleExportError(f"rank {rank}: {_fmt(action)} appears twice")
            seen[action] = rank
    for s in range(num_stages):
        for m in range(num_micro_batches):
            has = {k for k in "FBIW" if (s, k, m) in seen}
            if has not in ({"F", "B"}, {"F", "I", "W"}):
                raise ScheduleExportError(
                    f"stage {s}, micro-batch {m}: has {''.join(sorted(has)) or 'nothing'}; needs F and B, or F, I and W"
                )
    _check_progress(parsed, num_stages, seen)
    if with_torch:
        _torch_agrees(parsed, len(ranks), num_stages, num_micro_batches)
    return owner


def _fmt(action: tuple[int, str, int]) -> str:
    return f"{action[0]}{action[1]}{action[2]}"


def _needs(action: tuple[int, str, int], num_stages: int, seen: dict) -> list[tuple[int, str, int]]:
    s, k, m = action
    if k == "F":
        return [(s - 1, "F", m)] if s > 0 else []
    if k in ("B", "I"):
        out = [(s, "F", m)]
        if s < num_stages - 1:
            out.append((s + 1, "B", m) if (s + 1, "B", m) in seen else (s + 1, "I", m))
        return out
    return [(s, "I", m)]


def _check_progress(parsed: dict[int, list[tuple[int, str, int]]], num_stages: int, seen: dict) -> None:
    """Run the orders on a dependency-only machine; raise naming the blocked ranks on a deadlock."""
    position = dict.fromkeys(parsed, 0)
    done: set[tuple[int, str, int]] = set()
    remaining = sum(len(v) for v in parsed.values())
    while remaining:
        progressed = False
        for rank, items in parsed.items():
            while position[rank] < len(items):
                action = items[position[rank]]
                if any(need not in done for need in _needs(action, num_stages, seen)):
                    break
                done.add(action)
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            blocked = []
            for rank, items in parsed.items():
                if position[rank] < len(items):
                    action = items[position[rank]]
                    waits = [
                        _fmt(n) + f" (rank {seen[n]})"
                        for n in _needs(action, num_stages, seen)
                        if n not in done
                    ]
                    blocked.append(
                        f"rank {rank} at {_fmt(action)} (step {position[rank]}) waits for {', '.join(waits)}"
                    )
            raise ScheduleExportError("exported order deadlocks: " + "; ".join(blocked))


def _torch_agrees(parsed: dict[int, list[tuple[int, str, int]]], ranks: int, num_stages: int, n: int) -> None:
    """torch's own validator and send/recv lowering must accept the order too (belt and braces)."""
    from torch.distributed.pipelining.schedules import _Action, _add_send_recv, _validate_schedule

    order = {r: [_Action.from_str(_fmt(a)) for a in parsed[r]] for r in range(ranks)}
    try:
        stage_to_rank = _validate_schedule(order, ranks, num_stages, n)
        _add_send_recv(order, stage_to_rank=lambda s: stage_to_rank[s], num_stages=num_stages)
    except (AssertionError, RuntimeError, ValueError) as error:
        raise ScheduleExportError(f"torch's pipeline runtime rejects the exported order: {error}") from None


def actions_csv(actions: Actions) -> str:
    """The compute-only CSV torch's ``_load_csv`` reads (one line per rank)."""
    return "".join(",".join(actions[r]) + "\n" for r in sorted(actions))


# ---- the runtime's backward, for the profiler ----------------------------------------------------
def backward_functions(
    module: nn.Module,
    output: torch.Tensor,
    output_grad: torch.Tensor | None,
    inputs: torch.Tensor,
    first: bool,
) -> tuple[Callable[[], None], Callable[[], None], Callable[[], None]]:
    """(full, input-gradient, weight-gradient) closures computing exactly what the runtime runs for
    B, I and W of one stage, so profiled times predict executed times. ``output`` is the loss on the
    last stage (``output_grad`` None). Call either ``full`` or ``input`` then ``weight``.

    As in torch's stage: the first stage has no input gradient, so its I does nothing and its W is
    the whole backward; other stages split with ``stage_backward_input`` / ``stage_backward_weight``.
    """
    from torch.distributed.pipelining._backward import (
        stage_backward,
        stage_backward_input,
        stage_backward_weight,
    )

    grads = None if output_grad is None else [output_grad]
    # as the runtime passes them: the loss as a bare tensor, other outputs as a tuple with their grads
    whole = (output, None) if output_grad is None else ((output,), (output_grad,))
    state: dict[str, Any] = {}

    def full() -> None:
        stage_backward(whole[0], whole[1], [inputs])

    def input_part() -> None:
        if not first:
            state["groups"] = stage_backward_input([output], grads, [inputs], module.parameters())[1]

    def weight_part() -> None:
        if first:
            stage_backward(whole[0], whole[1], [inputs])
        else:
            stage_backward_weight(module.parameters(), state.pop("groups"))

    return full, input_part, weight_part


# ---- execution ---------------------------------------------------------------------------------------
@dataclass
class Event:
    """One measured compute action on this rank (seconds since the step's common start)."""

    stage: int
    kind: str  # F, B, I, W
    micro_batch: int
    start: float
    end: float


@dataclass
class PipelineRun:
    """torch's ``_PipelineScheduleRuntime`` driving this rank's stages in the exported order.

    ``modules`` maps the stage indices this rank owns to their modules. ``loss_fn(output, target)``
    is applied per micro-batch on the last stage; ``scale_grads=True`` divides gradients by the
    micro-batch count, which matches a mean-reduced loss.
    """

    modules: dict[int, nn.Module]
    num_stages: int
    num_micro_batches: int
    actions: Actions
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    rank: int
    group: Any = None
    events: list[Event] = field(default_factory=list)
    _t0: float = 0.0

    def __post_init__(self) -> None:
        require_api()
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import _Action, _PipelineScheduleRuntime

        owner = validate_actions(self.actions, self.num_stages, self.num_micro_batches, with_torch=False)
        mine = sorted(s for s, r in owner.items() if r == self.rank)
        if mine != sorted(self.modules):
            raise ScheduleExportError(
                f"rank {self.rank} owns stages {mine} but was given modules for {sorted(self.modules)}"
            )
        self.stages = [
            PipelineStage(self.modules[s].to(self.device), s, self.num_stages, self.device, group=self.group)
            for s in mine
        ]
        self.schedule = _PipelineScheduleRuntime(
            self.stages, self.num_micro_batches, loss_fn=self.loss_fn, scale_grads=True
        )
        order = {r: [_Action.from_str(a) for a in items] for r, items in self.actions.items()}
        self.schedule.pipeline_order = order
        self.schedule._prepare_schedule_with_comms(order)
        self.is_first = 0 in self.modules
        self.is_last = self.num_stages - 1 in self.modules
        self._instrument()

    def _record(self, stage: int, kind: str, mb: int, start: float) -> None:
        self.events.append(Event(stage, kind, mb, start - self._t0, time.perf_counter() - self._t0))

    def _instrument(self) -> None:
        """Wrap this rank's stage methods (instance attributes only) to time each compute action."""
        for stage in self.stages:
            s = stage.stage_index
            fwd, bwd, wgt = stage.forward_one_chunk, stage.backward_one_chunk, stage.backward_weight_one_chunk

            def forward(mb: int, *args: Any, _s: int = s, _f: Callable = fwd, **kwargs: Any) -> Any:
                start = time.perf_counter()
                out = _f(mb, *args, **kwargs)
                self._record(_s, "F", mb, start)
                return out

            def backward(mb: int, *args: Any, _s: int = s, _f: Callable = bwd, **kwargs: Any) -> Any:
                start = time.perf_counter()
                out = _f(mb, *args, **kwargs)
                full = kwargs.get("full_backward", args[1] if len(args) > 1 else True)
                self._record(_s, "B" if full else "I", mb, start)
                return out

            def weight(mb: int, *args: Any, _s: int = s, _f: Callable = wgt, **kwargs: Any) -> Any:
                start = time.perf_counter()
                out = _f(mb, *args, **kwargs)
                self._record(_s, "W", mb, start)
                return out

            stage.forward_one_chunk = forward  # type: ignore[method-assign]
            stage.backward_one_chunk = backward  # type: ignore[method-assign]
            stage.backward_weight_one_chunk = weight  # type: ignore[method-assign]
        compute_loss = self.schedule._maybe_compute_loss

        def loss_then_extend(stage: Any, *args: Any, **kwargs: Any) -> Any:
            out = compute_loss(stage, *args, **kwargs)
            if stage.is_last and self.events and self.events[-1].kind == "F":
                self.events[-1].end = time.perf_counter() - self._t0  # the loss belongs to the last forward
            return out

        self.schedule._maybe_compute_loss = loss_then_extend  # type: ignore[method-assign]

    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None, t0: float) -> list[float]:
        """One training step over the whole batch; returns the per-micro-batch losses on the last
        stage's rank (empty elsewhere). Events are timed from ``t0`` (a ``perf_counter`` value)."""
        self._t0 = t0
        self.events = []
        losses: list[torch.Tensor] = []
        args = (inputs.to(self.device),) if self.is_first and inputs is not None else ()
        target = targets.to(self.device) if self.is_last and targets is not None else None
        self.schedule.step(
            *args, target=target, losses=losses if self.is_last else None, return_outputs=False
        )
        return [float(x.detach()) for x in losses]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for s in sorted(self.modules) for p in self.modules[s].parameters()]


def stage_ranks(chain: StageChain) -> dict[int, list[int]]:
    """rank -> stage indices it owns."""
    return {r: chain.stages_on(r) for r in range(chain.num_ranks)}


__all__: Sequence[str] = (
    "TORCH_SERIES", "Actions", "Event", "PipelineRun", "ScheduleExportError", "StageChain", "actions_csv",
    "api_problems", "backward_functions", "export_actions", "require_api", "stage_chain", "stage_ranks", "validate_actions",
)  # fmt: skip
