"""Built-in placements (the Tessel paper's cases), parametric in the device count.

Defaults match the paper's code block for block: a forward block ``F`` lasts 1 and allocates 1, a
backward block ``B`` lasts 3 and releases 1, an all-device block ``A`` (tensor parallel) lasts 1 and
keeps no memory. Durations and memory are overridable per *role*:

=====  =============================================  ========  ======
role   blocks                                         duration  memory
=====  =============================================  ========  ======
F      single-device forward                          1         +1
B      single-device backward                         3         -1
A      all-device forward and backward (TP)           1         0 [*]
I      zero-bubble backward for the input gradient    2         -0.5
W      zero-bubble backward for the weight gradient   1         -0.5
=====  =============================================  ========  ======

[*] ``A.memory`` is what an all-device *forward* keeps; its backward releases the same amount (a frozen
forward without a backward, finetune's, keeps nothing).

A few shapes change a default as the paper does (finetune: B lasts 2; alphafold: B lasts 1 and only
the last of three forward passes keeps memory; kshape: the fused all-device block keeps +1 until its
backward releases it); an explicit override always wins.

Zero-bubble memory: the forward's activation (+1) is released half when the input gradient is
computed (intermediate activations are no longer needed) and half when the weight gradient is
computed (it still needs the layer inputs and output gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from lmexec.errors import UserError
from lmexec.tessel.block import Block, BlockKind
from lmexec.tessel.placement import MAX_BLOCKS, MAX_DEVICES, Placement, chain

ROLE_DEFAULTS: dict[str, tuple[float, float]] = {
    "F": (1.0, 1.0),
    "B": (3.0, -1.0),
    "A": (1.0, 0.0),
    "I": (2.0, -0.5),
    "W": (1.0, -0.5),
}

Overrides = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class _Maker:
    """Creates blocks of one role with the shape's defaults and the user's overrides applied."""

    devices: int
    shape_defaults: Mapping[str, Mapping[str, float]]
    overrides: Overrides
    read: set[tuple[str, str]] = field(default_factory=set)
    """(role, key) pairs the shape asked for: an override of any other would be silently ignored."""

    def value(self, role: str, key: str, default: float | None = None) -> float:
        self.read.add((role, key))
        if key in self.overrides.get(role, {}):
            return float(self.overrides[role][key])
        if key in self.shape_defaults.get(role, {}):
            return float(self.shape_defaults[role][key])
        if default is not None:
            return default
        duration, memory = ROLE_DEFAULTS[role]
        return duration if key == "duration" else memory

    def make(
        self, role: str, name: str, devices: tuple[int, ...], kind: BlockKind, memory: float | None = None
    ):
        mem = self.value(role, "memory") if memory is None else memory
        return Block(name, kind, self.value(role, "duration"), mem, devices)

    def f(self, name: str, device: int, memory: float | None = None) -> Block:
        return self.make("F", name, (device,), BlockKind.FORWARD, memory)

    def b(self, name: str, device: int) -> Block:
        return self.make("B", name, (device,), BlockKind.BACKWARD)

    def a(self, name: str, memory: float | None = None) -> Block:
        """An all-device forward block, keeping ``A.memory`` until its backward."""
        return self.make("A", name, tuple(range(self.devices)), BlockKind.FORWARD, memory)

    def a_back(self, name: str, forward: Block) -> Block:
        """The backward of an all-device forward: it releases what that forward kept."""
        return self.make(
            "A", name, forward.devices, BlockKind.BACKWARD, -forward.memory if forward.memory else 0.0
        )


def _pipeline(m: _Maker, devices: list[int], prefix: str = "") -> tuple[list[Block], list[Block]]:
    forwards = [m.f(f"{prefix}f{i}", d) for i, d in enumerate(devices)]
    backwards = [m.b(f"{prefix}b{i}", d) for i, d in reversed(list(enumerate(devices)))]
    return forwards, backwards


def vshape(m: _Maker) -> list[Block]:
    forwards, backwards = _pipeline(m, list(range(m.devices)))
    return chain(forwards + backwards)


def interleaved(m: _Maker, chunks: int = 2) -> list[Block]:
    if chunks < 1:
        raise UserError("interleaved needs at least one chunk per device")
    if 2 * chunks * m.devices > MAX_BLOCKS:  # checked before building them
        raise UserError(
            f"interleaved: {chunks} chunks on {m.devices} devices make {2 * chunks * m.devices} blocks; "
            f"at most {MAX_BLOCKS}"
        )
    forwards, backwards = _pipeline(m, [s % m.devices for s in range(chunks * m.devices)])
    return chain(forwards + backwards)


def xshape(m: _Maker) -> list[Block]:
    down_f, down_b = _pipeline(m, list(range(m.devices)), "down.")
    up_f, up_b = _pipeline(m, list(reversed(range(m.devices))), "up.")
    return chain(down_f + down_b) + chain(up_f + up_b)


def mshape(m: _Maker) -> list[Block]:
    forwards, backwards = _pipeline(m, list(range(m.devices)))
    embed = m.a("embed.f")
    return chain([embed, *forwards, *backwards, m.a_back("embed.b", embed)])


def nnshape(m: _Maker) -> list[Block]:
    _need_even(m.devices, "nnshape")
    half = m.devices // 2
    enc_f, enc_b = _pipeline(m, list(range(half)), "enc.")
    dec_f, dec_b = _pipeline(m, list(range(half, m.devices)), "dec.")
    enc_embed, dec_embed = m.a("enc.embed.f"), m.a("dec.embed.f")
    return chain(
        [enc_embed, *enc_f, dec_embed, *dec_f, *dec_b,
         m.a_back("dec.embed.b", dec_embed), *enc_b, m.a_back("enc.embed.b", enc_embed)]
    )  # fmt: skip


def kshape(m: _Maker) -> list[Block]:
    _need_even(m.devices, "kshape")
    half = m.devices // 2
    left_f, left_b = _pipeline(m, list(range(half)), "left.")
    right_f, right_b = _pipeline(m, list(range(half, m.devices)), "right.")
    left_f, right_f = chain(left_f), chain(right_f)
    join_f = replace(m.a("join.f"), after=(left_f[-1].name, right_f[-1].name))
    join_b = replace(m.a_back("join.b", join_f), after=(join_f.name,))
    left_b = chain([replace(left_b[0], after=(join_b.name,)), *left_b[1:]])
    right_b = chain([replace(right_b[0], after=(join_b.name,)), *right_b[1:]])
    return [*left_f, *right_f, join_f, join_b, *left_b, *right_b]


def mllm(m: _Maker) -> list[Block]:
    forwards, backwards = _pipeline(m, list(range(m.devices)))
    vision, head = m.a("vision.f"), m.a("head.f")
    return chain(
        [vision, *forwards, head, m.a_back("head.b", head), *backwards, m.a_back("vision.b", vision)]
    )  # fmt: skip


def finetune(m: _Maker) -> list[Block]:
    forwards, backwards = _pipeline(m, list(range(m.devices)))
    return chain([m.a("frozen.f", memory=0.0), *forwards, *backwards])  # frozen: no backward, keeps nothing


def alphafold(m: _Maker, passes: int = 3) -> list[Block]:
    forwards = []
    for p in range(passes):
        keep = None if p == passes - 1 else 0.0
        forwards += [m.f(f"pass{p}.f{d}", d, memory=keep) for d in range(m.devices)]
    backwards = [m.b(f"b{d}", d) for d in reversed(range(m.devices))]
    return chain(forwards + backwards)


def zerobubble(m: _Maker) -> list[Block]:
    forwards = [m.f(f"f{d}", d) for d in range(m.devices)]
    inputs = [m.make("I", f"i{d}", (d,), BlockKind.BACKWARD_INPUT) for d in reversed(range(m.devices))]
    chained = chain(forwards + inputs)
    weights = [
        replace(m.make("W", f"w{d}", (d,), BlockKind.BACKWARD_WEIGHT), after=(f"i{d}",))
        for d in reversed(range(m.devices))
    ]
    return chained + weights


def _need_even(devices: int, shape: str) -> None:
    if devices < 2 or devices % 2:
        raise UserError(f"{shape} splits the devices into two halves: use an even device count >= 2")


@dataclass(frozen=True)
class Shape:
    """A built-in placement: its builder, the paper's per-shape defaults and a one-line description."""

    build: Callable[..., list[Block]]
    description: str
    defaults: Mapping[str, Mapping[str, float]]
    min_devices: int = 1


