"""Tessel on real models: GPT stages, a profiler, export to torch.distributed.pipelining, a launcher.

Only :mod:`lmexec.tessel.runtime.pipelining_adapter` touches torch's private pipelining API.
"""
