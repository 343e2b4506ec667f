"""A transformers ``Cache`` whose layers keep K, V and selection features in preallocated buffers.

Each :class:`HataLayer` is a ``CacheLayerMixin`` wrapping the core :class:`~lmexec.hata.cache.LayerCache`:
``update`` writes the new keys/values into spare capacity in place (the buffers grow by doubling, in
steps of 1024 rows, so a decode step never copies the cache, unlike ``DynamicLayer``'s ``torch.cat``)
and returns views of the filled part. The first update of a sparse layer (the prefill) calls the
selection method's ``prepare`` (encode every key, fit per-layer parameters); later updates call
``on_append`` for the new keys only. Layers below ``dense_layers`` and the ``dense`` method keep no
features.

The attention function is not given the cache, so ``update`` leaves the layer in a thread-local slot
that the attention function of the same decoder layer reads next (:func:`take_current`); it checks that
the keys it received are this layer's buffer before using it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from lmexec.hata.budget import Budget
from lmexec.hata.cache import DEFAULT_STEP, GrowableBuffer, LayerCache
from lmexec.hata.selection import SelectionMethod


@dataclass
class HataSettings:
    """What a decode step of a sparse layer does: method, budget, which layers stay dense."""

    method: SelectionMethod
    budget: Budget
    dense_layers: int = 2
    capacity: int = 0
    """Rows preallocated at the first update (0: prompt length + 1024); buffers double when full."""
    record_recall: bool = False
    """Also compute the exact top-k at each sparse decode step and accumulate top-k recall (slower)."""
    stats: dict[str, float] = field(default_factory=lambda: {"steps": 0, "recall_sum": 0.0, "recall_n": 0})

    @property
    def is_dense(self) -> bool:
        return self.method.name == "dense"

    def sparse(self, layer: int) -> bool:
        return not self.is_dense and layer >= self.dense_layers

    @property
    def mean_recall(self) -> float | None:
        n = self.stats["recall_n"]
        return self.stats["recall_sum"] / n if n else None


_slot = threading.local()


def take_current(layer_idx: int) -> HataLayer | None:
    """The layer whose ``update`` ran last in this thread, if it is ``layer_idx`` (then cleared)."""
    layer = getattr(_slot, "layer", None)
    _slot.layer = None
    if layer is None or layer.layer_idx != layer_idx:
        return None
    return layer


class HataLayer(CacheLayerMixin):
    """One decoder layer's K/V (+ selection features) in growable in-place buffers."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, settings: HataSettings, **kwargs) -> None:
        super().__init__(**kwargs)
        self.layer_idx = layer_idx
        self.settings = settings
        self.storage: LayerCache | None = None

    def __repr__(self) -> str:
        kind = "sparse" if self.settings.sparse(self.layer_idx) else "dense"
        return f"HataLayer({self.layer_idx}, {kind}, length={self.get_seq_length()})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, t, d = key_states.shape
        capacity = max(self.settings.capacity, t + DEFAULT_STEP)
        self.storage = LayerCache(
            GrowableBuffer(b, h, d, key_states.dtype, key_states.device, capacity),
            GrowableBuffer(b, h, value_states.shape[-1], value_states.dtype, value_states.device, capacity),
        )
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        storage = self.storage
        assert storage is not None
        start = storage.append(key_states, value_states)
        if self.settings.sparse(self.layer_idx):
            if start == 0:
                self.settings.method.prepare(storage, self.layer_idx)
            else:
                self.settings.method.on_append(storage, self.layer_idx, start)
        self.keys, self.values = storage.keys, storage.values
        _slot.layer = self
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.storage.length if self.storage is not None else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def reallocations(self) -> int:
        """How many times any buffer of this layer was reallocated (grown) so far."""
        if self.storage is None:
            return 0
        buffers = [self.storage.key_buffer, self.storage.value_buffer, *self.storage.extras.values()]
        return sum(b.reallocations for b in buffers)

    def reset(self) -> None:
        """Forget the content but keep the allocation (lengths back to 0, features dropped)."""
        if self.storage is not None:
            self.storage.key_buffer.length = 0
            self.storage.value_buffer.length = 0
            self.storage.extras.clear()
            self.storage.state.clear()
            self.keys, self.values = self.storage.keys, self.storage.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beam search); copies the buffers, as any reordering must."""
        if self.storage is None:
            return
        for buffer in (self.storage.key_buffer, self.storage.value_buffer, *self.storage.extras.values()):
            buffer.data = buffer.data.index_select(0, beam_idx.to(buffer.data.device))
        self.keys, self.values = self.storage.keys, self.storage.values

    def offload(self) -> None:  # buffers stay where they are
        pass

    def prefetch(self) -> None:
        pass

    def fork(self, settings: HataSettings, room: int = DEFAULT_STEP) -> HataLayer:
        """A copy of this layer's K/V (plus ``room`` spare rows) under other settings; features rebuilt."""
        layer = HataLayer(self.layer_idx, settings)
        if self.storage is None:
            return layer
        n = self.storage.length
        k, v = self.storage.keys, self.storage.values
        capacity = max(settings.capacity, n + room)
        layer.storage = LayerCache(
            GrowableBuffer(*k.shape[:2], k.shape[-1], k.dtype, k.device, capacity),
            GrowableBuffer(*v.shape[:2], v.shape[-1], v.dtype, v.device, capacity),
        )
        layer.storage.append(k, v)
        layer.device, layer.is_initialized = self.device, True
        if settings.sparse(self.layer_idx) and n:
            settings.method.prepare(layer.storage, self.layer_idx)
        layer.keys, layer.values = layer.storage.keys, layer.storage.values
        return layer


class HataCache(Cache):
    """The cache to pass to ``generate(..., cache=...)`` (``past_key_values=`` also works in 5.x)."""

    def __init__(self, settings: HataSettings, n_layers: int) -> None:
        super().__init__(layers=[HataLayer(i, settings) for i in range(n_layers)])
        self.settings = settings

    @property
    def reallocations(self) -> int:
        return sum(layer.reallocations for layer in self.layers)

    def fork(self, settings: HataSettings, room: int = DEFAULT_STEP) -> HataCache:
        """A new cache holding a copy of this one's K/V, with features built for ``settings``.

        Prefill is dense for every method, so an evaluation prefills once and forks per method/budget.
        """
        cache = HataCache(settings, 0)
        cache.layers = [layer.fork(settings, room) for layer in self.layers]
        return cache
