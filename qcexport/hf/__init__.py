"""Hugging Face transformers components (``qcexport convert --hf PATH --component NAME``).

transformers is an optional dependency (``pip install 'qcexport[hf]'``); it is imported only
when a component is loaded.
"""

from qcexport.hf.components import ComponentSpec, get, names
from qcexport.hf.load import HFComponent, describe, load_component
from qcexport.hf.stages import convert, write_golden

__all__ = ["ComponentSpec", "HFComponent", "convert", "describe", "get", "load_component",
           "names", "write_golden"]
