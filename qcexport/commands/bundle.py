"""``qcexport bundle``: carry an exported model to a device, with the means to prove it there."""

from __future__ import annotations

import json
from pathlib import Path

import click
from qcrun import signing
from qcrun.clikit import (
    golden_option,
    json_flag_option,
    output_option,
    policy_option,
    targets_option,
)
from qcrun.errors import UserError
from qcrun.parity import name_list
from qcrun.targets import get_target, target_names


@click.command("bundle")
@click.argument("model_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--target", required=True,
              help=f"Target the bundle is for: {', '.join(target_names())}.")
@click.option("--precision", default=None,
              help="fp32, fp16, int8-dynamic or int8-static [default: the model's]; another "
              "precision than the model's exports and quantizes it again.")
@output_option("Bundle to write, e.g. qformer.bundle [default: MODEL_DIR-TARGET.bundle].")
@click.option("--archive", is_flag=True,
              help="Write one NAME.bundle.tar.gz instead of a directory.")
@golden_option("Golden set to take the cases from [default: the built-in one].",
               dest="golden_path")
@click.option("--cases", default=None,
              help="Golden cases to carry: comma-separated names, or N for the first N "
              "[default: all].")
@click.option("--profile", "shape_ranges", multiple=True, metavar="AXIS=MIN:OPT:MAX",
              help="TensorRT shape range of a dynamic axis (repeatable), e.g. "
              "tokens=1:257:1025 [default: the golden cases' sizes].")
@targets_option("Targets for the host parity run (repeatable, or comma-separated) "
                "[default: every target here that can run the bundle, but onnx-reference].",
                flag="--host-target", dest="host_targets")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path, dir_okay=False),
              metavar="KEY",
              help="Sign bundle.json with this Ed25519 private key (PEM, from `qcexport keygen`): "
              "writes bundle.sig; a device checks it with `qcrun verify --trust KEY.pub`.")
@policy_option("Tolerance policy file for the host parity run, recorded in the bundle "
               "[default: qcrun's built-in policy for the precision].")
@click.option("--fix-axis", "fix_axes", multiple=True, metavar="AXIS=SIZE",
              help="Fix a symbolic axis (by role or label) at load time, e.g. tokens=257 "
              "(repeatable): golden cases of other sizes are left out, with the reason.")
@click.option("--ov-cache", is_flag=True,
              help="OpenVINO targets: also carry the model compiled here (faster first load; "
              "a cache that does not match only costs load time).")
@json_flag_option("Print the bundle manifest as JSON only.")
def bundle(model_dir: Path, target, precision, output, archive, golden_path, cases, shape_ranges,
           host_targets, sign_key, policy_file, fix_axes, ov_cache, as_json):
    """Bundle MODEL_DIR for --target: model, golden subset, tolerances, specs, provenance.

    The model is exported again when the target needs another attention form or opset
    (jetson-orin and ort-tensorrt: decomposed, opset 17) or another precision; it is checked
    against the golden subset on every host target that can run it before anything is
    written. On the device, with no torch: `qcrun verify NAME.bundle` (with --sign:
    `qcrun verify NAME.bundle --trust KEY.pub`). An existing -o is replaced only when it is a
    bundle this tool wrote, unchanged.
    """
    from qcexport.bundle import make_bundle, parse_shape_ranges

    chosen = _parse_cases(cases)
    ranges = parse_shape_ranges(shape_ranges)
    hosts = name_list(host_targets) or None

    def progress(stage: str, seconds: float, detail: str) -> None:
        if not as_json:
            click.echo(f"  {stage:<8} {seconds:7.2f} s  {detail}".rstrip())

    if not as_json:
        click.echo(f"== bundle {model_dir} for {target}")
    result = make_bundle(model_dir, target, precision, output, archive, golden=golden_path,
                         cases=chosen, profile_shapes=ranges, host_targets=hosts,
                         on_stage=progress, sign=sign_key, policy_file=policy_file,
                         fix_axes=_parse_fix_axes(fix_axes), ov_cache=ov_cache)
    if as_json:
        click.echo(json.dumps(result.manifest, indent=2))
        return
    m = result.manifest
    click.echo("\nhost parity:")
    click.echo("  " + result.host_parity.format_matrix().replace("\n", "\n  "))
    click.echo(f"\nbundle    {result.path}  ({len(result.files) + 1} files, "
               f"{result.size_bytes / 1e6:.2f} MB)")
    click.echo(f"  target    {m['target']}  ({m['precision']}, attention {m['attention']!r}, "
               f"opset {m['opset']})")
    if result.rebuilt:
        click.echo(f"  rebuilt   {result.rebuilt}")
    if m["profile_shapes"] and get_target(m["target"]).needs_shape_ranges:
        click.echo("  TensorRT profile  " + ", ".join(
            f"{a}={'/'.join(map(str, r))}" for a, r in m["profile_shapes"].items()))
    click.echo(f"  golden    {len(m['provenance']['golden']['cases'])} cases: "
               f"{', '.join(m['provenance']['golden']['cases'])}")
    if m.get("fixed_axes"):
        click.echo("  fixed     " + ", ".join(f"{a}={v}" for a, v in m["fixed_axes"]["axes"].items()))
        for case, why in m["fixed_axes"]["skipped_cases"].items():
            click.echo(f"  left out  {case}: {why}")
    click.echo(f"  manifest  sha256 {m['manifest_sha256']}  (pin it: --expect-sha256)")
    if result.signed_by:
        click.echo(f"  signed    by key {signing.short_id(result.signed_by)} (bundle.sig)")
        click.echo(f"\non the device:  qcrun verify {result.path} --trust "
                   f"{_public_key_hint(sign_key)}")
    else:
        click.echo("  signed    no (pass --sign KEY to let a device authenticate it)")
        click.echo(f"\non the device:  qcrun verify {result.path}")


def _parse_fix_axes(items) -> dict[str, int]:
    fixed = {}
    for item in items:
        axis, _, size = item.partition("=")
        if not axis.strip() or not size.strip().isdigit():
            raise UserError(f"--fix-axis {item!r} is not AXIS=SIZE", stage="bundle",
                            hint="e.g. --fix-axis tokens=257")
        fixed[axis.strip()] = int(size)
    return fixed


def _parse_cases(text: str | None):
    if text is None:
        return None
    text = text.strip()
    if text.isdigit():
        return int(text)
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise UserError("--cases is empty", stage="bundle",
                        hint="pass case names (comma-separated) or a number")
    return names


def _public_key_hint(private_key: Path) -> str:
    public = private_key.with_suffix(".pub")
    return str(public) if public.is_file() else "PUBKEY.pub"
