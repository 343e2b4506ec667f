"""HATA inside Hugging Face transformers through its public extension points.

``attention`` (the ``hata`` AttentionInterface + mask function), ``cache`` (CacheLayerMixin layers in
preallocated buffers, the Cache), ``enable`` (the one-call entry point), ``tasks`` (passkey, NIAH, lm),
``evaluate`` (the accuracy evaluation) and ``demo``. See docs/hata.md, "Integration with transformers".
"""

from lmexec.hata.hf.enable import HataHandle, enable

__all__ = ["HataHandle", "enable"]
