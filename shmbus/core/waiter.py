"""A typed wrapper over the C waiter (csrc/shmbus_waiter.c): a ring's doorbell
as a file descriptor an event loop can select on.

Arm it after a read of the ring found nothing; its ``fd`` becomes readable
once a frame is there (on any lane), then it waits to be armed again. Its
thread is C only: it never needs the GIL. Nothing above this module touches
``ffi`` for it.
"""

from __future__ import annotations

from typing import Any

from .._native import ffi, lib
from ..errors import Closed, raise_for
from .ring import Ring

__all__ = ["Waiter"]

_OK = lib.SHMBUS_OK
_arm = lib.shmbus_waiter_arm
_clear = lib.shmbus_waiter_clear


class Waiter:
    """Waits on ``ring``'s doorbell for its reader (who never waits itself)."""

    def __init__(self, ring: Ring) -> None:
        self.name = ring.name
        out = ffi.new("shmbus_waiter_t **")
        rc = lib.shmbus_waiter_new(ring._handle(), out)
        if rc != _OK:
            raise_for(rc, f"start a waiter on ring {self.name!r}", err=ffi.errno)
        self._w: Any = out[0]
        #: Readable once a frame is there after :meth:`arm`; :meth:`clear` it.
        self.fd: int = lib.shmbus_waiter_fd(self._w)

    def arm(self, spin_ns: int = 0) -> None:
        """Wait for the next frame (call after a read that found nothing),
        spinning up to ``spin_ns`` before the thread sleeps."""
        if self._w is None:
            raise Closed(f"the waiter on ring {self.name!r} is closed")
        rc = _arm(self._w, spin_ns)
        if rc != _OK:
            raise_for(rc, f"wait on ring {self.name!r}", err=ffi.errno)

    def clear(self) -> bool:
        """Make ``fd`` unreadable again; whether it was readable."""
        return self._w is not None and bool(_clear(self._w))

    def close(self) -> None:
        """Stop and join the thread, close ``fd``. Idempotent."""
        w, self._w = self._w, None
        if w is not None:
            lib.shmbus_waiter_free(w)
            self.fd = -1

    @property
    def closed(self) -> bool:
        return self._w is None

    def __enter__(self) -> Waiter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self._w is None else f" fd {self.fd}"
        return f"<Waiter on ring {self.name!r}{state}>"
