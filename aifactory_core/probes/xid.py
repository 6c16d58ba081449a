"""XID errors since the last run, from the kernel log (``/dev/kmsg``).

The NVIDIA driver logs ``NVRM: Xid (PCI:0000:17:00): 79, pid=..., GPU has fallen off the bus``.
``/dev/kmsg`` gives every record with a sequence number; the last sequence seen is kept in
``<state dir>/probes/xid-seq`` so each run reports only what is new. Reading ``/dev/kmsg`` needs
the right to read the kernel log (root, or ``kernel.dmesg_restrict=0``); when it cannot be read the
source is reported as unavailable rather than as "no errors".
"""

from __future__ import annotations

import os
import re

from aifactory_core.probes.sysfs import Root

XID = re.compile(r"NVRM: Xid \(PCI:([0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2})[^)]*\): (\d+)")
MAX_RECORDS = 100000


def _state_file(root: Root) -> str:
    return os.path.join(root.state_dir, "probes", "xid-seq")


def read_new_xids(root: Root) -> tuple[dict[str, list[int]], str]:
    """(``{"0000:17:00": [79, ...]}`` new since the last run, source status text)."""
    state = _state_file(root)
    try:
        with open(state, encoding="ascii") as handle:
            last = int(handle.read().strip() or "-1")
    except (OSError, ValueError):
        last = -1
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
                match = XID.search(message)
                if match:
                    found.setdefault(match.group(1).lower(), []).append(int(match.group(2)))
    finally:
        os.close(fd)
    if newest != last:
        _save(state, newest)
    return found, "kmsg"


def _save(path: str, sequence: int) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="ascii") as handle:
            handle.write(f"{sequence}\n")
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only state dir costs de-duplication, not the report
