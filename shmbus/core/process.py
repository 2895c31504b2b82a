"""Whether a process is still there: for agents whose process may have died
without a word (no coordinator saw the connection close)."""

from __future__ import annotations

import os

__all__ = ["process_gone"]


def process_gone(pid: int) -> bool:
    """Has ``pid`` ended (gone, or a zombie nobody reaped yet)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # someone else's: alive
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True  # gone between the two looks
    return state in (b"Z", b"X")
