"""Who is on the other end of a Unix socket: the daemon only serves its own user."""

from __future__ import annotations

import socket
import struct
import sys

# macOS: getsockopt(SOL_LOCAL=0, LOCAL_PEERCRED=1) gives a struct xucred
# {u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]}.
_SOL_LOCAL = 0
_LOCAL_PEERCRED = 1
_XUCRED = struct.Struct("IIh")


def peer_uid(sock: socket.socket) -> int | None:
    """The peer's uid, or None where the platform cannot tell (then the 0700 dir is the guard)."""
    if hasattr(socket, "SO_PEERCRED"):
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", raw)
        return uid
    if sys.platform == "darwin":
        raw = sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERCRED, 76)
        return parse_xucred(raw)
    return None


def parse_xucred(raw: bytes) -> int:
    _version, uid, _ngroups = _XUCRED.unpack_from(raw)
    return uid
