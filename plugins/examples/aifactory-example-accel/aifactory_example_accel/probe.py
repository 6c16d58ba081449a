"""The probe module named by the ``aifactory.probes`` entry point: the example accelerators' health
and metrics for OpenNebula's IM probes and ``aifactory metrics``.

Lean by the hook's contract (``aifactory_core.hookspecs.aifactory_probe_devices``): the standard
library the interpreter has already loaded and ``aifactory_core.probes.api``/``sysfs``; no pluggy,
no host model, no config file (the probe recognises the default vendor list;
``[plugin.example_accel]`` applies to ``inventory`` and ``doctor``). The verdict,
:func:`link_verdict`, lives here and the plugin module imports it, so both judge alike and the
probe imports one module fewer.
"""

from aifactory_core.probes.api import Metric, ProbeDevice
from aifactory_core.probes.sysfs import Root, pci_functions, pci_ids

AIFACTORY_PROBE_API = 1
DEFAULT_VENDORS = frozenset({0x1DA3})
DEFAULT_LINK_WIDTH = 16
PCI_CLASS_ACCELERATOR = 0x12


def link_verdict(width: int, expected: int = DEFAULT_LINK_WIDTH) -> tuple[str, str]:
    """(``OK``/``DEGRADED``, reason) for a link trained at ``width`` lanes."""
    if width >= expected:
        return "OK", ""
    return "DEGRADED", f"PCIe link x{width}, expected x{expected}"


def aifactory_probe_devices(root: Root) -> list[ProbeDevice]:
    devices = []
    for address in pci_functions(root):
        vendor, device, klass = pci_ids(root, address)
        if vendor not in DEFAULT_VENDORS or klass >> 16 != PCI_CLASS_ACCELERATOR:
            continue
        base = f"/sys/bus/pci/devices/{address}/"
        width = root.number(base + "current_link_width") or 0
        widest = root.number(base + "max_link_width") or 0
        health, reason = link_verdict(width)
        devices.append(ProbeDevice(
            address, "accelerator", model=f"example accelerator {device:04x}", health=health,
            health_reason=reason, attributes={"LINK_WIDTH": width, "LINK_WIDTH_MAX": widest},
            metrics=[Metric("accelerator_pcie_link_width_lanes", width, help="PCIe link width trained (lanes)"),
                     Metric("accelerator_pcie_link_width_max_lanes", widest, help="PCIe link width possible (lanes)")],
        ))
    return devices
