"""Preallocated per-layer storage for K, V and per-token selection features (hash codes, ...).

Appending writes into spare capacity in place; the buffer is reallocated only when full, and then by
at least doubling, so a decode step never copies the whole cache (unlike a concatenating cache).
Reads are views ``[B, H, n, F]`` of the buffer. This is the storage the transformers ``Cache`` layer of
the integration issue wraps. Large CPU buffers ask for 2 MiB pages (see :func:`advise_huge_pages`).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

DEFAULT_STEP = 1024
HUGE_PAGE_MIN_BYTES = 32 << 20
"""CPU buffers at least this large are backed by 2 MiB pages where Linux allows it."""

HUGE_PAGE = 2 << 20
T = TypeVar("T")


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back ``t``'s (not yet touched) memory with 2 MiB pages (``madvise(MADV_HUGEPAGE)``).

    Gathered K/V rows are random: with 4 KiB pages nearly every selected row is a TLB miss (measured on
    the 2-core machine: gather attention over 2048 x 8 rows of a 128K fp32 cache, 6.2 ms -> 4.4 ms CPU).
    Needs transparent huge pages in ``madvise`` or ``always`` mode; returns False where it cannot apply.
    """
    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return False
    start = (t.data_ptr() + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 14) == 0  # MADV_HUGEPAGE
    except (OSError, AttributeError):
        return False


