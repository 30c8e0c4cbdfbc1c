"""The bundle stage: an exported model directory -> a bundle for one target.

    make_bundle("out/qformer-tiny", "jetson-orin", output="qformer.bundle")

A bundle carries to a device, with no torch there, everything needed to run the model and
prove it is still right (the format is ``qcrun.bundle``'s, which reads it):

1. the model in the attention form and opset the target accepts. A model whose form the
   target cannot read (jetson-orin and ort-tensorrt need the decomposed opset-17 graph,
   because TensorRT 10.3 parses no ``Attention``) is exported again from the golden set's
   weights -- after checking that they are the model's weights (same weights hash) -- and
   quantized again when a reduced precision is asked for;
2. a golden subset: cases copied from the golden set, with a manifest listing only those;
3. the host's tolerance policy (qcrun's built-in one, or ``policy_file``), written out in full
   (target overrides included): a device that trusts the bundle's signature judges with the
   host's numbers whatever qcrun version it has; an unsigned bundle is judged by the
   device's own policy;
4. input and output specs with their dynamic axes, and TensorRT min/opt/max ranges for every
   dynamic axis (from the golden cases, widened with ``profile_shapes``);
5. provenance: mechanism, config, weights hash, toolkit and exporter versions, and the parity
   records of the bundled model on every host target that can run it -- a model that fails
   on the host is not bundled;
6. ``bundle.json`` with the sha256 of every file (and of itself), and with ``sign`` an
   Ed25519 signature of it (``bundle.sig``), which lets a device trust the recorded policy.

Nothing is written until everything passed; the bundle directory is renamed into place, an
archive is written under a temporary name and renamed. An existing output is replaced only
when it is provably a bundle this tool wrote (``qcrun.bundle.foreign_content``: every file in
it listed in its bundle.json with that content); anything else, e.g. a file the user added to
an older bundle, is a refusal naming it, never a deletion. A write that fails (a full disk)
leaves the old output as it was and no temporary behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qcrun import bundle as fmt
from qcrun import signing
from qcrun.errors import UserError, unknown_choice
from qcrun.files import ModelDir, manifest_json, read_model_dir, write_atomic
from qcrun.golden import MANIFEST as GOLDEN_MANIFEST
from qcrun.golden import GoldenSet, SubsetOf, file_sha256, golden_manifest_json, load_golden
from qcrun.parity import ParityReport, TolerancePolicy, environment, policy_for, run_parity
from qcrun.schema import dump, inside
from qcrun.targets import (
    Target,
    axis_ranges_from_shapes,
    get_target,
    list_targets,
    tensorrt_provider_options,
)

from qcexport.export.pipeline import MANIFEST_FILE, MODEL_FILE
from qcexport.replace import replace_dir
from qcexport.stages import StageCallback, StageRunner

#: Not a host parity target by default: a slow pure-Python second opinion, not a runtime.
NOT_HOST_BY_DEFAULT = ("onnx-reference",)
_VERSIONED = ("qcexport", "qcrun", "torch", "onnx", "onnxscript", "onnxsim", "onnxruntime",
              "onnxruntime-gpu", "openvino", "numpy")


@dataclass
class BundleResult:
    path: Path  # the bundle directory, or the archive
    manifest: dict[str, Any]  # bundle.json as written
    rebuilt: str | None  # why the model was exported again or quantized; None: copied as is
    host_parity: ParityReport
    timings: dict[str, float] = field(default_factory=dict)
    signed_by: str | None = None  # key id of the signature in bundle.sig; None: unsigned

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    @property
    def size_bytes(self) -> int:
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(f["bytes"] for f in self.files.values())


# --- options ---------------------------------------------------------------------------------


def parse_shape_ranges(items: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """``["tokens=1:257:1025", "batch=1:1:8"]`` -> {axis: (min, opt, max)}."""
    ranges = {}
    for item in items:
        axis, _, text = item.partition("=")
        try:
            values = tuple(int(v) for v in text.split(":"))
        except ValueError:
            values = ()
        if not axis or len(values) != 3:
            raise UserError(f"--profile {item!r} is not AXIS=MIN:OPT:MAX", stage="bundle",
                            hint="e.g. --profile tokens=1:257:1025")
        ranges[axis.strip()] = values
    return ranges


def output_paths(output: str | Path, archive: bool) -> tuple[Path, str]:
    """(final path, bundle name). With ``archive``, NAME.bundle becomes NAME.bundle.tar.gz."""
    output = Path(output)
    if archive and not output.name.endswith(fmt.ARCHIVE_SUFFIXES):
        output = output.with_name(output.name + ".tar.gz")
    if not archive and output.name.endswith(fmt.ARCHIVE_SUFFIXES):
        raise UserError(f"-o {output} names an archive, but --archive was not given",
                        stage="bundle", hint="add --archive, or name a directory (NAME.bundle)")
    name = output.name
    for suffix in fmt.ARCHIVE_SUFFIXES:
        name = name.removesuffix(suffix)
    return output, name


def _check_output(final: Path, archive: bool) -> None:
    """Refuse, before any work, to replace anything that is not provably a bundle of ours."""
    if final.is_symlink():
        raise UserError(f"{final} is a symbolic link; refusing to replace it", stage="bundle",
                        hint="pass another -o")
    if archive and final.is_dir():
        raise UserError(f"{final} is a directory", stage="bundle",
                        hint="pass another -o for the archive")
    if not archive and final.exists() and not final.is_dir():
        raise UserError(f"{final} exists and is a file", stage="bundle",
                        hint="pass another -o (a directory name, e.g. NAME.bundle)")
    _require_replaceable(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=final.parent, prefix=".qcexport-probe-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {final.parent}: {e.strerror or e}", stage="bundle",
                        hint="choose a writable -o") from e


def _require_replaceable(final: Path) -> None:
    """Nothing at ``final``, an empty directory, or a bundle of ours, unchanged: else refuse,
    naming what would be lost."""
    if not final.exists() or (final.is_dir() and not any(final.iterdir())):
        return
    is_bundle, foreign = fmt.foreign_content(final)
    if not is_bundle:
        raise UserError(
            f"{final} exists and is not a bundle; refusing to replace it ({'; '.join(foreign)})",
            stage="bundle",
            hint="pass another -o, or move it away yourself: qcexport replaces only a bundle "
            "it wrote")
    if foreign:
        shown = ", ".join(foreign[:8]) + (f", and {len(foreign) - 8} more"
                                          if len(foreign) > 8 else "")
        raise UserError(
            f"{final} is a bundle, but holds what qcexport did not write there: {shown}; "
            "refusing to replace it (that would delete them)",
            stage="bundle",
            hint=f"move those files out of {final} (or pass another -o); a bundle is replaced "
            "only when every file in it is one bundle.json lists, with that content")


# --- the stage -------------------------------------------------------------------------------


def make_bundle(
    model_dir: str | Path,
    target: str,
    precision: str | None = None,
    output: str | Path | None = None,
    archive: bool = False,
    *,
    golden: str | Path | None = None,
    cases: int | Sequence[str] | None = None,
    profile_shapes: Mapping[str, Sequence[int]] | None = None,
    host_targets: Sequence[str] | None = None,
    on_stage: StageCallback | None = None,
    sign: str | Path | None = None,
    policy_file: str | Path | None = None,
    fix_axes: Mapping[str, int] | None = None,
    ov_cache: bool = False,
) -> BundleResult:
    """Build a bundle of ``model_dir`` for ``target``; see the module docstring.

    ``precision`` defaults to the model's. ``golden`` is the golden set to take cases from
    (default: the built-in one of the model's mechanism and preset, written from PyTorch eager
    into a temporary directory when there is none, e.g. for ``base``). ``cases``: every case
    (None), the first N, or case names. ``profile_shapes`` widens the TensorRT ranges per
    axis. ``host_targets``: where to run host parity (default: every target here that can run
    the bundle, except onnx-reference). ``sign``: an Ed25519 private key (PEM) to sign the
    bundle with. ``policy_file``: the tolerance policy of the host parity run and the one the
    bundle records (default qcrun's built-in policy; a model's manifest never sets it).
    ``fix_axes`` (role or label -> size): the bundle loads with those axes fixed; golden
    cases that contradict them are left out, with the reason, and a bundle left with none is
    refused. ``ov_cache``: an OpenVINO target's bundle also carries the compiled model.
    """
    model_dir = Path(model_dir)
    stage = StageRunner(on_stage)
    source_dir = _read_model_dir(model_dir)
    manifest = dump(source_dir.manifest)
    t = get_target(target)
    precision = precision or manifest["precision"]
    key = signing.load_private_key(sign) if sign is not None else None
    from qcexport.optimize import check_target_precision

    check_target_precision(t.name, precision)
    final, name = output_paths(output or f"{model_dir.name}-{t.name}.bundle", archive)
    _check_output(final, archive)
    policy = _materialised_policy(policy_for(precision, policy_file=policy_file))

    with tempfile.TemporaryDirectory(prefix="qcexport-bundle-") as tmp:
        work = Path(tmp)
        gset, golden_note = stage("golden", _golden_set, manifest, golden, work / "golden-src",
                                  detail=lambda r: f"{len(r[0].cases)} cases from {r[1]}")
        # a golden set of other weights (or constants) is refused before anything runs
        source_dir.check_weights(gset)
        module = stage("weights", _golden_module, manifest, gset,
                       detail=lambda m: "weights hash matches the model" if m is not None
                       else "custom module: not rebuilt")
        model_src, rebuilt = stage(
            "model", _model_for_target, model_dir, manifest, module, t, precision, work,
            detail=lambda r: r[1] or "copied as exported")
        model = source_dir if model_src == model_dir else _read_model_dir(model_src)
        model_manifest = dump(model.manifest)
        fixed, cases, skipped = _fixed_cases(model_manifest, gset, cases, fix_axes or {})

        staging = None
        with _writing(final):
            try:
                staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
                files, subset, ranges, report = _staged(
                    stage, model, model_manifest, staging, gset, cases, t, profile_shapes,
                    policy, precision, host_targets, fixed)
                _write_model_manifest(staging, model_manifest, t, policy)
                bundle_manifest = _bundle_manifest(
                    name, t, precision, model_manifest, manifest, model_dir, ranges, policy,
                    subset, gset, golden_note, rebuilt, report)
                bundle_manifest.update(_openvino_fields(stage, files, t, precision,
                                                        model_manifest, fixed, skipped, ov_cache))
                written, signed_by = stage("write", _finish, staging, bundle_manifest, final,
                                           archive, name, key, detail=lambda _: str(final))
            finally:
                if staging is not None and staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
    return BundleResult(final, written, rebuilt, report, stage.timings, signed_by)


def _staged(stage, model, model_manifest, staging: Path, gset, cases, t: Target,
            profile_shapes, policy, precision, host_targets, fixed):
    """Model (and IR), golden subset, shape ranges and host parity, in ``staging``."""
    _copy_model(model, staging)
    files = _carry_ir(model, model_manifest, staging, t)
    subset = stage("subset", _golden_subset, gset, cases, staging / fmt.GOLDEN_DIR,
                   detail=lambda g: ", ".join(c.name for c in g.cases))
    ranges = stage("profile", _shape_ranges, model_manifest, subset, t, profile_shapes or {},
                   detail=lambda r: ", ".join(f"{a}={'/'.join(map(str, v))}"
                                              for a, v in r.items()))
    report = stage("parity", _host_parity, files, subset, model_manifest, policy, precision, t,
                   host_targets, fixed, detail=lambda r: f"{r.counts()['pass']} passed, "
                   f"{r.counts()['skip']} skipped")
    return files, subset, ranges, report


def _openvino_fields(stage, files, t: Target, precision, model_manifest, fixed, skipped,
                     ov_cache) -> dict[str, Any]:
    """bundle.json's ``openvino``, ``fixed_axes`` and ``roles``."""
    return {
        "openvino": stage("openvino", openvino_entry, files, t, precision,
                          _fixed_options(model_manifest, fixed) if fixed else {}, ov_cache,
                          detail=_openvino_detail),
        "fixed_axes": {"axes": fixed, "skipped_cases": skipped} if fixed else None,
        "roles": model_manifest.get("roles"),
    }


