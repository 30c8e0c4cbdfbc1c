"""``qcrun inspect``: the query-conditioning numbers of a model exported with attention maps,
on this device, without torch."""

from __future__ import annotations

import json
from pathlib import Path

import click

from qcrun.clikit import golden_option, json_file_option, write_report
from qcrun.errors import UserError
from qcrun.golden import load_golden


@click.command("inspect")
@click.argument("model_dir", metavar="MODEL_DIR_OR_BUNDLE", type=click.Path(path_type=Path))
@click.option("--target", "target_name", default="ort-cpu", show_default=True,
              help="Target to run the model on.")
@golden_option("Golden set whose inputs to feed [default: manifest key 'golden', else "
               "MODEL_DIR/golden; random inputs when there is none].")
@click.option("--case", "cases", multiple=True,
              help="Golden case to run (repeatable; default all).")
@click.option("--random", "use_random", is_flag=True,
              help="Feed random inputs made from the manifest's input specs.")
@click.option("--size", "sizes", multiple=True, metavar="AXIS=N",
              help="Size of a symbolic axis for random inputs (e.g. tokens=257).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random inputs.")
@click.option("--sample", type=int, default=0, show_default=True, help="Row of the batch.")
@click.option("--grid", metavar="ROWSxCOLS", help="Patch grid of the visual tokens.")
@click.option("--threshold", type=float, default=0.95, show_default=True,
              help="Cosine at or above which two queries are near-duplicates.")
@json_file_option("Write every number as JSON to this file.")
def inspect_command(model_dir: Path, target_name, golden_dir, cases, use_random, sizes, seed,
                    sample, grid, threshold, json_path):
    """Query-conditioning numbers of a model exported with attention maps, without torch.

    Attention entropy per query, pairwise cosine of query outputs and attention maps with the
    near-duplicate queries, Flamingo gate values and visual share, routing choices and the
    Matryoshka m sweep: the numbers `qcexport inspect` draws, from the model on this device.
    """
    from qcrun import diagnostics as diag
    from qcrun.engines import open_adapter
    from qcrun.parity import LoadTime
    from qcrun.schema import dump

    source = diag.open_source(model_dir)
    golden = None
    if not use_random:
        if golden_dir is None:
            golden_dir = source.golden_dir
        if golden_dir is not None:
            manifest = source.manifest
            golden = load_golden(golden_dir,
                                 mechanism=manifest.mechanism if manifest.builtin else None,
                                 preset=manifest.preset)
    if cases and golden is None:
        raise UserError("--case needs a golden set, and none was found",
                        hint="pass --golden DIR, or drop --case to feed random inputs")
    split = _split_info(source, golden, cases, sizes, seed, target_name)
    if split is not None and not source.manifest.attention_maps:
        # a split model without attention maps: its cut is what there is to show
        click.echo("\n".join(split.describe()))
        if json_path:
            write_report(json_path, json.dumps({"source": str(model_dir), "split": dump(split)},
                                               indent=1) + "\n")
            click.echo(f"wrote {json_path}")
        return
    with open_adapter(source.model_for(target_name), target_name) as session:
        load = LoadTime(session.model_path.name, round(session.load_seconds, 4),
                        session.cache_state)
        descriptor = diag.require_maps(source.manifest, [o.name for o in session.outputs],
                                       str(model_dir))
        if golden is not None:
            feeds = diag.golden_feeds(golden, cases)
            fed = f"golden set {golden.path} ({len(feeds)} cases)"
        else:
            specs = source.manifest.input_specs()
            feeds = [("random", diag.random_feed(specs, descriptor,
                                                 sizes=diag.parse_sizes(sizes), seed=seed))]
            fed = f"random inputs (seed {seed})"
        runs, sweep = diag.run_all(descriptor, feeds, session.run)
    analysis = diag.analyse(descriptor, runs, sweep=sweep, sample=sample, threshold=threshold,
                            grid=diag.parse_grid(grid), source=f"{model_dir} on {target_name}")
    analysis["inputs"] = fed
    analysis["load"] = dump(load)
    if split is not None:
        analysis["split"] = dump(split)
    click.echo(f"{model_dir} on {target_name}, {fed}; loaded in {load.describe()}")
    click.echo(diag.format_summary(analysis))
    if split is not None:
        click.echo("\n".join(split.describe()))
    if json_path:
        write_report(json_path, json.dumps(analysis, indent=1) + "\n")
        click.echo(f"wrote {json_path}")


def _split_info(source, golden, cases, sizes, seed, target: str):
    """A split model's cut (``qcrun.context.SplitInfo``), one context per golden case, or
    at the --size axes (synthetic inputs, the first golden case setting the other axes); None
    for a model that is not split."""
    from qcrun import diagnostics as diag
    from qcrun.context import describe_split
    from qcrun.inputs import make_inputs

    if source.manifest.split is None:
        return None
    given = diag.parse_sizes(sizes)
    if golden is not None and not given:
        feeds = diag.golden_feeds(golden, cases)
    else:
        template = golden.cases[0].inputs if golden is not None and golden.cases else None
        label = " ".join(f"{k}={v}" for k, v in given.items()) or f"random inputs (seed {seed})"
        feeds = [(label, make_inputs(source.manifest.input_specs(), given, seed,
                                     template=template))]
    return describe_split(source.checked, feeds, target)
