"""``qcrun targets``: every target, whether it can run here, and why."""

from __future__ import annotations

import json

import click

from qcrun.clikit import json_flag_option
from qcrun.engines import availability
from qcrun.targets import list_targets


@click.command("targets")
@json_flag_option("Print the targets as JSON.")
def targets(as_json: bool):
    """List the targets, whether each can run here, and why."""
    rows = []
    for target in list_targets():
        ok, reason = availability(target)
        rows.append(
            {
                "name": target.name,
                "engine": target.engine,
                "available": ok,
                "reason": reason,
                "attention_forms": list(target.attention_forms),
                "max_opset": target.max_opset,
                "precisions": list(target.precisions),
                "description": target.description,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        state = "available  " if r["available"] else "unavailable"
        click.echo(f"{r['name'].ljust(width)}  {state}  {r['reason']}")