@contextlib.contextmanager
def _writing(final: Path):
    """A full disk, a quota, a read-only place while writing the bundle: the old output
    stays, and the error says so."""
    try:
        yield
    except OSError as e:
        raise UserError(
            f"writing the bundle failed: {e.strerror or e}; "
            + (f"{final} was not replaced (it is as it was)" if final.exists()
               else f"nothing was written to {final}"),
            stage="bundle",
            hint=f"free space in {final.parent} (or pass another -o) and run it again",
        ) from None


def _read_model_dir(model_dir: Path) -> ModelDir:
    """The checked model directory (types, paths, every file's hash, the graph's precision),
    with what a bundle needs of its manifest."""
    return read_model_dir(model_dir, stage="bundle",
                          required=("mechanism", "attention", "opset"))


def _builtin(manifest: Mapping[str, Any]) -> bool:
    from qcexport import mechanisms

    return manifest.get("mechanism") in mechanisms.names()


def _golden_set(manifest, golden, scratch: Path) -> tuple[GoldenSet, str]:
    """The golden set the subset comes from, and where it came from (in words)."""
    from qcexport.golden import golden_path, write_golden

    name, preset = manifest["mechanism"], manifest.get("preset")
    if golden is not None:
        return (load_golden(golden, mechanism=name if _builtin(manifest) else None,
                            preset=preset), f"{golden}")
    directory = golden_path(name, preset)
    if directory is None:
        raise UserError(f"the model is a custom module ({name!r}): there is no built-in golden "
                        "set for it", hint="pass --golden DIR with golden data for this model")
    if (directory / GOLDEN_MANIFEST).is_file():
        return load_golden(directory, mechanism=name, preset=preset), str(directory)
    # No committed set (e.g. the base preset): write one from PyTorch eager, as `qcexport
    # golden` would, into the scratch directory.
    written = write_golden(name, preset, root=scratch)
    return (load_golden(written.path, mechanism=name, preset=preset),
            f"PyTorch eager, written for this bundle (no committed golden/{name}/{preset})")


