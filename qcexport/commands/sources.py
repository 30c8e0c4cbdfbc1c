"""Where `convert` and `golden` take a user's model from: ``--module PKG.MOD:FACTORY`` or
``--hf PATH_OR_ID --component NAME``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from qcrun.errors import UserError


def load_factory(spec: str, *, with_cases: bool = False):
    """Import ``package.module:factory`` and call it: (module, example_inputs, dynamic_axes).

    The factory may return a fourth item, its golden cases (``{name: inputs}``, ``[(name,
    inputs)]`` or a callable giving either); ``with_cases`` returns it too (None if absent).
    """
    if ":" not in spec:
        raise UserError(f"--module {spec!r} is not of the form package.module:factory",
                        stage="load", hint="e.g. --module mypkg.models:make_resampler")
    mod_name, _, attr = spec.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(mod_name)
    except (Exception, SystemExit) as exc:  # the user's module failing to import, or exiting
        raise UserError(f"cannot import {mod_name!r}: {type(exc).__name__}: {exc}", stage="load",
                        hint="check the module path and that it imports on its own "
                        f"(python -c 'import {mod_name}')") from exc
    finally:
        sys.path.pop(0)
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise UserError(f"{mod_name} has no callable {attr!r}", stage="load",
                        hint="name a function that returns (module, example_inputs, dynamic_axes)")
    try:
        made = factory()
    except SystemExit as exc:  # sys.exit() in a factory must not end qcexport silently
        raise UserError(f"{spec}() called sys.exit({exc.code!r}) instead of returning",
                        stage="load", hint="return (module, example_inputs, dynamic_axes) from "
                        "the factory; raise an exception to report a problem") from exc
    except Exception as exc:  # the user's factory: report, do not crash
        raise UserError(f"{spec}() raised {type(exc).__name__}: {exc}", stage="load",
                        hint="fix the factory; it is called with no arguments") from exc
    cases = None
    if isinstance(made, tuple) and len(made) == 4:
        made, cases = made[:3], made[3]
    _check_made(spec, made)
    return (*made, cases) if with_cases else made


def _check_made(spec: str, made) -> None:
    """What a factory returned: (nn.Module, {input name: value}, dynamic_axes or None)."""
    import torch

    if not (isinstance(made, tuple) and len(made) == 3 and isinstance(made[0], torch.nn.Module)
            and isinstance(made[1], dict)):
        # non-tensor values in the inputs are constants fixed at export (e.g. return_dict=True)
        raise UserError(f"{spec}() must return (nn.Module, {{input name: tensor}}, dynamic_axes)",
                        stage="load", hint="return a 3-tuple (or a 4-tuple with golden cases)")
    axes = made[2]
    if axes is not None and not (
        isinstance(axes, dict)
        and all(isinstance(k, str) and isinstance(v, dict) for k, v in axes.items())
        and all(isinstance(a, int) and not isinstance(a, bool) and isinstance(n, str)
                for v in axes.values() for a, n in v.items())
    ):
        raise UserError(f"{spec}() returned dynamic_axes of type {type(axes).__name__}: "
                        f"{str(axes)[:200]}", stage="load",
                        hint="return dynamic_axes as {input or output name: {axis index: "
                        "symbolic name}}, e.g. {'x': {0: 'batch', 1: 'tokens'}}, or None")


def load_hf(path_or_id: str, component: str | None):
    """`--hf PATH_OR_ID --component NAME`: the component, or a UserError listing them."""
    from qcexport.hf import components, load_component

    if not component:
        raise UserError("--hf needs --component NAME", stage="load",
                        hint=f"components: {', '.join(components.names())} "
                        "(see `qcexport list --hf`)")
    return load_component(path_or_id, component)


def output_names(text: str | None) -> list[str] | None:
    """``--outputs A,B``: the names, or None for every output."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    return names or None
