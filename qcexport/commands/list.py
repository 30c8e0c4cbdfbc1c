"""``qcexport list``: the mechanisms (or, with --hf, the Hugging Face components)."""

from __future__ import annotations

import json

import click
from qcrun.clikit import json_flag_option


@click.command("list")
@json_flag_option()
@click.option("--hf", "hf", is_flag=True,
              help="List the Hugging Face components (convert --hf PATH --component NAME).")
def list_command(as_json: bool, hf: bool):
    """The mechanisms, their presets, parameter counts, inputs and dynamic axes."""
    from qcexport import mechanisms

    if hf:
        _list_hf(as_json)
        return

    rows = [mechanisms.describe(name) for name in mechanisms.names()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        params = ", ".join(f"{p} {_count(v['parameters'])}" for p, v in row["presets"].items())
        click.echo(f"{row['name']:<20} {row['summary']}")
        click.echo(f"{'':<20} presets: {params}")
        axes = "; ".join(
            f"{name}[{', '.join(f'{a}:{n}' for a, n in ax.items())}]"
            for name, ax in row["dynamic_axes"].items() if name in row["inputs"]
        )
        click.echo(f"{'':<20} inputs: {', '.join(row['inputs'])}  dynamic: {axes}")
        click.echo(f"{'':<20} outputs: {', '.join(row['outputs'])}  ({row['source']})")


def _list_hf(as_json: bool) -> None:
    from qcexport.hf import describe

    rows = describe()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']:<22} {row['class']} (from {'/'.join(row['model_types'])} "
                   "models)")
        click.echo(f"{'':<22} {row['summary']}")
        axes = "; ".join(f"{name}[{', '.join(f'{a}:{n}' for a, n in ax.items())}]"
                         for name, ax in row["dynamic_axes"].items())
        click.echo(f"{'':<22} inputs: {', '.join(row['inputs'])}  dynamic: {axes}")
        click.echo(f"{'':<22} outputs: {', '.join(row['outputs'])}")
    click.echo("\nqcexport convert --hf PATH_OR_ID --component NAME  (needs pip install "
               "'qcexport[hf]')")


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"