def _golden_module(manifest, gset: GoldenSet):
    """The reference module with the model's config and the golden weights, checked to be the
    model's own weights; None for a custom module (it cannot be rebuilt here)."""
    if not _builtin(manifest):
        return None
    from qcexport.export.mechanism import module_from_golden
    from qcexport.export.pipeline import weights_sha256

    module = module_from_golden(gset, _config(manifest))
    wanted = manifest.get("weights_sha256")
    if wanted and weights_sha256(module) != wanted:
        raise UserError(
            f"the golden set {gset.path} holds other weights than the model (weights sha256 "
            f"{weights_sha256(module)[:16]}..., the model's {wanted[:16]}...): its outputs are "
            "not this model's",
            hint="pass --golden DIR with a golden set written for this model's weights, or "
            "bundle a model converted from the registry (`qcexport convert NAME`)",
        )
    return module


def _model_for_target(model_dir: Path, manifest, module, target: Target, precision: str,
                      work: Path) -> tuple[Path, str | None]:
    """The directory of the model to bundle: the given one when the target reads it as it is,
    else one exported and/or quantized again. Returns (dir, why it was rebuilt, or None)."""
    form_ok = (target.accepts_attention(manifest["attention"])
               and int(manifest["opset"]) <= target.max_opset)
    if form_ok and precision == manifest["precision"]:
        return model_dir, None
    reasons = []
    if not form_ok:
        reasons.append(f"exported again as {target.preferred_attention!r} attention: "
                       f"{target.name} reads {'/'.join(target.attention_forms)} attention up to "
                       f"opset {target.max_opset}, the model is {manifest['attention']!r} opset "
                       f"{manifest['opset']}")
    if precision != manifest["precision"]:
        reasons.append(f"quantized to {precision} (the model is {manifest['precision']})")
    reason = "; ".join(reasons)
    if module is None:
        raise UserError(
            f"the model must be rebuilt for {target.name} ({reason}), and a custom module "
            "cannot be rebuilt from its manifest",
            hint=f"convert it for the target: `qcexport convert --module PKG.MOD:FACTORY "
            f"--target {target.name}` (and `qcexport quantize` for {precision}), then bundle that",
        )
    method = (manifest.get("quantization") or {}).get("method") or "minmax"
    calibration = manifest.get("calibration") or {}
    if precision == "int8-static" and calibration.get("source") not in (None, "factory"):
        raise UserError(
            f"the model must be rebuilt ({reason}) and it was calibrated with "
            f"{calibration['source']}, which the bundle step does not have",
            hint=f"quantize the {target.name} export yourself: `qcexport convert NAME --target "
            f"{target.name} -o DIR` then `qcexport quantize DIR --precision {precision} "
            "--calibration FILE`, and bundle that",
        )
    if form_ok and manifest["precision"] == "fp32":
        fp32_dir = model_dir
    else:
        fp32_dir = _reexport(manifest, module, target, work / "fp32")
        if form_ok:  # only the precision changes, but the fp32 source is not at hand
            reason = f"exported again in fp32 and {reason}"
    if precision == "fp32":
        return fp32_dir, reason
    from qcexport.optimize import quantize_model_dir

    quantize_model_dir(fp32_dir, precision, work / precision, target=target.name, method=method)
    if precision == manifest["precision"]:
        reason += f"; quantized again to {precision}" + (
            f" ({method} calibration)" if precision == "int8-static" else "")
    return work / precision, reason


