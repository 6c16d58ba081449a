"""The admission decision: (policy, VM request, current usage) -> admit, or refusals naming rules.

Pure and fast: no I/O, no imports beyond the stdlib and the suite's own small modules,
O(devices + NICs) per request once the usage is indexed. The same function runs in the frontend
admission hook and, authoritatively, on the host before anything is bound.

Rules (the ``rule`` of a :class:`Refusal`):

* ``tenant``                      the VM's group is no tenant and not an infrastructure admin
                                  group, yet it asks for a passthrough device or a PCI NIC
* ``tenant.<key>.devices``        a passthrough device matches none of the tenant's grants
                                  (vendor/device/class, and cluster where the grant names one)
* ``tenant.<key>.max_gpus``       the tenant would hold more GPUs than its cap

What a PCI request is, is what oned can give for it, never its TYPE alone (oned matches
VENDOR/DEVICE/CLASS, or SHORT_ADDRESS alone, whatever the TYPE): a request counts as a GPU unless
its class pins it to network functions (:attr:`~aifactory_core.one.vm.PciRequest.network_function`),
and it needs a device grant unless it is both a network interface to oned (``TYPE = "NIC"``) and
pinned to network functions. A request the decision cannot identify (SHORT_ADDRESS alone, not
resolved against a device list) matches no grant.
* ``tenant.<key>.networks``       a NIC or PCI NIC on a network not granted
* ``tenant.<key>.vlans``          an 802.1Q VLAN id outside the tenant's range
* ``tenant.<key>.vnis``           a VXLAN VNI outside the tenant's range
* ``tenant.<key>.ib_pkeys``       an InfiniBand pkey outside the tenant's range (or unparsable)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aifactory_core.policy.schema import Policy, Tenant
from aifactory_core.vnm.grant import VXLAN_DRIVERS

if TYPE_CHECKING:
    from aifactory_core.one.vm import NicRequest, PciRequest, VmRequest

    RequestLike = VmRequest

PKEY_ATTRIBUTES = ("IB_PKEY", "PKEY")


@dataclass(frozen=True)
class Refusal:
    rule: str
    message: str

    def __str__(self) -> str:
        return f"policy rule {self.rule}: {self.message}"


@dataclass(frozen=True)
class Decision:
    tenant: str | None
    refusals: tuple[Refusal, ...] = ()

    @property
    def admitted(self) -> bool:
        return not self.refusals

    @property
    def reason(self) -> str:
        return "; ".join(str(item) for item in self.refusals)


@dataclass
class Usage:
    """GPUs held per VM (vm id -> (tenant key, gpus)), with per-tenant totals kept in step."""

    by_vm: dict[int, tuple[str, int]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, entries: Iterable[tuple[int, str, int]]) -> Usage:
        usage = cls()
        for vm_id, tenant, gpus in entries:
            usage.set(vm_id, tenant, gpus)
        return usage

    def set(self, vm_id: int, tenant: str, gpus: int) -> None:
        self.discard(vm_id)
        if gpus > 0:
            self.by_vm[vm_id] = (tenant, gpus)
            self.totals[tenant] = self.totals.get(tenant, 0) + gpus

    def discard(self, vm_id: int) -> None:
        previous = self.by_vm.pop(vm_id, None)
        if previous is not None:
            self.totals[previous[0]] -= previous[1]

    def held_by_others(self, tenant: str, vm_id: int) -> int:
        total = self.totals.get(tenant, 0)
        own = self.by_vm.get(vm_id)
        if own is not None and own[0] == tenant:
            total -= own[1]
        return total


def parse_pkey(text: str) -> int | None:
    """A pkey as written in templates: ``0x8001`` (hex) or decimal; the membership bit is dropped."""
    value = text.strip().lower()
    if len(value) > 6:
        return None
    try:
        number = int(value[2:], 16) if value.startswith("0x") else int(value, 10)
    except ValueError:
        return None
    return number & 0x7FFF if 0 <= number <= 0xFFFF else None  # the top bit is membership, not identity


def _fmt_id(value: int | None) -> str:
    return "?" if value is None else f"{value:04x}"


def needs_device_grant(item: PciRequest) -> bool:
    """Every PCI request but a network interface that can only get a network function."""
    return not (item.is_nic and item.network_function)


def _device_refusals(tenant: Tenant, request: RequestLike) -> list[Refusal]:
    refusals = []
    for item in request.pci:
        if not needs_device_grant(item):
            continue
        grants = [grant for grant in tenant.devices if grant.matches(item.vendor, item.device, item.device_class)]
        what = f"{_fmt_id(item.vendor)}:{_fmt_id(item.device)} class {_fmt_id(item.device_class)}"
        if item.selects_by_address:
            what = f"at SHORT_ADDRESS {item.short_address} (not identified)"
        if not grants:
            refusals.append(
                Refusal(f"tenant.{tenant.key}.devices", f"device {what} is not granted to tenant {tenant.key}")
            )
            continue
        if request.cluster_id is None:
            continue  # not placed yet: the host gate (which knows the cluster) decides
        if not any(grant.clusters is None or request.cluster_id in grant.clusters for grant in grants):
            refusals.append(Refusal(
                f"tenant.{tenant.key}.devices",
                f"device {what} is granted to tenant {tenant.key} only on clusters "
                + ",".join(str(c) for grant in grants for c in sorted(grant.clusters or ())),
            ))  # fmt: skip
    return refusals


def _network_refusals(tenant: Tenant, request: RequestLike) -> list[Refusal]:
    refusals = []
    interfaces: list[NicRequest | PciRequest] = [*request.nics, *(item for item in request.pci if item.is_nic)]
    for nic in interfaces:
        if nic.network_id is None or nic.network_id not in tenant.networks:
            refusals.append(Refusal(f"tenant.{tenant.key}.networks",
                                    f"network {nic.network_id if nic.network_id is not None else '(none named)'} "
                                    f"is not granted to tenant {tenant.key}"))  # fmt: skip
        driver = (nic.vn_mad or "").lower()
        if VXLAN_DRIVERS.get(driver) == "OUTER_VLAN_ID":  # VLAN_ID is then a tag inside the segment
            outer = (nic.attributes.get("OUTER_VLAN_ID") or "").strip()
            if not outer.isdigit() or len(outer) > 8 or int(outer) not in tenant.vnis:
                refusals.append(Refusal(f"tenant.{tenant.key}.vnis",
                                        f"VNI {outer[:20] or '(none named)'} (OUTER_VLAN_ID) is outside tenant "
                                        f"{tenant.key}'s vnis {tenant.vnis}"))  # fmt: skip
        elif nic.vlan_id is not None:
            vxlan = driver in VXLAN_DRIVERS
            ranges, rule = (tenant.vnis, "vnis") if vxlan else (tenant.vlans, "vlans")
            if nic.vlan_id not in ranges:
                refusals.append(Refusal(f"tenant.{tenant.key}.{rule}",
                                        f"{'VNI' if vxlan else 'VLAN'} {nic.vlan_id} is outside tenant {tenant.key}'s "
                                        f"{rule} {ranges}"))  # fmt: skip
        for name in PKEY_ATTRIBUTES:
            raw = nic.attributes.get(name)
            if raw is None:
                continue
            pkey = parse_pkey(raw)
            if pkey is None or pkey not in tenant.ib_pkeys:
                refusals.append(Refusal(f"tenant.{tenant.key}.ib_pkeys",
                                        f"pkey {raw.strip()[:20]!r} is outside tenant {tenant.key}'s ib_pkeys "
                                        f"{tenant.ib_pkeys}"))  # fmt: skip
    return refusals


def resolve_addresses(request: RequestLike, lookup: Callable[[str], tuple[int, int, int] | None]) -> RequestLike:
    """``request`` with each PCI request oned allocates by SHORT_ADDRESS alone identified as the
    device ``lookup`` (a host's sysfs, a device list) says sits at that address (vendor, device,
    class); one it cannot name stays unidentified."""
    from dataclasses import replace

    resolved = []
    for item in request.pci:
        identity = lookup(item.short_address) if item.selects_by_address and item.short_address else None
        if identity is not None:
            vendor, device, device_class = identity
            item = replace(item, vendor=vendor, device=device, device_class=device_class)
        resolved.append(item)
    return replace(request, pci=tuple(resolved))


def gpu_count(request: RequestLike) -> int:
    """PCI requests that may get something other than a network function, whatever their TYPE."""
    return sum(1 for item in request.pci if not item.network_function)


def decide(policy: Policy, request: RequestLike, usage: Usage | None = None) -> Decision:
    """Admit ``request`` or name every rule it breaks."""
    tenant = policy.tenant_for(request.gid, request.gname)
    if tenant is None:
        if policy.is_infrastructure_admin(request.gid, request.gname):
            return Decision(None)
        if request.pci:
            return Decision(None, (Refusal(
                "tenant", f"group {request.gname or request.gid} is no tenant in the policy and may not use "
                "passthrough devices or PCI NICs"),))  # fmt: skip
        return Decision(None)
    refusals = _device_refusals(tenant, request)
    gpus = gpu_count(request)
    if gpus:
        held = 0 if usage is None else usage.held_by_others(tenant.key, request.vm_id)
        if held + gpus > tenant.max_gpus:
            refusals.append(Refusal(f"tenant.{tenant.key}.max_gpus",
                                    f"tenant {tenant.key} holds {held} GPUs; {gpus} more exceed its cap of "
                                    f"{tenant.max_gpus}"))  # fmt: skip
    refusals += _network_refusals(tenant, request)
    return Decision(tenant.key, tuple(refusals))
