"""Constants the ``tessel train``/``profile`` parser needs, apart from the modules that need torch, so
that building the CLI does not import torch."""

from __future__ import annotations

PROFILE_SHAPES = ("vshape", "interleaved", "zerobubble")
"""Placement shapes a GPT can be profiled into."""

MIN_GAIN = 0.05
"""A searched order replaces the best baseline only when it is predicted this much faster. Reordering
blocks has costs the block model leaves out (a deferred W finds its activations out of cache): on the
2-core machine, two identical 1F1B orders measured 445 and 467 ms, while a searched zero-bubble order
predicted 2.7% faster than 1F1B ran 11% slower. A gain below the run-to-run spread is not a gain."""

PROFILE_WARMUP = 2
"""Profiling warm-up runs per block when ``--warmup`` is not given."""

PROFILE_REPEATS = 5
"""Profiling runs per block (median taken) when ``--repeats`` is not given."""

TIMEOUT_S = 900.0
"""Seconds a whole ``train`` run (profiling and training) or a ``profile`` run may take."""
