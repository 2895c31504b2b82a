"""Who is at the other end of a Unix socket: the kernel's word (SO_PEERCRED),
not anything the peer says. A bus trusts only processes of its own user."""

from __future__ import annotations

import os
import socket
import struct

from ..errors import ForeignObject

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_creds(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that made the other end of ``sock``."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def check_same_user(uid: int, what: str) -> None:
    """Raise :class:`ForeignObject` unless ``uid`` is this process's user."""
    if uid != os.getuid():
        raise ForeignObject(
            f"{what} is a process of uid {uid}, not of this user (uid {os.getuid()}): refused"
        )


def check_peer(sock: socket.socket, what: str) -> int:
    """The peer's pid, once its uid is ours; :class:`ForeignObject` otherwise."""
    pid, uid, _ = peer_creds(sock)
    check_same_user(uid, what)
    return pid
