"""HATA inside Hugging Face transformers through its public extension points.

``attention`` (the ``hata`` AttentionInterface + mask function), ``cache`` (CacheLayerMixin layers in
preallocated buffers, the Cache), ``enable`` (the one-call entry point, also ``lmexec.hata.enable``),
``tasks`` (passkey, NIAH, lm), ``evaluate`` (the accuracy evaluation) and ``demo``. See docs/hata.md,
"Integration with transformers". Nothing is imported here, so that building the CLI (``hf/cli.py``)
does not load transformers.
"""