def _config(manifest: Mapping[str, Any]):
    """The config of a built-in mechanism's model, as its manifest recorded it."""
    from qcexport import mechanisms

    spec = mechanisms.get(manifest["mechanism"])
    return spec.saved_config(manifest.get("config"), manifest.get("preset"))


def _reexport(manifest, module, target: Target, out: Path) -> Path:
    """Export the (golden-weights) module again in the target's preferred form; verified.
    The module is handed over: the caller does not use it again."""
    from qcexport import mechanisms
    from qcexport.export.mechanism import export_spec_module

    maps = manifest.get("attention_maps")
    result = export_spec_module(
        mechanisms.get(manifest["mechanism"]), _config(manifest), module,
        preset=manifest.get("preset"), maps_heads=maps.get("heads", "mean") if maps else None,
        target=target.name, attention="auto", output_dir=out)
    return result.path.parent


def _copy_model(model: ModelDir, staging: Path) -> None:
    """The model and the files it reads (external data), each checked to lie inside the
    model directory, into the same relative places in ``staging``."""
    where = f"model manifest {model.path / MANIFEST_FILE}"
    cut = model.manifest.split  # a split model's context and query graphs travel with it
    split_files = (cut.context_model, cut.query_model) if cut is not None else ()
    for name in (model.manifest.model, *model.manifest.files_sha256, *split_files):
        source = inside(model.path, name, where=where, field="file", stage="bundle")
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, staging / name)
        os.chmod(staging / name, 0o644)


