"""The probe module named by the ``aifactory.probes`` entry point: the example accelerators' health
and metrics for OpenNebula's IM probes and ``aifactory metrics``.

Lean by the hook's contract (``aifactory_core.hookspecs.aifactory_probe_devices``): the standard
library the interpreter has already loaded, ``aifactory_core.probes.api``/``sysfs`` and this
package's ``health`` module; no pluggy, no host model, no config file (the probe recognises the
default vendor list; ``[plugin.example_accel]`` applies to ``inventory`` and ``doctor``).
"""

from __future__ import annotations

from aifactory_core.probes.api import Metric, ProbeDevice
from aifactory_core.probes.sysfs import Root, pci_functions, pci_ids
from aifactory_example_accel.health import DEFAULT_VENDORS, PCI_CLASS_ACCELERATOR, link_verdict

AIFACTORY_PROBE_API = 1


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
