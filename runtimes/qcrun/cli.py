"""The ``qcrun`` command: a thin click shell over targets, golden reading and parity.

The commands live in ``qcrun.commands`` (one module each); the options they share with
``qcexport`` live in ``qcrun.clikit``. Only the command modules print or exit. A UserError
becomes ``error: <message>`` on stderr and exit status 1, without a traceback; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import click

from qcrun.clikit import UserErrorGroup
from qcrun.commands.inspect import inspect_command
from qcrun.commands.profile import profile_command
from qcrun.commands.targets import targets
from qcrun.commands.verify import verify

COMMANDS = (targets, verify, inspect_command, profile_command)


@click.group(cls=UserErrorGroup)
@click.version_option(package_name="qcrun")
def main():
    """Run qcexport models on edge runtimes and check them against golden data."""


for command in COMMANDS:
    main.add_command(command)


if __name__ == "__main__":
    main()