def _golden_subset(gset: GoldenSet, cases, out: Path) -> GoldenSet:
    """Copy the chosen cases of ``gset`` into ``out`` with a manifest listing only those.

    The weights are left out (the model carries them; their hash stays in provenance).
    """
    names = [c.name for c in gset.cases]
    if cases is None:
        chosen = names
    elif isinstance(cases, int):
        if cases < 1:
            raise UserError(f"--cases {cases}: a bundle needs at least one golden case",
                            hint=f"pass a number from 1 to {len(names)}, or case names")
        chosen = names[:cases]
    else:
        chosen = list(dict.fromkeys(cases))
        for case in chosen:
            if case not in names:
                raise unknown_choice("golden case", case, names, flag="--cases")
    out.mkdir(parents=True)
    entries = [e for e in gset.manifest.cases if e.name in chosen]
    # the chosen cases' stored module outputs (golden --with-intermediates) come along
    modules = [e for e in gset.manifest.intermediates or () if e.case in chosen]
    where = f"golden manifest {gset.path / GOLDEN_MANIFEST}"
    for file in [e.file for e in entries] + [e.file for e in modules]:
        source = inside(gset.path, file, where=where, field="case file", stage="bundle")
        (out / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out / file)
        os.chmod(out / file, 0o644)
    weights = gset.manifest.weights
    manifest = dataclasses.replace(
        gset.manifest, weights=None, cases=entries, intermediates=modules or None,
        subset_of=SubsetOf(cases=names, weights_file_sha256=weights.sha256 if weights else None))
    write_atomic(out / GOLDEN_MANIFEST, golden_manifest_json(manifest))
    os.chmod(out / GOLDEN_MANIFEST, 0o644)
    return load_golden(out, mechanism=gset.mechanism, preset=gset.preset)


def _shape_ranges(manifest, subset: GoldenSet, target: Target, widen
                  ) -> dict[str, tuple[int, int, int]]:
    """min/opt/max per symbolic axis: the golden cases' sizes, replaced per axis by ``widen``;
    every golden case must stay inside (the device runs them on TensorRT too)."""
    shapes = {s["name"]: list(s["shape"]) for s in manifest["inputs"]}
    axes = fmt.spec_axes(manifest["inputs"])
    observed = [{k: v.shape for k, v in case.inputs.items()} for case in subset.cases]
    ranges = axis_ranges_from_shapes(shapes, observed)
    unknown = sorted(set(widen) - set(axes))
    if unknown:
        raise UserError(f"--profile names axes {', '.join(unknown)}, which no input has "
                        f"(the model's dynamic axes: {', '.join(axes) or 'none'})",
                        hint="name one of the model's dynamic axes")
    for axis, values in widen.items():
        low, opt, high = (int(v) for v in values)
        if not 1 <= low <= opt <= high:
            raise UserError(f"--profile {axis}={low}:{opt}:{high} is not 1 <= MIN <= OPT <= MAX",
                            hint="e.g. --profile tokens=1:257:1025")
        seen = ranges.get(axis)
        if seen and (seen[0] < low or seen[2] > high):
            raise UserError(
                f"--profile {axis}={low}:{opt}:{high} leaves out golden cases with {axis} from "
                f"{seen[0]} to {seen[2]}, which verify runs on the device",
                hint=f"widen it to include {seen[0]}..{seen[2]}")
        ranges[axis] = (low, opt, high)
    if target.needs_shape_ranges:
        # The same pure function the adapter calls on the device: an axis without a range is
        # an error here, on the host, not on the Jetson.
        tensorrt_provider_options(shapes, ranges, cache_dir=".")
    return {axis: tuple(ranges[axis]) for axis in axes if axis in ranges}


