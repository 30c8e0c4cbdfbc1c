"""The data of a latency profile, in parts: ``records`` (the data and its JSON), ``markdown``
(the table) and ``provenance`` (ONNX node -> PyTorch module). Engine modules build these
records in their profiling hooks, so this package sits below ``qcrun.engines`` and imports no
engine; the run that drives the engines is ``qcrun.profile`` (the public face of all of it),
the engine's GEMM peak ``qcrun.gemm``.
"""
