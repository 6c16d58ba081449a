"""XID errors since the last run, from the kernel log (``/dev/kmsg``).

The NVIDIA driver logs ``NVRM: Xid (PCI:0000:17:00): 79, pid=..., GPU has fallen off the bus``.
``/dev/kmsg`` gives every record with a sequence number; the last sequence seen is kept in
``<state dir>/probes/xid-seq`` so each run reports only what is new. The kernel numbers records
from 0 again after a reboot, so the file also holds the boot's id
(``/proc/sys/kernel/random/boot_id``): a sequence from another boot is not compared. Reading ``/dev/kmsg`` needs
the right to read the kernel log (root, or ``kernel.dmesg_restrict=0``); when it cannot be read the
source is reported as unavailable rather than as "no errors".

Debian sets ``kernel.dmesg_restrict=1`` and the probes run as oneadmin, so there the probe asks the
root helper (``sudo -n aifactory-root-helper xid-log <last sequence>``, granted by ``host-setup``),
which reads ``/dev/kmsg`` as root and returns only the XID codes and their buses (``NEWEST <n>`` and
``XID <bus> <code>`` lines): no other kernel message reaches oneadmin, and the host's
``dmesg_restrict`` stays as it is. AER needs no grant: its counters are world-readable in sysfs.
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


def scan(fd: int, last: int) -> tuple[dict[str, list[int]], int, str | None]:
    """Read the kernel log records of ``fd`` (``/dev/kmsg``, non-blocking) newer than sequence
    ``last``: (``{"0000:17:00": [79, ...]}``, the newest sequence read, an error text or None)."""
    found: dict[str, list[int]] = {}
    newest = last
    buffered = b""
    for _ in range(MAX_RECORDS):
        try:
            chunk = os.read(fd, 8192)
        except BlockingIOError:
            break  # end of the ring buffer
        except OSError as error:
            if error.errno == 32:  # EPIPE: records overwritten while reading; continue
                continue
            return found, newest, f"/dev/kmsg {error.strerror}"
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
    return found, newest, None


def helper_report(last: int) -> str:
    """What the root helper's ``xid-log`` prints: ``NEWEST <sequence>``, then ``XID <bus> <code>`` per
    XID newer than ``last`` — the codes and buses alone, nothing else of the kernel log."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        found, newest, error = scan(fd, last)
    finally:
        os.close(fd)
    if error is not None:
        raise OSError(error)
    return f"NEWEST {newest}\n" + "".join(f"XID {bus} {code}\n" for bus, codes in sorted(found.items())
                                          for code in codes)


def _through_helper(last: int) -> tuple[dict[str, list[int]], int, str | None]:
    """The XIDs newer than ``last`` through ``sudo -n aifactory-root-helper xid-log`` (the grant
    ``host-setup`` installs where ``kernel.dmesg_restrict=1`` keeps oneadmin from ``/dev/kmsg``)."""
    import subprocess

    from aifactory_core.roothelper import DEFAULT_ROOT_HELPER, ENV_ROOT_HELPER

    helper = os.environ.get(ENV_ROOT_HELPER, DEFAULT_ROOT_HELPER)
    try:
        done = subprocess.run(["sudo", "-n", helper, "xid-log", str(last)], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {}, last, f"root helper: {type(error).__name__}"
    lines = done.stdout.splitlines()
    if done.returncode != 0 or not lines or not lines[0].startswith("NEWEST "):
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {}, last, f"root helper: {why[:200]}"
    found: dict[str, list[int]] = {}
    newest = int(lines[0][7:]) if lines[0][7:].lstrip("-").isdigit() else last
    for line in lines[1:]:
        words = line.split()
        if len(words) == 3 and words[0] == "XID" and parse_xid(f"{XID_MARK}{words[1]}): {words[2]}"):
            found.setdefault(words[1], []).append(int(words[2]))
    return found, newest, None


def read_new_xids(root: Root) -> tuple[dict[str, list[int]], str]:
    """(``{"0000:17:00": [79, ...]}`` new since the last run, source status text)."""
    state = _state_file(root)
    boot = root.text("/proc/sys/kernel/random/boot_id") or ""
    last = _last_sequence(state, boot)
    try:
        fd = os.open(root.path("/dev/kmsg"), os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        if not (root.is_live and error.errno in (1, 13)):  # EPERM/EACCES: kernel.dmesg_restrict=1
            return {}, f"unavailable: /dev/kmsg {error.strerror}"
        found, newest, problem = _through_helper(last)
        if problem is not None:
            return found, f"unavailable: /dev/kmsg {error.strerror}; {problem}"
        source = "kmsg (root helper)"
    else:
        try:
            found, newest, problem = scan(fd, last)
        finally:
            os.close(fd)
        if problem is not None:
            return found, f"unavailable: {problem}"
        source = "kmsg"
    if newest != last:  # a read-only state dir costs de-duplication, not the report
        replace_quietly(state, f"{newest} {boot}".rstrip() + "\n")
    return found, source
