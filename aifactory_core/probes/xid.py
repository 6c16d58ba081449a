"""XID errors since the last run, from the kernel log (``/dev/kmsg``).

The NVIDIA driver logs ``NVRM: Xid (PCI:0000:17:00): 79, pid=..., GPU has fallen off the bus``.
``/dev/kmsg`` gives every record with a sequence number; the last sequence seen is kept in
``<state dir>/probes/xid-seq`` so each run reports only what is new. The kernel numbers records
from 0 again after a reboot, so the file also holds the boot's id
(``/proc/sys/kernel/random/boot_id``): a sequence from another boot is not compared. Reading ``/dev/kmsg`` needs
the right to read the kernel log (root, or ``kernel.dmesg_restrict=0``); when it cannot be read the
source is reported as unavailable rather than as "no errors".
"""

from __future__ import annotations

import os

from aifactory_core.probes.sysfs import Root, replace_quietly

XID_MARK = "NVRM: Xid (PCI:"
MAX_RECORDS = 100000
_HEX = frozenset("0123456789abcdefABCDEF")


def parse_xid(message: str) -> tuple[str, int] | None:
    """(``dddd:bb:ss`` lower-case, XID) from ``NVRM: Xid (PCI:dddd:bb:ss[...]): N, ...``, else None.

    Plain string matching: ``re`` would be the largest import of the probe."""
    start = message.find(XID_MARK)
    while start >= 0:
        rest = message[start + len(XID_MARK):]
        bus = rest[:10]
        close = rest.find(")", 10)
        if (len(bus) == 10 and bus[4] == ":" and bus[7] == ":" and _HEX.issuperset(bus[:4] + bus[5:7] + bus[8:])
                and close >= 0 and rest[close + 1:close + 3] == ": "):
            tail = rest[close + 3:]
            digits = len(tail) - len(tail.lstrip("0123456789"))
            if digits:
                return bus.lower(), int(tail[:digits])
        start = message.find(XID_MARK, start + 1)
    return None


def _state_file(root: Root) -> str:
    return os.path.join(root.state_dir, "probes", "xid-seq")


def _last_sequence(state: str, boot: str) -> int:
    """The last sequence read in this boot (``<sequence> <boot id>``; -1 when none, or when it is
    another boot's; a file without a boot id is taken as this boot's)."""
    try:
        with open(state, encoding="ascii") as handle:
            sequence, _, recorded_boot = handle.read().strip().partition(" ")
        last = int(sequence or "-1")
    except (OSError, ValueError):
        return -1
    return -1 if recorded_boot and boot and recorded_boot != boot else last


def read_new_xids(root: Root) -> tuple[dict[str, list[int]], str]:
    """(``{"0000:17:00": [79, ...]}`` new since the last run, source status text)."""
    state = _state_file(root)
    boot = root.text("/proc/sys/kernel/random/boot_id") or ""
    last = _last_sequence(state, boot)
    found: dict[str, list[int]] = {}
    newest = last
    try:
        fd = os.open(root.path("/dev/kmsg"), os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        return found, f"unavailable: /dev/kmsg {error.strerror}"
    try:
        buffered = b""
        for _ in range(MAX_RECORDS):
            try:
                chunk = os.read(fd, 8192)
            except BlockingIOError:
                break  # end of the ring buffer
            except OSError as error:
                if error.errno == 32:  # EPIPE: records overwritten while reading; continue
                    continue
                return found, f"unavailable: /dev/kmsg {error.strerror}"
            if not chunk:
                break
            buffered += chunk
            *records, buffered = buffered.split(b"\n")
            for record in records:
                head, _, message = record.decode("utf-8", "replace").partition(";")
                fields = head.split(",")
                if len(fields) < 2 or not fields[1].isdigit():
                    continue
                sequence = int(fields[1])
                if sequence <= last:
                    continue
                newest = max(newest, sequence)
                xid = parse_xid(message)
                if xid is not None:
                    found.setdefault(xid[0], []).append(xid[1])
    finally:
        os.close(fd)
    if newest != last:  # a read-only state dir costs de-duplication, not the report
        replace_quietly(state, f"{newest} {boot}".rstrip() + "\n")
    return found, "kmsg"
