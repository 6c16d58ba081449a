"""The plugin module named by the ``aifactory.plugins`` entry point."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aifactory_core.config import Config
from aifactory_core.errors import ConfigError
from aifactory_core.hookspecs import hookimpl
from aifactory_core.host.inventory import HostInventory
from aifactory_core.model import Check, DiscoveredDevice, PciDevice, ProbeAttribute
from aifactory_core.validate import hex_id
from aifactory_example_accel.probe import DEFAULT_LINK_WIDTH, DEFAULT_VENDORS, PCI_CLASS_ACCELERATOR, link_verdict

AIFACTORY_API_VERSION = 1
NAME = "example_accel"

_settings: dict[str, Any] = {"vendors": set(DEFAULT_VENDORS), "expected_link_width": DEFAULT_LINK_WIDTH}


@hookimpl
def aifactory_configure(name: str, section: Mapping[str, Any]) -> None:
    if name != NAME:
        return
    for key in section:
        if key not in ("vendors", "expected_link_width"):
            raise ConfigError(f"unknown config key 'plugin.{NAME}.{key}'")
    if "vendors" in section:
        vendors = section["vendors"]
        if not isinstance(vendors, list):
            raise ConfigError(f"config key 'plugin.{NAME}.vendors' must be a list of hex vendor ids")
        _settings["vendors"] = {hex_id(vendor, "vendor id") for vendor in vendors}
    if "expected_link_width" in section:
        width = section["expected_link_width"]
        if not isinstance(width, int) or width not in (1, 2, 4, 8, 16, 32):
            raise ConfigError(f"config key 'plugin.{NAME}.expected_link_width' must be 1..32 lanes")
        _settings["expected_link_width"] = width


def _is_ours(device: PciDevice) -> bool:
    return device.base_class == PCI_CLASS_ACCELERATOR and device.vendor_id in _settings["vendors"]


@hookimpl
def aifactory_discover_devices(inventory: HostInventory) -> Iterable[DiscoveredDevice]:
    return [
        DiscoveredDevice(
            address=device.address,
            kind="accelerator",
            vendor=device.vendor_name or f"vendor {device.vendor_id:04x}",
            model=device.device_name or f"accelerator {device.device_id:04x}",
            plugin=NAME,
            details=(("driver", device.driver or "-"),),
        )
        for device in inventory.pci.values()
        if _is_ours(device)
    ]


@hookimpl
def aifactory_device_health(
    inventory: HostInventory, device: DiscoveredDevice
) -> Iterable[ProbeAttribute] | None:
    if device.plugin != NAME:
        return None
    pci = inventory.pci[device.address]
    width = pci.link.current_width or 0
    verdict, _reason = link_verdict(width, _settings["expected_link_width"])
    return [ProbeAttribute("EXAMPLE_ACCEL", (("ADDRESS", device.address), ("LINK_WIDTH", str(width)),
                                             ("HEALTH", verdict)))]


@hookimpl
def aifactory_doctor_checks(inventory: HostInventory, devices: Sequence[DiscoveredDevice],
                            config: Config) -> Iterable[Check]:
    checks = []
    for device in devices:
        if device.plugin != NAME:
            continue
        width = inventory.pci[device.address].link.current_width
        if width is not None and width < _settings["expected_link_width"]:
            expected = _settings["expected_link_width"]
            checks.append(Check("accelerator-link", "WARN", f"link x{width}, expected x{expected}",
                                fix="reseat the card", subject=device.address))
        else:
            checks.append(Check("accelerator-link", "PASS", f"link x{width}", subject=device.address))
    return checks