def _materialised_policy(base: TolerancePolicy) -> TolerancePolicy:
    """The host's policy with every target's overrides written in: a device that
    trusts the bundle's signature then judges with these numbers on any qcrun version
    (``use_target_settings`` off)."""
    targets = {name: {s: dict(f) for s, f in scopes.items()}
               for name, scopes in base.targets.items()}
    for t in list_targets():
        for precision, fields in t.tolerance_overrides.items():
            scopes = targets.setdefault(t.name, {})
            # resolve applies the target's, then "*", then the precision: keep that order.
            scopes[precision] = {**fields, **scopes.get("*", {}), **scopes.get(precision, {})}
    return TolerancePolicy(defaults=dict(base.defaults), targets=targets,
                           outputs={k: dict(v) for k, v in base.outputs.items()},
                           use_target_settings=False)


def _host_targets(bundle_target: Target, manifest, precision: str, host_targets) -> list[str]:
    def incompatible(t: Target) -> bool:
        return (not t.accepts_attention(manifest["attention"])
                or int(manifest["opset"]) > t.max_opset or precision not in t.precisions)

    if host_targets:
        names = [get_target(n).name for n in host_targets]
        bad = [n for n in names if incompatible(get_target(n))]
        if bad:
            raise UserError(f"host target(s) {', '.join(bad)} cannot run the bundled model "
                            f"({manifest['attention']!r} attention, opset {manifest['opset']}, "
                            f"{precision})", hint="drop them from --host-targets")
        return names
    return [t.name for t in list_targets()
            if t.name not in NOT_HOST_BY_DEFAULT and not incompatible(t)]


def _host_parity(model, subset: GoldenSet, manifest, policy, precision, target: Target,
                 host_targets, fixed=None) -> ParityReport:
    names = _host_targets(target, manifest, precision, host_targets)
    options = {n: _fixed_options(manifest, fixed) for n in names} if fixed else None
    report = run_parity(model, subset, names, policy, precision,
                        attention_form=manifest["attention"], options=options)
    if not report.passed:
        failures = "; ".join(r.describe() for r in report.failures()[:6])
        raise UserError(
            f"the bundled model fails parity on the host ({len(report.failures())} failing "
            f"checks): {failures}",
            stage="parity",
            hint="nothing was written; check the model with `qcexport parity MODEL_DIR`",
        )
    if not report.counts()["pass"]:
        raise UserError(
            f"no host target could run the bundled model ({', '.join(names)}: "
            + "; ".join(sorted({r.message for r in report.skips()})) + ")",
            stage="parity",
            hint="pass --host-targets with a target available here (see `qcrun targets`)",
        )
    return report


def _write_model_manifest(staging: Path, manifest, target: Target, policy) -> None:
    data = dict(manifest)
    data.update({"golden": fmt.GOLDEN_DIR, "tolerances": dump(policy), "target": target.name,
                 "model": MODEL_FILE})
    write_atomic(staging / MANIFEST_FILE, manifest_json(data))
    os.chmod(staging / MANIFEST_FILE, 0o644)


def _versions() -> dict[str, str]:
    found = {}
    for dist in _VERSIONED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[dist] = importlib.metadata.version(dist)
    return found


