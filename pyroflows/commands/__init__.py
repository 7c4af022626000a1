"""Subcommands of the ``pyroflows`` command, one module each (``add_arguments``, ``run``)."""
