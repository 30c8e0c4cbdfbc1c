"""The one error class for user mistakes, shared by qcrun and qcexport.

A ``UserError`` is something the user can fix (a wrong name, a bad file, a failed check);
the CLIs turn it into a message and exit status 1 without a traceback. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, with what was seen and how to fix it.

    ``stage`` names the pipeline stage that failed (export, simplify, parity, ...), so a
    message reads "export: ...".
    """

    def __init__(self, message: str, *, stage: str | None = None, hint: str | None = None):
        self.stage = stage
        self.hint = hint
        super().__init__(message)

    def __str__(self) -> str:
        text = super().__str__()
        if self.stage:
            text = f"{self.stage}: {text}"
        if self.hint:
            text = f"{text}\n  fix: {self.hint}"
        return text


def unknown_choice(kind: str, value: str, choices, *, flag: str | None = None) -> UserError:
    """An error for a name that is not one of ``choices``, listing the valid ones."""
    listed = ", ".join(sorted(choices))
    hint = f"pass one of them{' with ' + flag if flag else ''}"
    return UserError(f"unknown {kind} {value!r}; valid {kind}s: {listed}", hint=hint)


#: Install hints per optional module, shown when it is missing.
INSTALL_HINTS = {
    "onnxruntime": "pip install 'qcrun[ort]' (or 'qcrun[ort-gpu]' on a CUDA host)",
    "openvino": "pip install 'qcrun[openvino]'",
    "onnx": "pip install 'qcrun[reference]'",
}


def import_engine(module: str):
    """Import an optional engine module, or raise a UserError with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = INSTALL_HINTS.get(module, f"pip install {module}")
        raise UserError(f"{module} is not importable ({e})", hint=hint) from None
