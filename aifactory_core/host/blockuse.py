"""Block devices the host uses, by the PCI function serving them: a device (disk or partition) that
is mounted (``/proc/self/mountinfo``), active swap (``/proc/swaps``) or held by another block device
(its ``holders/``: device-mapper, md).

Every entry of ``/sys/class/block`` is traced to the PCI function on its real sysfs path, so an NVMe
namespace, a disk behind a SATA/SAS controller and a virtio disk all count for the function that
serves them; a device-mapper or md device on top counts through the holder of the disks under it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aifactory_core.host.pcipath import pci_function_of
from aifactory_core.host.sysfs import list_dir, read_str
from aifactory_core.hostroot import HostRoot

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(text: str) -> str:
    """Undo the kernel's octal escapes in mountinfo and swaps (``\\040`` for a space)."""
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), text)


@dataclass(frozen=True)
class Mounts:
    """What ``/proc/self/mountinfo`` names: mount point by ``major:minor`` and by source device."""

    by_number: dict[str, str]
    by_source: dict[str, str]

    @classmethod
    def read(cls, host: HostRoot) -> Mounts:
        by_number: dict[str, str] = {}
        by_source: dict[str, str] = {}
        for line in (host.read_text("/proc/self/mountinfo") or "").splitlines():
            fields = line.split()
            if len(fields) < 7 or "-" not in fields[6:]:
                continue
            after = fields[fields.index("-", 6) + 1:]
            mountpoint = _unescape(fields[4])
            by_number.setdefault(fields[2], mountpoint)
            if len(after) >= 2:
                by_source.setdefault(_unescape(after[1]), mountpoint)
        return cls(by_number, by_source)


def _swaps(host: HostRoot) -> set[str]:
    lines = (host.read_text("/proc/swaps") or "").splitlines()[1:]
    return {_unescape(line.split()[0]) for line in lines if line.split()}


def block_uses(host: HostRoot) -> dict[str, str]:
    """PCI address -> why the host uses a block device it serves (the first reason found)."""
    mounts = Mounts.read(host)
    swaps = _swaps(host)
    base = host.path("/sys/class/block")
    uses: dict[str, str] = {}
    for name in list_dir(base):
        address = pci_function_of(base / name)
        if address is None or address in uses:
            continue
        number = read_str(base / name / "dev")
        holders = list_dir(base / name / "holders")
        if number is not None and number in mounts.by_number:
            uses[address] = f"{name} is mounted on {mounts.by_number[number]}"
        elif f"/dev/{name}" in mounts.by_source:
            uses[address] = f"{name} is mounted on {mounts.by_source[f'/dev/{name}']}"
        elif f"/dev/{name}" in swaps:
            uses[address] = f"{name} is active swap"
        elif holders:
            uses[address] = f"{name} is held by {holders[0]}"
    return uses
