"""The ``qcrun`` subcommands, one module each; ``qcrun.cli`` registers them on its group."""
