"""Keep the domain's ``<interface type='hostdev'>`` consistent with the journaled VF settings."""

from __future__ import annotations

from typing import Any

from aifactory_core.hostroot import HostRoot


def journaled_vf_macs(host: HostRoot, vm: int) -> dict[str, str]:
    """VF PCI address -> MAC for every ``vf_config`` step of the VM's VNM journal."""
    import json

    from aifactory_core.host.sysfs import link_name
    from aifactory_core.lifecycle.journal import Journal
    from aifactory_core.validate import pci_address
    from aifactory_core.vnm.vf import KIND, parse_target

    journal = Journal.load(host, vm)
    macs: dict[str, str] = {}
    for step in journal.steps if journal is not None else ():
        if step.action.kind != KIND or step.status != "done":
            continue
        pf, index = parse_target(step.action.target)
        address = link_name(host.path(f"/sys/class/net/{pf}/device/virtfn{index}"))
        settings = json.loads(step.action.value)["settings"]
        if address and settings.get("node_guid") is None and settings.get("port_guid") is None:  # IB: no MAC
            macs[pci_address(address)] = settings["mac"]
    return macs


def reconcile_hostdev_interfaces(domain: Any, host: HostRoot, vm: int) -> int:
    """Set each configured VF's ``<mac>`` and drop its ``<vlan>``; returns how many were touched."""
    from aifactory_core.domain import hostdev_address

    macs = journaled_vf_macs(host, vm)
    touched = 0
    for interface in domain.findall("devices/interface[@type='hostdev']"):
        address = hostdev_address(interface)
        if address not in macs:
            continue
        for vlan in interface.findall("vlan"):
            interface.remove(vlan)
        mac = interface.find("mac")
        if mac is None:
            from lxml import etree

            mac = etree.SubElement(interface, "mac")
        mac.set("address", macs[address])
        touched += 1
    return touched
