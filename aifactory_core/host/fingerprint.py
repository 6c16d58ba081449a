"""Device fingerprints: what a function is, recorded the first time a VM takes it, compared each
time after. A swapped card, a retrained link or a moved IOMMU group between two deploys is drift:
the deploy is refused until an administrator accepts the new identity (``aifactory device clear``).
"""

from __future__ import annotations

import json

from aifactory_core.errors import HostError
from aifactory_core.host.sysfs import link_name, read_str
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle.atomic import read_json, remove, write_atomic
from aifactory_core.validate import pci_address

_DSN_CAP = 0x0003


def _serial(config: bytes) -> str | None:
    """The PCIe Device Serial Number extended capability, when the config space shows it."""
    offset = 0x100
    seen = 0
    while len(config) >= offset + 12 and offset and seen < 64:
        header = int.from_bytes(config[offset:offset + 4], "little")
        if header in (0, 0xFFFFFFFF):
            return None
        if header & 0xFFFF == _DSN_CAP:
            return config[offset + 4:offset + 12][::-1].hex()
        offset = header >> 20
        seen += 1
    return None


def fingerprint(host: HostRoot, address: str) -> dict[str, str | None]:
    device = host.pci_devices / pci_address(address)
    try:
        config = (device / "config").read_bytes()
    except OSError:
        config = b""
    return {
        "vendor": read_str(device / "vendor"),
        "device": read_str(device / "device"),
        "subsystem_vendor": read_str(device / "subsystem_vendor"),
        "subsystem_device": read_str(device / "subsystem_device"),
        "class": read_str(device / "class"),
        "max_link_speed": read_str(device / "max_link_speed"),
        "max_link_width": read_str(device / "max_link_width"),
        "iommu_group": link_name(device / "iommu_group"),
        "serial": _serial(config),
    }


def check_drift(host: HostRoot, address: str) -> dict[str, str | None]:
    """The current fingerprint; raises HostError naming what changed since it was recorded."""
    current = fingerprint(host, address)
    try:
        recorded = read_json(host.state_dir / "fingerprints" / f"{pci_address(address)}.json")
    except FileNotFoundError:
        return current
    except (OSError, ValueError):
        raise HostError(f"fingerprint record of {address} is unreadable") from None
    changed = [f"{key} {recorded.get(key)} -> {value}" for key, value in current.items() if recorded.get(key) != value]
    if changed:
        raise HostError(f"device {address} changed since it was last assigned ({'; '.join(changed)}); "
                        f"verify the hardware, then 'aifactory device clear {address}'")
    return current


def record(host: HostRoot, address: str, value: dict[str, str | None]) -> None:
    write_atomic(host.state_dir / "fingerprints" / f"{pci_address(address)}.json",
                 (json.dumps(value, sort_keys=True) + "\n").encode())


def forget(host: HostRoot, address: str) -> bool:
    return remove(host.state_dir / "fingerprints" / f"{pci_address(address)}.json")
