"""IPv4 addresses by interface index, from one rtnetlink ``RTM_GETADDR`` dump.

Read with the ``socket`` and ``struct`` modules alone: the root helper judges every device move by
the interfaces that carry an address (:mod:`aifactory_core.host.netuse`), and importing pyroute2's
package (about 390 modules, 0.25 s here, many times that on a slow host) would cost more than the
rest of the helper's run together. Message layout: ``linux/netlink.h``, ``linux/if_addr.h``.
"""

from __future__ import annotations

import os
import socket
import struct

NLMSG_HEADER = struct.Struct("=LHHLL")  # length, type, flags, sequence, port id
IFADDRMSG = struct.Struct("=BBBBL")  # family, prefix length, flags, scope, interface index
RTATTR = struct.Struct("=HH")  # length, type
ERROR_CODE = struct.Struct("=i")
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWADDR, RTM_GETADDR = 20, 22
NLM_F_REQUEST, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
IFA_ADDRESS, IFA_LOCAL = 1, 2
SEQUENCE = 1
RECEIVE_BYTES = 1 << 16  # more than one dump datagram of the kernel holds
MAX_DATAGRAMS = 4096  # a bound on a dump that never ends
TIMEOUT_S = 5.0
ATTEMPTS = 3


def _align(length: int) -> int:
    return (length + 3) & ~3


def _attributes(data: bytes, start: int, end: int) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    while start + RTATTR.size <= end:
        length, kind = RTATTR.unpack_from(data, start)
        if length < RTATTR.size or start + length > end:
            raise OSError("malformed rtnetlink attribute")
        found.setdefault(kind, data[start + RTATTR.size:start + length])
        start += _align(length)
    return found


def _address_of(data: bytes, offset: int, length: int) -> tuple[int, str] | None:
    """(interface index, address) of one ``RTM_NEWADDR`` message, if it is an IPv4 one."""
    body = offset + NLMSG_HEADER.size
    if length < NLMSG_HEADER.size + IFADDRMSG.size:
        raise OSError("short RTM_NEWADDR message")
    family, _prefix, _flags, _scope, index = IFADDRMSG.unpack_from(data, body)
    attributes = _attributes(data, body + IFADDRMSG.size, offset + length)
    address = attributes.get(IFA_LOCAL) or attributes.get(IFA_ADDRESS)
    if family != socket.AF_INET or address is None or len(address) != 4:
        return None
    return index, socket.inet_ntoa(address)


def ipv4_addresses() -> dict[int, list[str]]:
    """Interface index -> its IPv4 addresses, as the kernel lists them. A dump the kernel marks as
    interrupted (the addresses changed while it ran) is read again, at most :data:`ATTEMPTS`
    times. Raises OSError."""
    for _ in range(ATTEMPTS):
        found, complete = _dump()
        if complete:
            return found
    raise OSError("the interfaces' addresses kept changing while they were read")


def _dump() -> tuple[dict[int, list[str]], bool]:
    """One dump: the addresses, and whether the kernel says it is consistent."""
    request_body = IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
    request = NLMSG_HEADER.pack(NLMSG_HEADER.size + len(request_body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP,
                                SEQUENCE, 0) + request_body
    found: dict[int, list[str]] = {}
    consistent = True
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(TIMEOUT_S)
        sock.bind((0, 0))
        sock.sendall(request)
        for _ in range(MAX_DATAGRAMS):
            data, sender = sock.recvfrom(RECEIVE_BYTES)
            if sender[0] != 0:
                continue  # not from the kernel
            offset = 0
            while offset + NLMSG_HEADER.size <= len(data):
                length, kind, flags, sequence, _port = NLMSG_HEADER.unpack_from(data, offset)
                if length < NLMSG_HEADER.size or offset + length > len(data):
                    raise OSError("truncated rtnetlink message")
                if sequence == SEQUENCE:
                    consistent = consistent and not flags & NLM_F_DUMP_INTR
                    if kind in (NLMSG_DONE, NLMSG_ERROR):
                        error = _error_code(data, offset, length, kind)
                        if error:
                            raise OSError(-error, os.strerror(-error))
                        if kind == NLMSG_ERROR:
                            raise OSError("rtnetlink dump ended without DONE")
                        return found, consistent
                    if kind == RTM_NEWADDR:
                        entry = _address_of(data, offset, length)
                        if entry is not None:
                            found.setdefault(entry[0], []).append(entry[1])
                offset += _align(length)
    raise OSError("rtnetlink address dump did not end")


def _error_code(data: bytes, offset: int, length: int, kind: int) -> int:
    """The error number a DONE or ERROR message carries (0 for a DONE without one)."""
    if length < NLMSG_HEADER.size + ERROR_CODE.size:
        if kind == NLMSG_ERROR:
            raise OSError("short rtnetlink error message")
        return 0
    (error,) = ERROR_CODE.unpack_from(data, offset + NLMSG_HEADER.size)
    return int(error)