SHAPES: dict[str, Shape] = {
    "vshape": Shape(vshape, "1F1B pipeline: F on devices 0..D-1, then B on D-1..0", {}),
    "interleaved": Shape(
        interleaved, "virtual stages: F on 0..D-1 repeated per chunk (default 2), B in reverse", {}
    ),
    "xshape": Shape(xshape, "Chimera-like: two V chains per micro-batch, one down and one up", {}),
    "mshape": Shape(mshape, "GPT: tensor-parallel embedding A, pipeline F/B, A backward", {}),
    "nnshape": Shape(nnshape, "mT5 encoder-decoder: A, F first half, A, F second half, and back", {}, 2),
    "kshape": Shape(
        kshape, "Flava: two branches joined by an all-device block (a DAG)", {"A": {"memory": 1}}, 2
    ),
    "mllm": Shape(mllm, "multimodal: A, F on 0..D-1, A; A, B on D-1..0, A", {}),
    "finetune": Shape(
        finetune, "frozen all-device encoder (no backward), pipeline F, B lasting 2", {"B": {"duration": 2}}
    ),
    "alphafold": Shape(
        alphafold, "three forward passes (memory 0, 0, +1), then B lasting 1", {"B": {"duration": 1}}
    ),
    "zerobubble": Shape(
        zerobubble, "V pipeline with B split into input-gradient I and weight-gradient W", {}
    ),
}


