"""The host's PCI list for oned: exactly the suite's passthrough devices, healthy ones only.

oned learns which PCI devices a host can give to VMs from ``PCI = [ ... ]`` vectors in the
host/system probes' output (``HostSharePCI::set_monitorization``): a device it has not seen is
added free, a device it has seen is kept, and a device missing from a report is dropped from the
host's share *unless a VM holds it* — that device stays with its VM until the VM gives it back,
and is dropped at the first report after that. The scheduler and oned's dispatch only ever give a
free device of the share.

So the suite reports the devices itself, from the same pass over the host that judges their health
(:func:`aifactory_core.probes.collect.collect`), reading sysfs under the host root:

* every NVIDIA GPU (display class, not a VF) whose verdict is not ``FAILED`` and that is not
  quarantined,
* every GPU or accelerator a vendor plugin's probe reports (``AIF_DEVICE``) that is not ``FAILED``
  (a quarantined one is ``FAILED``), and
* every VF of a ``[host] vf_pools`` PF that is not quarantined,

leaving out a function the host keeps (``[host] host_devices``; where VF pools are offered also what
the root helper's rule finds in use, :func:`host_uses`) or one that shares its IOMMU group with one.
A GPU that turns ``FAILED`` (or is quarantined) is absent from the next report: free, it stops being
assignable within one monitoring cycle; held, its VM keeps it undisturbed. A GPU that is healthy
again is reported again and becomes assignable. ``AIF_PCI_OFFERED`` and ``AIF_PCI_WITHHELD`` (with
the reason) say what was decided, for ``doctor --frontend`` and the operator.

Upstream's ``pci.rb`` must not report these devices too (it would report a failed GPU): its
``pci.conf`` keeps ``'0:0'`` or filters for other devices only; ``doctor --frontend`` checks it.
The vectors carry the keys and spelling of ``pci.rb`` (``TYPE`` ``vendor:device:class``, ``ADDRESS``
``dddd:bb:ss:f``, ``SHORT_ADDRESS``, ``DOMAIN``/``BUS``/``SLOT``/``FUNCTION``, ``NUMA_NODE``), with
7.4.0's ``IFNAME`` and ``SRIOV`` (``vf``/``pf``/``no``).
"""

from aifactory_core.probes.sysfs import Root, one_address, pci_ids, pci_number

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VENDOR_NAMES = {0x10DE: "NVIDIA Corporation", 0x15B3: "Mellanox Technologies", 0x8086: "Intel Corporation"}
LISTED = "listed in [host] host_devices"  # hostuse.LISTED's words, without importing it (a test keeps them equal)
PASSTHROUGH_KINDS = ("gpu", "accelerator")  # the kinds of a vendor plugin's device oned may give a VM
CLASS_NAMES = {0x0300: "VGA compatible controller", 0x0302: "3D controller", 0x0200: "Ethernet controller",
               0x0207: "Infiniband controller", 0x0108: "Non-Volatile memory controller"}


def pci_vector(root: Root, address: str, name: str = "") -> dict[str, object]:
    """One ``PCI = [ ... ]`` vector for ``address`` (``dddd:bb:ss.f``), as ``pci.rb`` spells it."""
    vendor, device, klass = pci_ids(root, address)
    klass = klass >> 8 if klass >= 0 else -1
    numa = pci_number(root, address, "numa_node")
    domain, bus, slot_function = address.split(":")
    slot, function = slot_function.split(".")
    vendor_hex, device_hex, class_hex = (f"{value:04x}" if value >= 0 else "" for value in (vendor, device, klass))
    return {
        "TYPE": f"{vendor_hex}:{device_hex}:{class_hex}", "VENDOR": vendor_hex,
        "VENDOR_NAME": VENDOR_NAMES.get(vendor, ""), "DEVICE": device_hex, "CLASS": class_hex,
        "CLASS_NAME": CLASS_NAMES.get(klass, ""), "ADDRESS": one_address(address), "SHORT_ADDRESS": address[5:],
        "DOMAIN": domain, "BUS": bus, "SLOT": slot, "FUNCTION": function,
        "NUMA_NODE": "-" if numa is None or numa < 0 else numa,
        "DEVICE_NAME": name or f"{VENDOR_NAMES.get(vendor, vendor_hex)} {device_hex}".strip(),
        # 7.4.0's pci.rb adds these (oned 7.4 keeps SRIOV/SRIOV_NUM of a known device up to date);
        # 7.0.2 stores them as plain attributes.
        "IFNAME": ",".join(root.listdir(f"/sys/bus/pci/devices/{address}/net")),
        "SRIOV": _sriov_role(root, address),
    }


