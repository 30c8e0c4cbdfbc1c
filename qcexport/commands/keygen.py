"""``qcexport keygen``: an Ed25519 key pair for signing bundles."""

from __future__ import annotations

from pathlib import Path

import click
from qcrun import signing
from qcrun.clikit import output_option
from qcrun.errors import UserError


@click.command("keygen")
@output_option("Directory to write NAME.key (private) and NAME.pub into.", file_okay=False,
               required=True, dest="directory")
@click.option("--name", default="qcexport-signing", show_default=True,
              help="File name of the key pair, without suffix.")
def keygen(directory: Path, name: str):
    """Make an Ed25519 key pair for signing bundles (`qcexport bundle --sign DIR/NAME.key`).

    The private key (mode 600) stays on the host; copy NAME.pub to the devices, which trust
    it with `qcrun verify BUNDLE --trust NAME.pub` or `qcrun.load(..., trusted_keys=[...])`.
    Existing files are never overwritten. The same with openssl: `openssl genpkey -algorithm
    ed25519 -out NAME.key && openssl pkey -in NAME.key -pubout -out NAME.pub`.
    """
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"--name {name!r} is not a plain file name", stage="keygen",
                        hint="e.g. --name release-2026")
    private, public = signing.generate_keypair(directory, name)
    key = signing.load_public_key(public)
    click.echo(f"private key  {private}  (keep it on the host; mode 600)")
    click.echo(f"public key   {public}  (key id {signing.short_id(signing.key_id(key))})")
    click.echo(f"sign:    qcexport bundle MODEL_DIR --target T --sign {private}")
    click.echo(f"verify:  qcrun verify NAME.bundle --trust {public}")