def build_placement(
    shape: str,
    devices: int,
    *,
    inference: bool = False,
    capacity: float | list[float] | None = None,
    static_memory: float | list[float] | None = None,
    overrides: Overrides | None = None,
    chunks: int | None = None,
) -> Placement:
    """Build a built-in placement by name; ``inference`` keeps the forward blocks with memory 0."""
    if shape not in SHAPES:
        raise UserError(f"unknown placement {shape!r}; built-ins: {', '.join(SHAPES)}")
    spec = SHAPES[shape]
    if not isinstance(devices, int) or devices < max(1, spec.min_devices):
        raise UserError(f"{shape} needs at least {max(1, spec.min_devices)} device(s), got {devices!r}")
    if devices > MAX_DEVICES:
        raise UserError(f"{shape}: at most {MAX_DEVICES} devices, got {devices}")
    overrides = dict(overrides or {})
    for role, values in overrides.items():
        if role not in ROLE_DEFAULTS:
            raise UserError(f"unknown block role {role!r} in an override; roles: {', '.join(ROLE_DEFAULTS)}")
        for key, value in values.items():
            if key not in ("duration", "memory"):
                raise UserError(f"override {role}.{key}: only 'duration' and 'memory' can be set")
            if key == "duration" and value <= 0:
                raise UserError(f"override {role}.duration must be positive, got {value:g}")
    maker = _Maker(devices, spec.defaults, overrides)
    kwargs = {"chunks": chunks} if chunks is not None and shape == "interleaved" else {}
    if chunks is not None and shape != "interleaved":
        raise UserError("--chunks applies to the interleaved placement only")
    placement = Placement(shape, devices, tuple(spec.build(maker, **kwargs)))
    unused = [
        f"{role}.{key}"
        for role, values in overrides.items()
        for key in values
        if (role, key) not in maker.read
    ]
    if unused:
        raise UserError(f"{shape} has no block that --set {', '.join(unused)} would change")
    if inference:
        placement = placement.forward_only()
    if capacity is not None or static_memory is not None:
        placement = placement.with_memory(capacity, static_memory)
    return placement


def parse_overrides(items: list[str] | None) -> dict[str, dict[str, float]]:
    """Parse CLI overrides such as ``B.duration=2`` or ``F.memory=0.5``."""
    out: dict[str, dict[str, float]] = {}
    for item in items or []:
        try:
            key, value = item.split("=", 1)
            role, attr = key.split(".", 1)
            out.setdefault(role.strip(), {})[attr.strip()] = float(value)
        except ValueError:
            raise UserError(
                f"bad override {item!r}: write ROLE.duration=X or ROLE.memory=X (e.g. B.duration=2)"
            ) from None
    return out


def load_placement(spec: str, devices: int | None = None, **kwargs) -> Placement:
    """A built-in name (needs ``devices``) or a JSON file path."""
    if spec in SHAPES:
        if devices is None:
            raise UserError(f"built-in placement {spec!r} needs --devices")
        return build_placement(spec, devices, **kwargs)
    if spec.endswith(".json") or "/" in spec:
        placement = Placement.load(spec)
        if devices is not None and devices != placement.num_devices:
            raise UserError(f"{spec} has {placement.num_devices} devices but --devices {devices} was given")
        if kwargs.get("inference"):
            placement = placement.forward_only()
        if kwargs.get("capacity") is not None or kwargs.get("static_memory") is not None:
            capacity = kwargs.get("capacity")  # --static-memory alone keeps the file's limits
            placement = placement.with_memory(
                placement.capacity if capacity is None else capacity, kwargs.get("static_memory")
            )
        return placement
    raise UserError(f"unknown placement {spec!r}: give a built-in ({', '.join(SHAPES)}) or a .json file")
