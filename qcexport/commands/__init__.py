"""Subcommands of the qcexport CLI that live in their own modules."""
