"""lmexec: run large DNN models fast.

Two sibling systems share this package:

* :mod:`lmexec.tessel` searches execution schedules for blocks placed on devices (Tessel).
* :mod:`lmexec.hata` makes LLM decoding faster with hash-aware top-k attention (HATA).
"""

__version__ = "0.1.0"
