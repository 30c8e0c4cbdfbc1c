"""Export stages: capture, attention lowering, simplification, checks, verification, save."""

from qcexport.export.mechanism import convert_mechanism
from qcexport.export.pipeline import ConvertResult, VerifyRecord, convert, resample

__all__ = ["ConvertResult", "VerifyRecord", "convert", "convert_mechanism", "resample"]
