"""What the bus's shared-memory segments other than rings have in common:
a C handle that ``close()`` releases, a name under ``/dev/shm/shmbus.*``, and
removal by name (the creator removes it when it leaves a ``with`` block)."""

from __future__ import annotations

from typing import Any

from .._native import ffi, lib
from ..errors import Closed, raise_for
from .ring import PREFIX, validate_name


def shm_name(name: str) -> str:
    return f"/{PREFIX}{validate_name(name)}"


class Segment:
    """Base of Table and StatsSegment. Subclasses set ``kind`` for messages."""

    kind = "segment"
    _c = ""  # the C functions' prefix (shmbus_table): _create, _attach, _close
    _ctype = ""  # the C handle's type (shmbus_table_t)

    @classmethod
    def _open(cls, how: str, name: str, *args: Any) -> Any:
        """``how`` is "create" (this process owns it) or "attach"."""
        out = ffi.new(f"{cls._ctype} **")
        rc = getattr(lib, f"{cls._c}_{how}")(shm_name(name).encode(), *args, out)
        if rc != lib.SHMBUS_OK:
            raise_for(rc, f"{how} {cls.kind} {name!r}", err=ffi.errno)
        handle = ffi.gc(out[0], getattr(lib, f"{cls._c}_close"))
        return cls(handle, name, owner=how == "create")

    def __init__(self, handle: Any, name: str, *, owner: bool) -> None:
        self._h = handle
        self.shm_name = shm_name(name)
        self.name = name
        self.owner = owner

    def _handle(self) -> Any:
        if self._h is None:
            raise Closed(f"{self.kind} {self.name!r} is closed")
        return self._h

    def close(self) -> None:
        if self._h is not None:
            handle, self._h = self._h, None
            ffi.release(handle)

    def unlink(self) -> None:
        self.unlink_name(self.name)

    @staticmethod
    def unlink_name(name: str) -> bool:
        """Remove a segment by name; False if there was none."""
        return lib.shmbus_seg_unlink(shm_name(name).encode()) == lib.SHMBUS_OK

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        if self.owner:
            self.unlink()