def _bundle_manifest(name, target: Target, precision, model_manifest, source_manifest,
                     model_dir: Path, ranges, policy: TolerancePolicy, subset: GoldenSet,
                     gset: GoldenSet, golden_note: str, rebuilt, report: ParityReport
                     ) -> dict[str, Any]:
    m = model_manifest
    return {
        "name": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "target": target.name,
        "target_description": target.description,
        "precision": precision,
        "attention": m["attention"],
        "opset": int(m["opset"]),
        "mechanism": m.get("mechanism"),
        "preset": m.get("preset"),
        "model": MODEL_FILE,
        "golden": fmt.GOLDEN_DIR,
        "inputs": m["inputs"],
        "outputs": m["outputs"],
        "dynamic_axes": m.get("dynamic_axes", {}),
        "profile_shapes": {axis: list(r) for axis, r in ranges.items()},
        "tolerances": dump(policy),
        "provenance": {
            "mechanism": m.get("mechanism"),
            "preset": m.get("preset"),
            "config": m.get("config"),
            "weights_sha256": m.get("weights_sha256"),
            "source_model": {
                "dir": str(model_dir.resolve()),
                "sha256": file_sha256(model_dir / MODEL_FILE),
                "attention": source_manifest["attention"],
                "opset": source_manifest["opset"],
                "precision": source_manifest["precision"],
            },
            "rebuilt": rebuilt,
            "exporter": {
                "versions": m.get("versions"),
                "attention": m["attention"],
                "opset": m["opset"],
                "fused_attention": m.get("fused_attention"),
                "verification": m.get("verification"),
                "quantization": m.get("quantization"),
                "calibration": m.get("calibration"),
                "accuracy_loss": m.get("accuracy_loss"),
            },
            "golden": {
                "source": golden_note,
                "writer": gset.manifest.writer,
                "seed": gset.manifest.seed,
                "versions": gset.manifest.versions,
                "weights_file_sha256": (gset.manifest.weights.sha256
                                        if gset.manifest.weights else None),
                "cases": [c.name for c in subset.cases],
                "of": [c.name for c in gset.cases],
            },
            "toolkit": _versions(),
            "host": environment(),
            "host_parity": report.to_dict(),
        },
    }


def _finish(staging: Path, manifest, final: Path, archive: bool, name: str, key
            ) -> tuple[dict[str, Any], str | None]:
    """bundle.json with every file's hash, signed with ``key`` when given; then the archive,
    or the directory renamed into place. An older bundle there is replaced only once the new
    one is complete, and only if it is still provably ours (checked again: the build took a
    while, and someone may have put a file into it meanwhile)."""
    os.chmod(staging, 0o755)
    for directory in (p for p in staging.rglob("*") if p.is_dir()):
        os.chmod(directory, 0o755)
    written = fmt.write_manifest(staging, manifest)
    signed_by = None
    if key is not None:
        signed_by = fmt.write_signature(staging, key).key_id
        os.chmod(staging / fmt.SIGNATURE_FILE, 0o644)
    with fmt.open_bundle(staging) as bundle:  # what the device will do, before it leaves
        check = bundle.verify()
        if key is not None:
            bundle.authenticate(trusted_keys=[key.public_key()])
    if not check.ok or check.extra:
        raise RuntimeError(f"freshly written bundle does not verify: {dump(check)}")
    if archive:
        _require_replaceable(final)
        fmt.pack_archive(staging, final, arcname=name)
    else:
        replace_dir(staging, final, _require_replaceable)
    return written, signed_by


# --- OpenVINO IR, its compiled-model cache, fixed axes ---------------------------------------


def _fixed_options(manifest, fixed: Mapping[str, int]) -> dict[str, Any]:
    return {"fix_axes": dict(fixed),
            "input_shapes": {s["name"]: list(s["shape"]) for s in manifest["inputs"]}}


def _fixed_cases(manifest, gset: GoldenSet, cases, fix_axes: Mapping[str, int]):
    """(fixed axes by label, the cases to carry, the cases left out -> why). A golden case
    whose shape contradicts a fixed axis cannot run on the fixed model: it is left out with
    the reason (recorded in the bundle); a bundle with no case left proves nothing, and is
    refused."""
    if not fix_axes:
        return {}, cases, {}
    from qcrun.ir import contradicting_cases, resolve_fix_axes

    shapes = {s["name"]: list(s["shape"]) for s in manifest["inputs"]}
    fixed = resolve_fix_axes(fix_axes, shapes, manifest.get("roles"), flag="--fix-axis")
    found = [(c.name, {k: v.shape for k, v in c.inputs.items()}) for c in gset.cases]
    skipped = contradicting_cases(found, shapes, fixed)
    names = [c.name for c in gset.cases]
    wanted = (names if cases is None else names[:cases] if isinstance(cases, int)
              else list(cases))
    kept = [n for n in wanted if n not in skipped]
    if not kept:
        raise UserError(
            f"--fix-axis {', '.join(f'{a}={v}' for a, v in fixed.items())}: no golden case is "
            f"left to verify the bundle ({'; '.join(f'{n}: {w}' for n, w in skipped.items())})",
            stage="bundle", hint="fix the axes at a size a golden case has, or pass --golden "
            "with cases of that size")
    return fixed, kept, {n: w for n, w in skipped.items() if n in wanted}


