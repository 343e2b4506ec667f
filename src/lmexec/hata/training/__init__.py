"""Learning-to-hash for HATA: train per-layer projections ``W`` from a model's own post-RoPE q/k.

``data`` (calibration capture and labels), ``loss`` (paper and ranking losses), ``recipes``,
``validate`` (held-out recall), ``trainer`` (resumable per-layer loop) and ``cli`` (``lmexec hata train``).
"""
