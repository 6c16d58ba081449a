"""The readiness checks that can change while a host runs, reported every cycle.

IOMMU groups present, vfio modules loaded, hugepages free per node, and NVSwitch / Fabric Manager
state where NVSwitches exist. ``AIF_READY`` is ``YES`` only when no check fails, so
``SCHED_REQUIREMENTS = "AIF_READY = YES"`` keeps VMs off a host that has become unfit.
"""

from aifactory_core.probes.sysfs import NVIDIA, Root, pci_functions, pci_ids

BRIDGE_OTHER = 0x068000  # NVSwitch's class code


def nvswitches(root: Root, functions: list[str]) -> list[str]:
    found = []
    for address in functions:
        vendor, _device, klass = pci_ids(root, address)
        if vendor == NVIDIA and klass == BRIDGE_OTHER:
            found.append(address)
    return found


def checks(root: Root, functions: list[str] | None = None) -> list[dict[str, object]]:
    """``[{"NAME", "STATUS" PASS/WARN/FAIL, "DETAIL"}]``."""
    functions = pci_functions(root) if functions is None else functions
    result: list[dict[str, object]] = []
    groups = root.listdir("/sys/kernel/iommu_groups")
    result.append({"NAME": "iommu_groups", "STATUS": "PASS" if groups else "FAIL",
                   "DETAIL": f"{len(groups)} groups" if groups else "no IOMMU groups: IOMMU off"})
    modules = [name for name in ("vfio", "vfio_pci", "vfio_iommu_type1") if not root.exists(f"/sys/module/{name}")]
    result.append({"NAME": "vfio_modules", "STATUS": "FAIL" if modules else "PASS",
                   "DETAIL": f"not loaded: {','.join(modules)}" if modules else "vfio, vfio_pci, vfio_iommu_type1"})
    switches = nvswitches(root, functions)
    if switches:
        running = root.exists("/run/nvidia-fabricmanager/nv-fabricmanager.pid") or root.exists(
            "/var/run/nvidia-fabricmanager/nv-fabricmanager.pid")
        result.append({"NAME": "fabric_manager", "STATUS": "PASS" if running else "WARN",
                       "DETAIL": (f"{len(switches)} NVSwitches; " +
                                  ("nv-fabricmanager running" if running else "nv-fabricmanager pid file not found"))})
    return result


def hugepages(root: Root) -> list[dict[str, object]]:
    """``HUGEPAGE``-shaped rows (``NODE_ID``, ``SIZE`` KiB, ``PAGES``, ``FREE``) per NUMA node."""
    rows: list[dict[str, object]] = []
    for node in root.listdir("/sys/devices/system/node"):
        if not node.startswith("node") or not node[4:].isdigit():
            continue
        base = f"/sys/devices/system/node/{node}/hugepages"
        for pool in root.listdir(base):
            if not pool.startswith("hugepages-") or not pool.endswith("kB"):
                continue
            rows.append({"NODE_ID": node[4:], "SIZE": pool[10:-2],
                         "PAGES": root.number(f"{base}/{pool}/nr_hugepages") or 0,
                         "FREE": root.number(f"{base}/{pool}/free_hugepages") or 0})
    rows.sort(key=lambda row: (int(str(row["NODE_ID"])), int(str(row["SIZE"]))))
    return rows
