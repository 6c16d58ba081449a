"""``aifactory inventory``: what the host model sees — GPUs, NICs/VFs, NUMA, IOMMU groups."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from aifactory_core.errors import EXIT_OK


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("inventory", help="show the host's devices, NUMA nodes and IOMMU groups")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--all", action="store_true", help="list every PCI function, not only claimed devices")


def _health(manager: Any, inventory: Any, device: Any) -> list[dict[str, Any]]:
    """What the owning plugins' ``aifactory_device_health`` say about one device."""
    readings = []
    for result in manager.hook.aifactory_device_health(inventory=inventory, device=device):
        for attribute in result or ():
            value = dict(attribute.value) if isinstance(attribute.value, tuple) else attribute.value
            readings.append({"name": attribute.name, "value": value})
    return readings


def collect(context: Any) -> dict[str, Any]:
    from aifactory_core.cpulist import format_cpulist
    from aifactory_core.devices import discover_devices
    from aifactory_core.host.inventory import HostInventory

    manager, _loaded = context.plugins
    inventory = HostInventory(context.host)
    devices = discover_devices(manager, inventory)
    device_rows = []
    for device in devices:
        pci = inventory.pci[device.address]
        device_rows.append({
            "address": device.address,
            "kind": device.kind,
            "vendor": device.vendor,
            "model": device.model,
            "ids": pci.ids,
            "class": f"0x{pci.class_code:06x}",
            "subsystem": (f"{pci.subsystem_vendor_id:04x}:{pci.subsystem_device_id:04x}"
                          if pci.subsystem_vendor_id is not None and pci.subsystem_device_id is not None else None),
            "driver": pci.driver,
            "driver_override": pci.driver_override,
            "iommu_group": pci.iommu_group,
            "iommu_group_members": list(inventory.group_of(device.address)),
            # The kernel's node, null where sysfs says -1 (no node), as the host/system probe's
            # NUMA_NODE="-" and OpenNebula's PCI NUMA_NODE; placement_node is what the CPU pinning
            # planner counts the device local to (on a one-node host, that node).
            "numa_node": pci.numa_node,
            "placement_node": inventory.device_node(pci),
            "local_cpus": format_cpulist(pci.local_cpus),
            "reset_method": list(pci.reset_methods),
            "sriov": ({"totalvfs": pci.sriov_totalvfs, "numvfs": pci.sriov_numvfs, "vfs": list(pci.virtfns)}
                      if pci.is_sriov_pf else None),
            "physfn": pci.physfn,
            "link": {"speed": pci.link.current_speed, "width": pci.link.current_width,
                     "max_speed": pci.link.max_speed, "max_width": pci.link.max_width},
            "bars": [{"index": bar.index, "size": bar.size, "64bit": bar.is_64bit,
                      "prefetchable": bar.prefetchable} for bar in pci.bars],
            "interfaces": list(pci.net_interfaces),
            "companions": list(device.companions),
            "plugin": device.plugin,
            "health": _health(manager, inventory, device),
        })
    return {
        "host_root": str(context.host.root),
        "kernel": inventory.kernel_release,
        "devices": device_rows,
        "numa_nodes": [{
            "node": node.node_id,
            "cpus": format_cpulist(node.cpus),
            "memory_total_kib": node.memory_total_kib,
            "memory_free_kib": node.memory_free_kib,
            "distances": list(node.distances),
            "hugepages": [{"size_kib": page.size_kib, "total": page.total, "free": page.free}
                          for page in node.hugepages],
        } for node in inventory.numa_nodes],
        "cpu": {
            "count": len(inventory.cpu.cpus),
            "cores": inventory.cpu.core_count,
            "threads_per_core": inventory.cpu.threads_per_core,
            "isolated": format_cpulist(inventory.cpu.isolated),
        },
        "iommu": {
            "firmware_table": inventory.iommu.firmware_table,
            "units": list(inventory.iommu.units),
            "interrupt_remapping": inventory.iommu.interrupt_remapping,
            "groups": {str(group): list(members) for group, members in inventory.iommu_groups.items()},
        },
        "interfaces": [{"name": net.name, "pci": net.pci_address, "mac": net.address, "state": net.operstate,
                        "mtu": net.mtu} for net in inventory.net],
        "pci": [{"address": pci.address, "ids": pci.ids, "class": f"0x{pci.class_code:06x}",
                 "driver": pci.driver, "iommu_group": pci.iommu_group}
                for pci in inventory.pci.values()],
    }


def _print_human(data: dict[str, Any], show_all: bool) -> None:
    from aifactory_core.cli.output import print_table

    out = sys.stdout
    out.write(f"host root: {data['host_root']}   kernel: {data['kernel'] or '?'}\n\n")
    rows = [[d["address"], d["kind"], f"{d['vendor']} {d['model']}", d["ids"], d["driver"] or "-",
             "-" if d["iommu_group"] is None else str(d["iommu_group"]),
             "-" if d["numa_node"] is None else str(d["numa_node"]), " ".join(d["reset_method"]) or "-"]
            for d in data["devices"]]
    if rows:
        print_table(["ADDRESS", "KIND", "MODEL", "IDS", "DRIVER", "GROUP", "NODE", "RESET"], rows)
    else:
        out.write("no GPUs, NICs or accelerators found\n")
    out.write("\n")
    print_table(["NODE", "CPUS", "MEMORY", "HUGEPAGES (size:total/free)"], [
        [str(n["node"]), n["cpus"], f"{n['memory_total_kib'] // 1024} MiB",
         " ".join(f"{p['size_kib'] // 1024}M:{p['total']}/{p['free']}" for p in n["hugepages"]) or "-"]
        for n in data["numa_nodes"]])
    cpu = data["cpu"]
    out.write(f"\nCPUs: {cpu['count']} ({cpu['cores']} cores x {cpu['threads_per_core']} threads), "
              f"isolated: {cpu['isolated'] or 'none'}\n")
    iommu = data["iommu"]
    out.write(f"IOMMU: {iommu['firmware_table'] or 'no ACPI table'}, {len(iommu['groups'])} groups\n")
    if show_all:
        out.write("\n")
        print_table(["ADDRESS", "IDS", "CLASS", "DRIVER", "GROUP"], [
            [p["address"], p["ids"], p["class"], p["driver"] or "-",
             "-" if p["iommu_group"] is None else str(p["iommu_group"])] for p in data["pci"]])


def run(args: argparse.Namespace, context: Any) -> int:
    data = collect(context)
    if args.json:
        from aifactory_core.cli.output import print_json

        print_json(data)
    else:
        _print_human(data, args.all)
    return EXIT_OK
