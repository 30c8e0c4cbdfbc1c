"""Latency profiles, in parts: ``records`` (the data and its JSON), ``markdown`` (the table),
``provenance`` (ONNX node -> PyTorch module), ``gemm`` (the engine's GEMM peak) and ``run``
(profiling a model on targets). ``qcrun.profile`` is the public face that gathers them.

This package's ``__init__`` imports nothing, so that engine modules can use the records and
provenance without importing the run (which imports the engines).
"""
