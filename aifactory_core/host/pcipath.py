"""The PCI function a sysfs device lives under: the deepest PCI address on its real path
(``/sys/devices/pci0000:00/0000:00:03.0/0000:08:00.0/nvme/nvme0/nvme0n1`` -> ``0000:08:00.0``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

_PCI_COMPONENT = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$")


def pci_function_of(path: Path) -> str | None:
    """The PCI function serving the device at ``path`` (a link is resolved); None for a virtual one."""
    for part in reversed(os.path.realpath(path).split("/")):
        if _PCI_COMPONENT.fullmatch(part):
            return part
    return None
