"""How the ``shmbus`` command reports an error: one line, ``shmbus SUB:
what happened; what to do``, exit status 1 (130 for Ctrl-C); the traceback
too with ``-v``/``--verbose`` or ``SHMBUS_DEBUG=1``."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback

from ..errors import CoordinatorRunning, CoordinatorUnavailable

__all__ = ["add_verbose", "debugging", "error_hint", "error_text", "report"]


def debugging(verbose: bool = False) -> bool:
    """Whether errors show their traceback: ``-v``/``--verbose``, or $SHMBUS_DEBUG set (not 0)."""
    return verbose or os.environ.get("SHMBUS_DEBUG", "0") not in ("", "0")


def error_text(exc: BaseException) -> str:
    """What went wrong, without the ``[Errno N]`` an OSError prints."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename is not None:
            text += f": {exc.filename}"
        return text
    return str(exc) or type(exc).__name__


def error_hint(exc: BaseException) -> str:
    """What to do about an error, where the message does not say it already."""
    if isinstance(exc, CoordinatorRunning):
        return "`shmbus ls` shows the buses in use; give another name with --bus"
    if isinstance(exc, CoordinatorUnavailable):
        return "is its coordinator running? `shmbus ls` lists the buses of this machine"
    if isinstance(exc, OSError):
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "it belongs to another user: run this as that user"
        if exc.errno == errno.ENOSPC:
            return "/dev/shm or the disk is full: `shmbus cleanup` removes what killed buses left"
    return ""


def add_verbose(p: argparse.ArgumentParser, top: bool = False) -> None:
    """``-v``/``--verbose`` on ``p``: on an error, its traceback too.

    Only ``top`` (the ``shmbus`` parser) sets the default: a subcommand's copy
    sets the flag when given and leaves the top one's value alone otherwise.
    """
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="on an error, print its traceback too (as does SHMBUS_DEBUG=1)",
    )


def report(prog: str, exc: BaseException, *, verbose: bool = False, hint: str = "") -> int:
    """Say in one line on stderr that ``exc`` stopped command ``prog``; returns
    the exit status: 130 for Ctrl-C, else 1.

    ``prog: message; hint``, and before it the traceback with ``-v`` or
    $SHMBUS_DEBUG=1 (a hint of the caller's own replaces the usual one).
    """
    if isinstance(exc, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    if debugging(verbose):
        traceback.print_exception(exc)
    hint = hint or error_hint(exc)
    print(f"{prog}: {error_text(exc)}" + (f"; {hint}" if hint else ""), file=sys.stderr)
    return 1
