"""``qcexport golden``: write or refresh a golden set from PyTorch eager (a mechanism's, or
that of your own module or a Hugging Face component)."""

from __future__ import annotations

from pathlib import Path

import click
from qcrun.clikit import output_option
from qcrun.errors import UserError

from qcexport.commands.sources import load_factory, load_hf, output_names


@click.command("golden")
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True, help="Every registered mechanism.")
@click.option("--preset", default="tiny", show_default=True)
@click.option("--update", is_flag=True, help="Allow changing stored golden outputs.")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Golden root directory (default: the repository's golden/).")
@click.option("--module", "factory", metavar="PKG.MOD:FACTORY",
              help="Your own module, as for convert; a 4th item FACTORY() returns are its cases.")
@click.option("--hf", "hf_path", metavar="PATH_OR_ID",
              help="A Hugging Face save_pretrained directory (or hub id), with --component.")
@click.option("--component", default=None, help="With --hf: which component (qcexport list --hf).")
@output_option("With --module or --hf: the golden set's directory (new, empty or a set).")
@click.option("--outputs", "outputs", default=None, metavar="A,B",
              help="With --module or --hf: the outputs to keep, as given to convert.")
@click.option("--seed", default=0, show_default=True,
              help="With --module or --hf: offset of the seeds the cases are drawn with.")
@click.option("--with-intermediates", is_flag=True,
              help="Also store every PyTorch module's output of each case (hashed like the "
              "rest): `qcrun verify --localize` localises against them without torch.")
def golden(name, all_, preset, update, root, factory, hf_path, component, output, outputs, seed,
           with_intermediates):
    """Write or refresh the golden set of NAME (or --module, or --hf) from PyTorch eager."""
    from qcexport import mechanisms
    from qcexport.golden import golden_dir, write_golden

    if factory or hf_path or component:
        if name or all_:
            raise UserError("give NAME, --all, --module or --hf, not several",
                            hint="e.g. `qcexport golden --hf DIR --component qformer -o OUT`")
        _user_golden(factory, hf_path, component, output, outputs, seed, update,
                     with_intermediates)
        return
    if output or outputs:
        raise UserError("-o and --outputs are for --module and --hf",
                        hint="a mechanism's golden set goes to --root/NAME/PRESET")
    if bool(name) == bool(all_):
        raise UserError("give NAME or --all", hint=f"mechanisms: {', '.join(mechanisms.names())}")
    for mech in mechanisms.names() if all_ else [name]:
        try:
            result = write_golden(mech, preset, root=root, update=update,
                                  with_intermediates=with_intermediates)
        except OSError as exc:
            where = golden_dir(mech, preset, root)
            raise UserError(
                f"could not write the golden set {where}: {exc.strerror or exc}; "
                + _golden_state(where, mech, preset), stage="golden",
                hint=f"free disk space or choose another --root, then rerun `qcexport golden "
                f"{mech}`") from exc
        state = "written" if result.written else "unchanged"
        click.echo(f"{mech} ({preset}): {len(result.cases)} cases {state} in {result.path}")
        for change in result.changes:
            click.echo(f"  {change.describe()}")


def _golden_state(directory: Path, mech: str, preset: str) -> str:
    """What a golden directory holds after a failed write, found by reading it back."""
    from qcrun.golden import load_golden

    try:
        load_golden(directory, mechanism=mech, preset=preset)
    except (UserError, OSError):
        return f"{directory} does not hold a complete golden set now (its hashes reject it)"
    return f"{directory} holds a complete golden set (its hashes check out)"


def _user_golden(factory, hf_path, component, output, outputs, seed, update,
                 with_intermediates=False) -> None:
    """`qcexport golden --module F -o DIR` / `--hf PATH --component NAME -o DIR`."""
    from qcexport.golden import write_module_golden

    if bool(factory) == bool(hf_path):
        raise UserError("give one of --module or --hf", stage="golden",
                        hint="e.g. `qcexport golden --module mypkg.models:make -o out/golden`")
    if output is None:
        raise UserError("-o DIR is needed: where the golden set goes", stage="golden",
                        hint="e.g. -o out/golden-mymodel")
    names = output_names(outputs)
    if hf_path:
        from qcexport import hf

        label = f"{hf_path} ({component})"
        result = hf.write_golden(None, load_hf(hf_path, component), output, output_names=names,
                                 seed=seed, update=update,
                                 with_intermediates=with_intermediates)
    else:
        module, example, axes, cases = load_factory(factory, with_cases=True)
        label = factory
        result = write_module_golden(module, example, output, dynamic_axes=axes, cases=cases,
                                     output_names=names, seed=seed, update=update,
                                     source={"kind": "factory", "factory": factory},
                                     with_intermediates=with_intermediates)
    state = "written" if result.written else "unchanged"
    click.echo(f"{label}: {len(result.cases)} cases {state} in {result.path}")
    for change in result.changes:
        click.echo(f"  {change.describe()}")
