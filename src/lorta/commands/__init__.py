"""Subcommands of the `lorta` CLI (see lorta.cli)."""