def _allocate(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device | str,
    huge_pages: bool | None,
) -> tuple[torch.Tensor, bool]:
    """An uninitialised buffer, advised to 2 MiB pages before anything touches it when ``huge_pages`` is
    True, or None and it is at least ``HUGE_PAGE_MIN_BYTES``. Returns it and whether the advice was taken."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    large = t.numel() * t.element_size() >= HUGE_PAGE_MIN_BYTES
    wanted = huge_pages if huge_pages is not None else large
    return t, bool(wanted) and advise_huge_pages(t)


class GrowableBuffer:
    """A ``[B, H, capacity, F]`` tensor filled along dim 2; ``append`` is in place until it is full.

    ``huge_pages``: None (default) advises 2 MiB pages for CPU buffers of ``HUGE_PAGE_MIN_BYTES`` or more,
    True for any size, False never; ``self.huge_pages`` says whether the advice was taken."""

    def __init__(
        self,
        batch: int,
        heads: int,
        features: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        capacity: int = DEFAULT_STEP,
        step: int = DEFAULT_STEP,
        huge_pages: bool | None = None,
    ) -> None:
        self.step = max(1, step)
        self.want_huge_pages = huge_pages
        self._derived: dict[str, tuple[torch.Tensor, object]] = {}
        self.data, self.huge_pages = _allocate(
            (batch, heads, max(1, capacity), features), dtype, device, huge_pages
        )
        self.length = 0
        self.reallocations = 0

    @property
    def data(self) -> torch.Tensor:
        """The whole ``[B, H, capacity, F]`` storage (always contiguous)."""
        return self._data

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        """Replace the storage (growth, a beam reorder): handles :meth:`derived` made on the old one are
        dropped at once, so they neither outlive it nor keep it alive."""
        self._derived.clear()
        self._data = value.contiguous()

    def __getstate__(self) -> dict[str, object]:
        """Copies (``copy``, ``deepcopy``, pickling) start without handles: a copied handle would point
        at the original's storage, or at a detached copy of it, not at the copy's own."""
        state = self.__dict__.copy()
        state["_derived"] = {}
        return state

    @property
    def capacity(self) -> int:
        return self.data.shape[2]

    @property
    def shape(self) -> torch.Size:
        """Shape of :meth:`view` (``[B, H, length, F]``) without making the view."""
        b, h, _, f = self.data.shape
        return torch.Size((b, h, self.length, f))

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def derived(self, key: str, make: Callable[[torch.Tensor], T]) -> T:
        """``make(self.data)``, kept until the storage is replaced (growth, a beam reorder).

        Lets a kernel backend keep its own handle on the whole buffer (the numba kernels' numpy array)
        instead of rebuilding it from a fresh view every decode step: per step, the torch/numpy
        conversions cost more than the kernels at short contexts."""
        entry = self._derived.get(key)
        if entry is None or entry[0] is not self._data:
            entry = (self._data, make(self._data))
            self._derived[key] = entry
        return entry[1]  # type: ignore[return-value]

    def reserve(self, needed: int) -> None:
        """Ensure room for ``needed`` rows: grow to max(needed, 2 * capacity), rounded up to ``step``."""
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity)
        new_capacity = -(-new_capacity // self.step) * self.step
        b, h, _, f = self.data.shape
        grown, self.huge_pages = _allocate(
            (b, h, new_capacity, f), self.data.dtype, self.data.device, self.want_huge_pages
        )
        grown[:, :, : self.length] = self.data[:, :, : self.length]
        self.data = grown
        self.reallocations += 1

    def make_room(self, start: int, end: int) -> int:
        """Check that rows ``start..end`` may be written (no gap after the current length), grow to hold
        them, and return the length the buffer has once they are written (for writers that fill the
        storage themselves, e.g. a kernel)."""
        if not 0 <= start <= self.length:
            raise IndexError(f"write at {start} would leave a gap after row {self.length}")
        self.reserve(end)
        return max(self.length, end)

    def write(self, start: int, rows: torch.Tensor) -> None:
        """Write ``rows [B, H, T, F]`` at ``start`` (at most the current length) in place."""
        end = start + rows.shape[2]
        length = self.make_room(start, end)
        self.data[:, :, start:end] = rows
        self.length = length

    def append(self, rows: torch.Tensor) -> int:
        """Write ``rows [B, H, T, F]`` after the current end; return the start index."""
        start = self.length
        self.write(start, rows)
        return start

    def view(self) -> torch.Tensor:
        """The filled part ``[B, H, length, F]`` (a view, no copy)."""
        return self.data[:, :, : self.length]


@dataclass
class LayerCache:
    """K and V of one layer plus named per-token feature buffers owned by a selection method."""

    key_buffer: GrowableBuffer
    value_buffer: GrowableBuffer
    extras: dict[str, GrowableBuffer] = field(default_factory=dict)
    state: dict[str, object] = field(default_factory=dict)
    """Small per-layer method state that is not per-token (e.g. Quest's page statistics)."""

    @classmethod
    def empty(
        cls,
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity: int = DEFAULT_STEP,
    ) -> LayerCache:
        make = lambda: GrowableBuffer(batch, kv_heads, head_dim, dtype, device, capacity)  # noqa: E731
        return cls(make(), make())

    @classmethod
    def from_prefill(
        cls, keys: torch.Tensor, values: torch.Tensor, capacity: int | None = None
    ) -> LayerCache:
        """A cache holding ``keys``/``values`` ``[B, H_kv, T, d]`` with room for ``capacity`` tokens."""
        b, h, t, d = keys.shape
        cache = cls.empty(b, h, d, keys.dtype, keys.device, max(capacity or 0, t + DEFAULT_STEP))
        cache.append(keys, values)
        return cache

    @property
    def length(self) -> int:
        return self.key_buffer.length

    @property
    def keys(self) -> torch.Tensor:
        return self.key_buffer.view()

    @property
    def values(self) -> torch.Tensor:
        return self.value_buffer.view()

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Append ``[B, H_kv, T, d]`` keys and values in place; return the first new position."""
        start = self.key_buffer.append(keys)
        self.value_buffer.append(values)
        return start

    def extra(
        self, name: str, features: int, dtype: torch.dtype, rows_per_token: float = 1.0
    ) -> GrowableBuffer:
        """The feature buffer ``name``, created empty on first use with room for the K buffer's capacity
        (times ``rows_per_token``: Quest keeps one row per page)."""
        buffer = self.extras.get(name)
        if buffer is None:
            b, h, capacity, _ = self.key_buffer.data.shape
            rows = max(1, int(capacity * rows_per_token) + 1)
            buffer = GrowableBuffer(b, h, features, dtype, self.key_buffer.data.device, rows)
            self.extras[name] = buffer
        return buffer