def _sriov_role(root: Root, address: str) -> str:
    """``vf``, ``pf`` or ``no``, as 7.4.0's ``pci.rb`` says (a PF with VFs is never offered)."""
    base = f"/sys/bus/pci/devices/{address}"
    if root.exists(f"{base}/physfn"):
        return "vf"
    return "pf" if pci_number(root, address, "sriov_totalvfs") else "no"


def _group(root: Root, address: str) -> list[str]:
    return root.listdir(f"/sys/bus/pci/devices/{address}/iommu_group/devices") or [address]


def _host_use(root: Root, address: str, uses: dict[str, str]) -> str:
    """Why the host keeps ``address`` (it, or a function of its IOMMU group, is the host's), or ''."""
    for member in _group(root, address):
        if member in uses:
            return uses[member] if member == address else f"shares its IOMMU group with {member} ({uses[member]})"
    return ""


def host_uses(root: Root, host_devices: tuple[str, ...], judge: bool) -> dict[str, str]:
    """The functions the host keeps: ``[host] host_devices``, and with ``judge`` also what
    :mod:`aifactory_core.host.hostuse` finds in use (mounted or held block devices, interfaces with
    an address or the default route) — the root helper's own rule. That judgement costs ~20 ms of
    imports and reads, so it runs only where VF pools are offered (a VF may be the host's own
    interface); a GPU serves no block device or address, and the helper refuses at bind time
    whatever was reported."""
    uses = dict.fromkeys(host_devices, LISTED)
    if judge:
        from pathlib import Path

        from aifactory_core.host.hostuse import HostEvidence
        from aifactory_core.hostroot import HostRoot

        for address, why in HostEvidence.read(HostRoot(Path(root.prefix)), host_devices).uses.items():
            uses.setdefault(address, why)
    return uses


def pool_vfs(root: Root, pools: tuple[str, ...]) -> list[str]:
    """The VFs of the ``[host] vf_pools`` PFs, in address order."""
    found = set()
    for pf in pools:
        base = f"/sys/bus/pci/devices/{pf}"
        for name in root.listdir(base):
            if name.startswith("virtfn") and name[6:].isdigit():
                target = root.link_name(f"{base}/{name}")
                if target:
                    found.add(target)
    return sorted(found)


def offer(root: Root, snapshot: "dict[str, Any]", settings: dict[str, tuple[str, ...]],
          quarantined: dict[str, str]) -> tuple[list[dict[str, object]], list[tuple[str, str]]]:
    """(PCI vectors to report, [(address, why withheld)])."""
    pools = settings.get("vf_pools", ())
    uses = host_uses(root, settings.get("host_devices", ()), judge=bool(pools))
    offered: list[dict[str, object]] = []
    withheld: list[tuple[str, str]] = []
    for row in snapshot["gpus"]:
        address = str(row["BUS_ID"])
        why = _host_use(root, address, uses)
        if not why and row["HEALTH"] == "FAILED":
            why = f"FAILED: {row['HEALTH_REASON']}"
        elif not why and row["QUARANTINED"] == "YES":
            why = "quarantined"
        if why:
            withheld.append((address, why))
        else:
            offered.append(pci_vector(root, address, str(row["MODEL"] or "")))
    seen = {str(row["BUS_ID"]) for row in snapshot["gpus"]}
    for row in snapshot.get("devices", []):  # vendor plugins' devices (probe plugins), judged as the GPUs
        address = str(row.get("BUS_ID", ""))
        if row.get("KIND") not in PASSTHROUGH_KINDS or address in seen:
            continue
        seen.add(address)
        why = _host_use(root, address, uses)
        if not why and row.get("HEALTH") == "FAILED":
            why = f"FAILED: {row.get('HEALTH_REASON', '')}"
        if why:
            withheld.append((address, why))
        else:
            offered.append(pci_vector(root, address, str(row.get("MODEL") or "")))
    for address in pool_vfs(root, pools):
        why = _host_use(root, address, uses)
        if not why and address in quarantined:
            why = f"quarantined: {quarantined[address]}"
        if why:
            withheld.append((address, why))
        else:
            offered.append(pci_vector(root, address))
    return offered, withheld
