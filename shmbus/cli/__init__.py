"""The ``shmbus`` command: one module per subcommand family, :func:`main` the entry point."""

from .main import main

__all__ = ["main"]
