"""Resolving ``PATH_OR_ID`` and taking a component out of the model it names.

``PATH_OR_ID`` is a local ``save_pretrained`` directory or a Hugging Face hub id. A hub id is
looked up in the local cache first (``local_files_only``) and fetched from the hub only when
that fails and the hub is not switched off (``HF_HUB_OFFLINE=1``); when neither works the error
says why and how to make a local directory instead.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from qcrun.errors import UserError
from torch import nn

from qcexport.hf import components
from qcexport.mechanisms.registry import Case

INSTALL_HINT = "install the Hugging Face extra: pip install 'qcexport[hf]'"


def require_transformers():
    """The transformers module, or a UserError with the install command."""
    try:
        import transformers
    except ImportError as exc:
        raise UserError(f"--hf needs the transformers package, which is not installed ({exc})",
                        stage="load", hint=INSTALL_HINT) from None
    return transformers


@dataclass
class HFComponent:
    """A component taken from a saved model, ready for convert and golden.

    The fields are what a ``--module`` factory gives (module, example inputs, dynamic axes)
    plus the default outputs, the golden cases and the provenance recorded in manifests.
    """

    spec: components.ComponentSpec
    config: Any  # the full model's transformers config
    module: nn.Module
    example_inputs: dict[str, torch.Tensor]
    dynamic_axes: dict[str, dict[int, str]]
    output_names: list[str] | None
    verify_inputs: list[tuple[str, dict[str, torch.Tensor]]]
    metadata: dict[str, Any] = field(default_factory=dict)

    def cases(self, seed: int = 0) -> list[tuple[Case, dict[str, torch.Tensor]]]:
        """The spec's golden cases, made from the config (case i uses seed + i)."""
        return [(case, self.spec.inputs(self.config, case, seed=seed + i))
                for i, case in enumerate(self.spec.golden_cases)]


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_local(path_or_id: str) -> bool:
    # A hub id is "name" or "org/name"; anything else with a path shape is meant as a path.
    return (path_or_id.startswith((".", "/", "~")) or os.sep + os.sep in path_or_id
            or path_or_id.count("/") > 1 or Path(path_or_id).exists())


def load_pretrained(path_or_id: str, check=None):
    """(config, model) of a save_pretrained directory or hub id, in fp32 eval mode.

    ``check(config)`` runs between reading the config and loading the weights, so a wrong
    model is refused before its weights are read.
    """
    transformers = require_transformers()
    local = _looks_local(path_or_id)
    if local:
        path = Path(path_or_id).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path} is not a save_pretrained directory (no config.json there)",
                stage="load",
                hint="pass the directory written by model.save_pretrained(DIR), or a hub id")
        source = str(path)
    else:
        source = path_or_id
    attempts = [True] if local or _hub_offline() else [True, False]
    failure: Exception | None = None
    for local_only in attempts:
        try:
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=local_only)
            if check is not None:
                check(config)
            with _quiet(transformers):
                model = _model_class(transformers, config).from_pretrained(
                    source, config=config, local_files_only=local_only, dtype=torch.float32)
            return config, model.eval()
        except (OSError, ValueError) as exc:
            failure = exc
    why = str(failure).strip().splitlines()[0] if failure else "unknown"
    if local:
        raise UserError(f"cannot load the model in {source}: {why}", stage="load",
                        hint="re-save it with model.save_pretrained(DIR) (weights and config)")
    reach = ("the hub is switched off (HF_HUB_OFFLINE=1) and it is not in the local cache"
             if _hub_offline() else "it is not in the local cache and the hub could not be "
             "reached or does not have it")
    raise UserError(
        f"cannot resolve the hub id {path_or_id!r}: {reach} ({why}); there is no local "
        f"directory {path_or_id} either",
        stage="load",
        hint="on a machine with access, run Model.from_pretrained(ID).save_pretrained(DIR) "
        "and pass --hf DIR (a local save_pretrained directory)")


@contextlib.contextmanager
def _quiet(transformers):
    """No weight-loading progress bars: qcexport reports its own stages."""
    bars = transformers.utils.logging
    was = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            bars.enable_progress_bar()


def _model_class(transformers, config):
    """The class the model was saved as (config.architectures), else its AutoModel class."""
    for name in config.architectures or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_component(path_or_id: str | os.PathLike, name: str) -> HFComponent:
    """Take component ``name`` out of the model at ``path_or_id``.

    Returns the module to export (in eval mode, fp32), example inputs made from the config,
    dynamic axes, the default outputs and the golden cases, as an :class:`HFComponent`.
    """
    spec = components.get(name)  # unknown name: the list, before loading anything
    transformers = require_transformers()

    def check(config) -> None:
        model_type = getattr(config, "model_type", "?")
        if model_type in spec.model_types:
            return
        others = components.for_model_type(model_type)
        raise UserError(
            f"--component {name} takes a {spec.component_class} from a "
            f"{'/'.join(spec.model_types)} model, but {path_or_id} is a {model_type} model "
            f"({', '.join(config.architectures or ['?'])})",
            stage="load",
            hint=(f"components of {model_type} models: {', '.join(others)}" if others else
                  f"no component is supported for {model_type}; supported: "
                  f"{', '.join(components.names())} (see `qcexport list --hf`)"))

    config, model = load_pretrained(str(path_or_id), check)
    model_type = config.model_type
    try:
        module = spec.take(model)
    except LookupError as exc:
        raise UserError(f"cannot find the {spec.component_class} in {type(model).__name__}: "
                        f"{exc}", stage="load",
                        hint=f"this transformers ({transformers.__version__}) lays the model "
                        "out differently; use the version in qcexport's constraints") from None
    module = module.float().eval()
    model_class = type(model).__name__
    del model  # the rest of the model (vision tower, language model) is not exported
    return HFComponent(
        spec=spec,
        config=config,
        module=module,
        example_inputs=spec.inputs(config, spec.export_case, seed=0),
        dynamic_axes={k: dict(v) for k, v in spec.dynamic_axes.items()},
        output_names=list(spec.outputs) if spec.outputs else None,
        verify_inputs=[("export_shape", spec.inputs(config, spec.export_case, seed=1)),
                       ("verify_shape", spec.inputs(config, spec.verify_case, seed=2))],
        metadata={"mechanism": "custom",
                  "roles": spec.axis_roles(),
                  # a local directory by its name only: manifests (and golden sets committed
                  # by users) must not depend on where the model sat on one machine
                  "source": {"kind": "hf", "model": _model_label(str(path_or_id)),
                             "component": name,
                             "component_class": spec.component_class,
                             "model_class": model_class,
                             "model_type": model_type,
                             "transformers": transformers.__version__}},
    )


def _model_label(path_or_id: str) -> str:
    return Path(path_or_id).expanduser().resolve().name if _looks_local(path_or_id) \
        else path_or_id


def describe() -> list[dict[str, Any]]:
    """Plain data about every supported component, for `qcexport list --hf`."""
    return [{"name": s.name, "class": s.component_class, "model_types": list(s.model_types),
             "summary": s.summary, "inputs": list(s.input_names),
             "outputs": list(s.outputs) if s.outputs else ["(every tensor output)"],
             "dynamic_axes": {k: {str(a): n for a, n in v.items()}
                              for k, v in s.dynamic_axes.items()},
             "golden_cases": [c.name for c in s.golden_cases]}
            for s in (components.get(n) for n in components.names())]