def _carry_ir(model: ModelDir, manifest: dict[str, Any], staging: Path, target: Target):
    """The model's files in the bundle (``qcrun.ir.ModelFiles``). A target whose engine
    reads IR gets IR: the model directory's own (checked by its hashes), else converted from
    the bundled ONNX here; ``manifest`` (the bundle's model manifest) records it."""
    from qcrun.engines import engine_of
    from qcrun.ir import IR_XML, ModelFiles

    onnx = staging / MODEL_FILE
    if "ir" not in engine_of(target).formats:
        manifest.pop("ir", None)
        return ModelFiles(onnx, None, "the bundled model")
    from qcexport.ir import _version, ir_from_onnx

    if model.ir is not None:
        for name in (model.manifest.ir.xml, model.manifest.ir.bin):
            shutil.copyfile(model.path / name, staging / name)
        entry = dump(model.manifest.ir)
    else:
        xml, weights = ir_from_onnx(onnx, staging)
        entry = {"xml": xml.name, "xml_sha256": file_sha256(xml), "bin": weights.name,
                 "bin_sha256": file_sha256(weights), "source_sha256": file_sha256(onnx),
                 "openvino": _version("openvino")}
    for name in (entry["xml"], entry["bin"]):
        os.chmod(staging / name, 0o644)
    manifest["ir"] = entry
    return ModelFiles(onnx, staging / IR_XML, "the bundled model")


def openvino_entry(files, target: Target, precision: str, fixed: Mapping[str, Any],
                   cache: bool) -> dict[str, Any] | None:
    """bundle.json's ``openvino``: the IR, and with ``cache`` the model compiled here for the
    target (``ov-cache/``); with the seconds each way of loading took here (ONNX, IR, the
    cache: one measurement each, a hint; scripts/bench_load.py measures properly)."""
    if files.ir is None:
        if cache:
            raise UserError(f"--ov-cache: {target.name} does not run on OpenVINO, which is "
                            "the engine whose compiled models the cache holds",
                            stage="bundle", hint="drop --ov-cache, or bundle for openvino-cpu")
        return None
    from qcrun.engines import adapter_for, engine_of
    from qcrun.ir import IR_BIN

    staging = files.ir.parent
    options: dict[str, Any] = {"precision": precision, **fixed}  # fixed: _fixed_options
    entry: dict[str, Any] = {"xml": files.ir.name, "bin": IR_BIN, "host_load_s": {}}
    for how, path in (("onnx", files.onnx), ("ir", files.ir)):
        with adapter_for(path, target, **options) as adapter:
            entry["host_load_s"][how] = round(adapter.load_seconds, 4)
    entry["openvino"] = _ov_version()
    if cache:
        (staging / OV_CACHE).parent.mkdir(parents=True, exist_ok=True)
        entry["cache"] = OV_CACHE
        entry["cache_settings"] = engine_of(target).write_compiled_cache(
            files.ir, target, options, staging / OV_CACHE)
        os.chmod(staging / OV_CACHE, 0o644)
        with adapter_for(files.ir, target, **options, compiled_blob=str(staging / OV_CACHE),
                         compiled_config=entry["cache_settings"]) as adapter:
            if adapter.cache_state != "used":  # the writer's own settings: a bug if not
                raise RuntimeError(f"fresh compiled-model cache not used: {adapter.cache_state}")
            entry["host_load_s"]["cached"] = round(adapter.load_seconds, 4)
    return entry


#: Where a bundle keeps OpenVINO's compiled model (the compiled-model cache).
OV_CACHE = "ov-cache/model.blob"


def _ov_version() -> str | None:
    from qcexport.ir import _version

    return _version("openvino")


def _openvino_detail(entry) -> str:
    if entry is None:
        return "no IR (the target reads ONNX)"
    times = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in entry["host_load_s"].items())
    return f"IR{' + compiled-model cache' if entry.get('cache') else ''}; load here: {times}"
