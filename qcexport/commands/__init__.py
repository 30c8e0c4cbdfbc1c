"""The ``qcexport`` subcommands, one module each; ``qcexport.cli`` registers them on its group."""
