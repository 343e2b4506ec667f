"""A block: one unit of work of one micro-batch (a stage's forward, backward, weight gradient, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class BlockKind(StrEnum):
    """What a block computes; zero-bubble placements split ``backward`` into input and weight parts."""

    FORWARD = "forward"
    BACKWARD = "backward"
    BACKWARD_INPUT = "backward_input"
    BACKWARD_WEIGHT = "backward_weight"

    @property
    def short(self) -> str:
        """One-letter label used in ASCII charts and action lists (F, B, I, W)."""
        return {"forward": "F", "backward": "B", "backward_input": "I", "backward_weight": "W"}[self.value]


@dataclass(frozen=True)
class Block:
    """One block of the per-micro-batch placement.

    ``memory`` is the activation memory delta applied on *each* of ``devices`` when the block starts
    (positive allocates, negative releases memory allocated by an earlier block of the same
    micro-batch). A block on several devices occupies all of them for its whole ``duration``
    (a tensor-parallel block). ``after`` names the blocks of the same micro-batch it depends on.
    """

    name: str
    kind: BlockKind
    duration: float
    memory: float
    devices: tuple[int, ...]
    after: tuple[str, ...] = field(default=())

    @property
    def multi_device(self) -> bool:
        return len(self.devices) > 1

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "duration": self.duration,
            "memory": self.memory,
            "devices": list(self.devices),
            "after": list(self.after),
        }
