"""The ``qcexport`` command: a thin click shell over the stages.

The commands live in ``qcexport.commands`` (one module each); the options they share with
``qcrun`` live in ``qcrun.clikit``. Only the command modules print or exit. A UserError ends
the program with ``error: <message>`` and exit status 1, without a traceback; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import click
from qcrun.clikit import UserErrorGroup

from qcexport.commands.bundle import bundle
from qcexport.commands.convert import convert
from qcexport.commands.diff import diff
from qcexport.commands.golden import golden
from qcexport.commands.inspect import inspect
from qcexport.commands.ir import ir
from qcexport.commands.keygen import keygen
from qcexport.commands.list import list_command
from qcexport.commands.matrix import matrix
from qcexport.commands.parity import parity
from qcexport.commands.profile import profile
from qcexport.commands.quantize import quantize

COMMANDS = (list_command, convert, quantize, ir, golden, parity, inspect, profile, bundle,
            keygen, matrix, diff)


@click.group(cls=UserErrorGroup)
@click.version_option(package_name="qcexport")
def main():
    """Export query-conditioned visual attention modules to ONNX and prove them on edge runtimes."""


for command in COMMANDS:
    main.add_command(command)


if __name__ == "__main__":
    main()
