"""The exception tree: one base, never raised itself, and one return-code mapper.

Argument errors also inherit the builtin a caller would expect (``ValueError``,
``FileNotFoundError``, ``TimeoutError``), so generic handlers keep working.
Every message says what happened, the numbers involved and what to do.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import NoReturn


class ShmbusError(Exception):
    """Base of every error shmbus raises."""


class RingFull(ShmbusError):
    """A ring had no room for a frame before the timeout passed."""


class InboxFull(RingFull):
    """A recipient's inbox has no room, and the send's backpressure policy is
    "error": raised at once. Names the recipient and its fill level."""


class BackpressureTimeout(InboxFull, TimeoutError):
    """A recipient's inbox stayed full for the whole wait of a "block" send."""


class MessageTooLarge(ShmbusError, ValueError):
    """A frame is larger than the ring (or bus) accepts."""

    def __init__(self, size: int, limit: int, where: str = "ring") -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"frame of {size} bytes exceeds the limit of {limit} bytes of {where}; "
            "split it, or give the ring a larger capacity or max_frame"
        )


class CorruptFrame(ShmbusError):
    """A length or position in shared memory is impossible: the segment was overwritten."""


class BadSegment(ShmbusError):
    """The named segment is not a shmbus ring, or one of another layout version."""


class ForeignObject(ShmbusError, PermissionError):
    """Something of the bus that belongs to another user, or that others may
    open or replace: a shared-memory segment, a runtime directory, the socket
    of a coordinator or peer. shmbus never maps, uses or trusts it."""


class InvalidArgument(ShmbusError, ValueError):
    """An argument out of its range, or a call the object's state does not allow."""


class SystemFailure(ShmbusError, OSError):
    """A system call failed (a full /dev/shm, no memory, no permission, ...)."""


class InvalidName(ShmbusError, ValueError):
    """A name that cannot be used for a segment, agent, bus or topic."""


class NotFound(ShmbusError, FileNotFoundError):
    """Nothing exists under that name."""


class AlreadyExists(ShmbusError, FileExistsError):
    """Something already exists under that name."""


class Closed(ShmbusError, ValueError):
    """The object was closed; no operation is possible on it any more."""


class ClaimLost(ShmbusError, ValueError):
    """A claimed record was unblocked or overwritten before it was committed: not sent."""


class RingSealed(ShmbusError):
    """The ring is sealed: its reader left for good (an agent that left or
    died), so nothing more can be written to it. Not written."""


class ShmbusTimeout(ShmbusError, TimeoutError):
    """Base of the timeouts: a wait ended before anything came."""


class ReadTimeout(ShmbusTimeout):
    """Nothing arrived in a ring before the timeout passed."""


class RecvTimeout(ShmbusTimeout):
    """No message arrived for an agent before the timeout passed."""


class RequestTimeout(ShmbusTimeout):
    """No response came to a request before the timeout passed."""


class UnknownRecipient(ShmbusError, LookupError):
    """No live agent has that name on the bus."""


class NameTaken(ShmbusError, ValueError):
    """A live agent already has that name on the bus."""


class CoordinatorRunning(ShmbusError):
    """A coordinator already runs for that bus."""


class CoordinatorUnavailable(ShmbusError, ConnectionError):
    """No coordinator answers for that bus."""


class RejoinRefused(CoordinatorUnavailable):
    """A coordinator that took the bus over does not know this agent (it
    started a fresh bus, or gave the name to another): reconnect as new."""


class AgentExited(ShmbusError, ChildProcessError):
    """An agent process a Runner started ended before it joined the bus.

    ``name``: the agent; ``exitcode``: its exit code (negative: killed by
    that signal); ``reason``: what a spawned target's process said (the
    error that kept it off the bus), else ""; ``stderr``: the last lines of
    its stderr, when the runner saw them (a command's), else ``[]``.
    """

    def __init__(
        self,
        message: str,
        name: str,
        exitcode: int | None,
        stderr: list[str] | None = None,
        reason: str = "",
    ) -> None:
        self.name = name
        self.exitcode = exitcode
        self.stderr = list(stderr or [])
        self.reason = reason
        super().__init__(message)


class ReadyTimeout(ShmbusTimeout):
    """An agent process a Runner started had not joined the bus when its
    ``ready_timeout`` passed; ``name`` is the agent."""

    def __init__(self, message: str, name: str = "") -> None:
        self.name = name
        super().__init__(message)


class InvalidRunFile(ShmbusError, ValueError):
    """A run file (``shmbus run agents.toml``) that cannot be run; lists every problem."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


def os_error(err: int, what: str) -> ShmbusError:
    """Map an errno from a failed system call to the matching exception."""
    text = f"{what}: {os.strerror(err)}"
    if err == _errno.ENOENT:
        return NotFound(err, text)
    if err == _errno.EEXIST:
        return AlreadyExists(err, text)
    if err == _errno.ENAMETOOLONG:
        return InvalidName(text)
    return SystemFailure(err, text)


def raise_for(rc: int, what: str, *, err: int = 0, detail: str = "") -> NoReturn:
    """Raise the exception for a negative C return code (see shmbus_ring.h).

    ``what`` names the operation and object, ``detail`` adds the numbers.
    """
    from ._native import lib

    suffix = f" ({detail})" if detail else ""
    if rc == lib.SHMBUS_ECORRUPT:
        raise CorruptFrame(
            f"{what}: the ring's shared memory holds an impossible length or position{suffix}; "
            "it was overwritten by another process: recreate the ring"
        )
    if rc == lib.SHMBUS_EBADSEG:
        raise BadSegment(
            f"{what}: not a shmbus ring of layout version this build reads{suffix}; "
            "check the name, or remove the stale segment with `shmbus cleanup`"
        )
    if rc == lib.SHMBUS_EFOREIGN:
        raise ForeignObject(
            f"{what}: the segment belongs to another user or is open to others (not mode "
            "0600): refused, it is never mapped"
        )
    if rc == lib.SHMBUS_ESYS:
        raise os_error(err, what)
    if rc == lib.SHMBUS_ETIMEDOUT:
        raise ReadTimeout(f"{what}: timed out{suffix}")
    if rc == lib.SHMBUS_EINVAL:
        raise InvalidArgument(
            f"{what}: not allowed now{suffix} (a read_view still open, or a bad argument)"
        )
    if rc == lib.SHMBUS_ECLOSED:
        raise RingSealed(f"{what}: sealed, its reader has gone for good{suffix}; not written")
    if rc == lib.SHMBUS_EAGAIN:
        raise ShmbusError(f"{what}: still busy after retrying{suffix}; a writer may have died")
    raise ShmbusError(f"{what}: failed with code {rc}{suffix}")
