"""pyudev, where it adds value on the live machine: enumeration and the udev hardware database.

libudev reads the live ``/sys`` only, so these helpers are used when the host root is ``/``;
captured and generated trees are read through plain files by the rest of the host model.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def udev_pci_addresses() -> list[str] | None:
    """PCI addresses as udev enumerates them, or ``None`` when pyudev/libudev is unavailable."""
    try:
        import pyudev

        context = pyudev.Context()
        return sorted(device.sys_name for device in context.list_devices(subsystem="pci"))
    except Exception as error:  # libudev missing or /sys unreadable: fall back to plain listing
        log.debug("pyudev enumeration unavailable: %s", error)
        return None


def udev_pci_names() -> dict[str, tuple[str | None, str | None]]:
    """``address -> (vendor name, model name)`` from udev's hardware database, when present."""
    try:
        import pyudev

        context = pyudev.Context()
        names: dict[str, tuple[str | None, str | None]] = {}
        for device in context.list_devices(subsystem="pci"):
            properties = device.properties
            names[device.sys_name] = (
                properties.get("ID_VENDOR_FROM_DATABASE"),
                properties.get("ID_MODEL_FROM_DATABASE"),
            )
        return names
    except Exception as error:
        log.debug("pyudev hardware database unavailable: %s", error)
        return {}
