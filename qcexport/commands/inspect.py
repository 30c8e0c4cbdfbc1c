"""``qcexport inspect``: attention heatmaps, query specialisation, gates, routing, m sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import click
from qcrun.clikit import json_flag_option, output_option
from qcrun.diagnostics import DEFAULT_THRESHOLD, format_summary

HEAD_CHOICES = ("mean", "each")


@click.command("inspect")
@click.argument("model")
@click.option("--preset", default="tiny", show_default=True, help="With a mechanism NAME.")
@click.option("--case", "cases", multiple=True,
              help="Golden case of the mechanism (repeatable, or 'all'); default: the first "
              "(every case for routing, to compare the tasks).")
@click.option("--image", type=click.Path(path_type=Path),
              help="Image to overlay the heatmaps on. Without --features, the visual features "
              "are a stand-in computed from its pixels.")
@click.option("--features", type=click.Path(path_type=Path),
              help="Visual features of one image as .npy [tokens, dim] (a real encoder's).")
@click.option("--text", "texts", multiple=True,
              help="Text conditioning (repeatable, one case each): the prompt of a qformer, "
              "the task query of routing.")
@click.option("--grid", metavar="ROWSxCOLS",
              help="Patch grid of the visual tokens (default: square, or square + CLS).")
@click.option("--map-heads", "heads", type=click.Choice(HEAD_CHOICES), default="mean",
              show_default=True, help="With a NAME: maps averaged over heads, or per head.")
@click.option("--target", default="ort-cpu", show_default=True,
              help="With a MODEL_DIR: the target the model runs on.")
@click.option("--sample", type=int, default=0, show_default=True,
              help="Row of the batch to analyse and draw.")
@click.option("--threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True,
              help="Cosine at or above which two queries are near-duplicates.")
@click.option("--size", "sizes", multiple=True, metavar="AXIS=N",
              help="With a split MODEL_DIR: the bytes of one context at these axis sizes "
              "(e.g. tokens=1025) instead of the golden cases' shapes.")
@output_option("Output directory: index.html, metrics.json, img/.", file_okay=False,
               required=True)
@json_flag_option("Print the metrics as JSON only.")
def inspect(model, preset, cases, image, features, texts, grid, heads, target, sample,
            threshold, sizes, output, as_json):
    """Render what the queries of MODEL attend to, and how specialised they are.

    MODEL is a mechanism name (run in PyTorch eager) or a model directory exported with
    `qcexport convert NAME --with-attention-maps` (run on --target). Writes PNG heatmaps per
    query over the visual token grid, cosine matrices, an index.html that shows them (open it
    offline) and metrics.json with every number. A model split with `--split context` also
    shows its cut: context inputs, boundary tensors, query inputs, nodes per graph and the
    bytes of one context (without attention maps, that is all it shows).
    """
    from qcrun.diagnostics import parse_sizes
    from qcrun.schema import dump

    from qcexport.diagnostics.collect import inspect_source
    from qcexport.diagnostics.render import check_output_dir, render_report
    from qcexport.export.save import prepare_output_dir
    from qcexport.split.model_dir import inspect_split

    out_dir = prepare_output_dir(output)  # clean errors before any work
    check_output_dir(out_dir)
    split = inspect_split(model, target, cases, parse_sizes(sizes))
    if split is not None and not split[0].manifest.attention_maps:
        _show_split(split[1], out_dir, as_json)
        return
    result = inspect_source(model, preset=preset, cases=cases, image=image, features=features,
                            texts=texts, grid=grid, heads=heads, target=target, sample=sample,
                            threshold=threshold)
    if split is not None:
        result.analysis["split"] = dump(split[1])
    index = render_report(out_dir, result.analysis, result.runs, result.descriptor,
                          image=result.image, grid=result.grid, title=result.title,
                          context=result.context)
    if as_json:
        click.echo(json.dumps(result.analysis, indent=1))
        return
    click.echo(format_summary(result.analysis))
    if split is not None:
        click.echo("\n".join(split[1].describe()))
    pngs = sum(1 for _ in (out_dir / "img").rglob("*.png"))
    click.echo(f"\nwrote {index} ({pngs} PNGs) and {out_dir / 'metrics.json'}")


def _show_split(info, out_dir: Path, as_json: bool) -> None:
    """A split model without attention maps: its cut, printed and written as metrics.json."""
    from qcrun.files import write_atomic
    from qcrun.schema import dump

    text = json.dumps({"split": dump(info)}, indent=1)
    write_atomic(out_dir / "metrics.json", (text + "\n").encode())
    click.echo(text if as_json else "\n".join(info.describe()))
    if not as_json:
        click.echo(f"\nwrote {out_dir / 'metrics.json'}")
