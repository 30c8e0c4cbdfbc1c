"""``qcexport bundle``: carry an exported model to a device, with the means to prove it there."""

from __future__ import annotations

import json
from pathlib import Path

import click
from qcrun.errors import UserError
from qcrun.targets import get_target, target_names


@click.command("bundle")
@click.argument("model_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--target", required=True,
              help=f"Target the bundle is for: {', '.join(target_names())}.")
@click.option("--precision", default=None,
              help="fp32, fp16, int8-dynamic or int8-static [default: the model's]; another "
              "precision than the model's exports and quantizes it again.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Bundle to write, e.g. qformer.bundle [default: MODEL_DIR-TARGET.bundle].")
@click.option("--archive", is_flag=True,
              help="Write one NAME.bundle.tar.gz instead of a directory.")
@click.option("--golden", "golden_path", type=click.Path(path_type=Path, file_okay=False),
              help="Golden set to take the cases from [default: the built-in one].")
@click.option("--cases", default=None,
              help="Golden cases to carry: comma-separated names, or N for the first N "
              "[default: all].")
@click.option("--profile", "profiles", multiple=True, metavar="AXIS=MIN:OPT:MAX",
              help="TensorRT shape range of a dynamic axis (repeatable), e.g. "
              "tokens=1:257:1025 [default: the golden cases' sizes].")
@click.option("--host-targets", default=None,
              help="Comma-separated targets for the host parity run [default: every target "
              "here that can run the bundle, but onnx-reference].")
@click.option("--json", "as_json", is_flag=True, help="Print the bundle manifest as JSON only.")
def bundle(model_dir: Path, target, precision, output, archive, golden_path, cases, profiles,
           host_targets, as_json):
    """Bundle MODEL_DIR for --target: model, golden subset, tolerances, specs, provenance.

    The model is exported again when the target needs another attention form or opset
    (jetson-orin and ort-tensorrt: decomposed, opset 17) or another precision; it is checked
    against the golden subset on every host target that can run it before anything is
    written. On the device, with no torch: `qcrun verify NAME.bundle`.
    """
    from qcexport.bundle import make_bundle, parse_profile

    chosen = _parse_cases(cases)
    ranges = parse_profile(profiles)
    hosts = [t.strip() for t in host_targets.split(",") if t.strip()] if host_targets else None

    def progress(stage: str, seconds: float, detail: str) -> None:
        if not as_json:
            click.echo(f"  {stage:<8} {seconds:7.2f} s  {detail}".rstrip())

    if not as_json:
        click.echo(f"== bundle {model_dir} for {target}")
    result = make_bundle(model_dir, target, precision, output, archive, golden=golden_path,
                         cases=chosen, profile_shapes=ranges, host_targets=hosts,
                         on_stage=progress)
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
    if m["profile_shapes"] and get_target(m["target"]).needs_profile_shapes:
        click.echo("  TensorRT profile  " + ", ".join(
            f"{a}={'/'.join(map(str, r))}" for a, r in m["profile_shapes"].items()))
    click.echo(f"  golden    {len(m['provenance']['golden']['cases'])} cases: "
               f"{', '.join(m['provenance']['golden']['cases'])}")
    click.echo(f"  manifest  sha256 {m['manifest_sha256']}")
    click.echo(f"\non the device:  qcrun verify {result.path}")


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
