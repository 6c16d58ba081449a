"""Property: the decision never admits a VM outside its tenant's grant, and every refusal is
justified and names its rule. Random policies (written as TOML and parsed) and random requests;
an independent oracle written from the rules' definitions checks each verdict.

The PCI requests take every form oned accepts: selectors (VENDOR/DEVICE/CLASS, any of them
missing), SHORT_ADDRESS alone (resolved against a device list), and TYPE as ``NIC``, ``nic``,
``GPU`` or absent -- oned matches the device whatever the TYPE and treats a request as a NIC only
when TYPE is exactly ``NIC``. The host gate is checked on a random host (device table, devices held
by other VMs, vm.xml that may lie about devices, hostdevs vm.xml does not list), and across a
sequence of deploys onto one host: no tenant ever holds more GPUs than its cap, no device is given
that its tenant was not granted.

Cost: nearly all of the time goes to drawing (a case is well over a hundred choices), not to the
code under test. Strategies are therefore built once (module constants, or cached per sampled
sequence) instead of once per draw, and the stateful tests draw each step's choices through one
composite strategy rather than many ``data.draw`` calls; the choices drawn, their order and their
distribution are exactly those of drawing them one by one."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from types import MappingProxyType
from typing import TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from aifactory_core.model import DeployRequest
from aifactory_core.one.vm import NicRequest, PciRequest, VmRequest
from aifactory_core.policy.decide import Usage, decide, parse_pkey, resolve_addresses
from aifactory_core.policy.hostgate import decide_on_host, is_gpu_identity
from aifactory_core.policy.hostusage import usage_of
from aifactory_core.policy.schema import DeviceGrant, Policy, Tenant, parse_policy

VENDORS = [0x10DE, 0x1002, 0x15B3]
DEVICES = [0x2330, 0x2335, 0x20B5, 0x101E]
CLASSES = [0x0302, 0x0300, 0x0200, 0x0207]
TYPES = [None, "NIC", "nic", "Nic", "GPU"]
SHORT_ADDRESSES = ["17:00.0", "18:00.2", "3b:00.0", "5e:00.1"]
CLUSTERS = [100, 101, 102]
NETWORKS = list(range(8))
GIDS = [0, 100, 101, 102, 103, 500]
T = TypeVar("T")

BOOLEANS = st.booleans()
ONE_IN_FOUR = st.integers(0, 3)  # 0: the unusual branch
VENDOR_IDS = st.sampled_from(VENDORS)
DEVICE_IDS = st.sampled_from(DEVICES)
CLASS_IDS = st.sampled_from(CLASSES)
TENANT_COUNTS = st.integers(1, 4)
CAPS = st.integers(0, 6)
CLUSTER_LISTS = st.lists(st.sampled_from(CLUSTERS), unique=True, max_size=3)
NETWORK_LISTS = st.lists(st.sampled_from(NETWORKS), unique=True, max_size=5)
RANGE_STARTS = st.integers(1, 900)
RANGE_WIDTHS = st.integers(0, 50)
PKEY_WIDTHS = st.integers(0, 63)
GRANT_COUNTS = st.integers(0, 3)
ANY_GID = st.sampled_from(GIDS)
ANY_CLUSTER = st.one_of(st.none(), st.sampled_from(CLUSTERS))


@lru_cache(maxsize=4096)
def one_of_these(values: tuple[T, ...]) -> SearchStrategy[T]:
    """``st.sampled_from(values)``, built once per sequence (a strategy is costly to build and validate)."""
    return st.sampled_from(values)


@lru_cache(maxsize=4096)
def unique_lists(values: tuple[T, ...], min_size: int = 0, max_size: int | None = None) -> SearchStrategy[list[T]]:
    """``st.lists(st.sampled_from(values), unique=True, ...)``, built once per sequence."""
    return st.lists(st.sampled_from(values), unique=True, min_size=min_size, max_size=max_size)


@lru_cache(maxsize=1024)
def parsed(text: str) -> Policy:
    """``parse_policy`` (pure) once per text: about half the cases reuse an earlier case's policy."""
    return parse_policy(text, "random.toml")


@st.composite
def policies(draw: st.DrawFn) -> str:
    count = draw(TENANT_COUNTS)
    lines = ['[opennebula]\nversion = "7.0"\n']
    for index in range(count):
        base = index * 1000
        lines.append(f"[tenant.t{index}]\ngroup = \"g{index}\"\ngroup_id = {100 + index}")
        lines.append(f"max_gpus = {draw(CAPS)}")
        clusters = draw(CLUSTER_LISTS)
        lines.append(f"clusters = {clusters}")
        lines.append(f"networks = {draw(NETWORK_LISTS)}")
        low = draw(RANGE_STARTS)
        lines.append(f'vlans = ["{base + low}-{base + low + draw(RANGE_WIDTHS)}"]')
        lines.append(f'vnis = ["{10000 + base + low}-{10000 + base + low + draw(RANGE_WIDTHS)}"]')
        first = 0x100 + index * 0x40
        lines.append(f'ib_pkeys = ["{hex(first)}-{hex(first + draw(PKEY_WIDTHS))}"]')
        for grant in range(draw(GRANT_COUNTS)):
            lines.append(f"[[tenant.t{index}.devices]]\nname = \"d{grant}\"")
            lines.append(f'vendor = "{draw(VENDOR_IDS):04x}"')
            if draw(BOOLEANS):
                lines.append(f'device = "{draw(DEVICE_IDS):04x}"')
            if draw(BOOLEANS):
                lines.append(f'class = "{draw(CLASS_IDS):04x}"')
            if clusters and draw(BOOLEANS):
                lines.append(f"clusters = {draw(unique_lists(tuple(clusters), min_size=1))}")
        lines.append("")
    return "\n".join(lines)


def nic_attributes(pkey: str | None, outer: str | None) -> MappingProxyType[str, str]:
    values = {"IB_PKEY": pkey, "OUTER_VLAN_ID": outer}
    return MappingProxyType({name: value for name, value in values.items() if value is not None})


def pci(vendor: int | None, device: int | None, device_class: int | None, pci_type: str | None,
        network: int | None, vlan: int | None, vn_mad: str | None, pkey: str | None, outer: str | None = None,
        short_address: str | None = None, address: str | None = None) -> PciRequest:  # fmt: skip
    attributes = nic_attributes(pkey, outer)
    return PciRequest(
        pci_id=0, type=pci_type, address=address, short_address=short_address, vendor=vendor, device=device,
        device_class=device_class, numa_node=None, nic_id=None, network=None, network_id=network, vlan_id=vlan,
        mac=None, phydev=None, vn_mad=vn_mad, vm_address=None, vm_bus=None, vm_bus_index=None, uuid=None,
        profile=None, mdev_mode=None, attributes=attributes,
    )  # fmt: skip


def nic(network: int | None, vlan: int | None, vn_mad: str | None, pkey: str | None,
        outer: str | None = None) -> NicRequest:
    attributes = nic_attributes(pkey, outer)
    return NicRequest(nic_id=0, name=None, network=None, network_id=network, mac=None, ip=None, vlan_id=vlan,
                      bridge=None, phydev=None, vn_mad=vn_mad, model=None, target=None, security_groups=(),
                      attributes=attributes)  # fmt: skip


vlans = st.one_of(st.none(), st.integers(0, 4094), st.integers(10000, 14000))
pkeys = st.one_of(st.none(), st.sampled_from(["0x8100", "0x0140", "0x81ff", "0x7fff", "junk", "65535", "0x1c0"]))
networks = st.one_of(st.none(), st.sampled_from(NETWORKS))
vn_mads = st.sampled_from([None, "bridge", "802.1Q", "vxlan", "ovswitch", "ovswitch_vxlan"])
outers = st.one_of(st.none(), st.integers(0, 14000).map(str), st.sampled_from(["", "x12", "123456789"]))
types = st.sampled_from(TYPES)
by_selectors = st.builds(pci, st.one_of(st.none(), VENDOR_IDS), st.one_of(st.none(), DEVICE_IDS),
                         st.one_of(st.none(), CLASS_IDS), types, networks, vlans, vn_mads, pkeys, outers)  # fmt: skip
by_address = st.builds(pci, st.none(), st.none(), st.none(), types, networks, vlans, vn_mads, pkeys, outers,
                       st.sampled_from(SHORT_ADDRESSES))  # fmt: skip
pcis = st.one_of(by_selectors, by_address)
identities = st.tuples(VENDOR_IDS, DEVICE_IDS, CLASS_IDS)
device_lists = st.dictionaries(st.sampled_from(SHORT_ADDRESSES), identities)  # what sits at each short address
nics = st.builds(nic, networks, vlans, vn_mads, pkeys, outers)
REQUEST_GIDS = st.sampled_from([0, 1, 100, 101, 102, 103, 500])
VM_IDS = st.integers(0, 30)
PCI_LISTS = st.lists(pcis, max_size=4)
NIC_LISTS = st.lists(nics, max_size=3)


@st.composite
def requests(draw: st.DrawFn) -> VmRequest:
    gid = draw(REQUEST_GIDS)
    return VmRequest(
        vm_id=draw(VM_IDS), name=None, uid=5, gid=gid, uname=None, gname=None, state=None,
        lcm_state=None, deploy_id=None, host=None, host_id=None, cluster_id=draw(ANY_CLUSTER),
        pci=tuple(draw(PCI_LISTS)), nics=tuple(draw(NIC_LISTS)), topology=None,
        numa_nodes=(), vcpu=None, cpu=None, memory_mib=None, hugepage_size=None, template_id=None,
    )  # fmt: skip


usages = st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["t0", "t1", "t2", "t3"]), st.integers(0, 4)),
                  max_size=12)  # fmt: skip


def oned_nic(item: PciRequest) -> bool:
    """oned gives a PCI request a network only when its TYPE is exactly "NIC" (VirtualMachine.cc)."""
    return item.type == "NIC"


def network_class(device_class: int | None) -> bool:
    return device_class is not None and 0x0200 <= device_class <= 0x02FF


def covering(tenant: Tenant, vendor: int | None, device: int | None, device_class: int | None) -> list:
    return [g for g in tenant.devices if g.vendor == vendor and g.device in (None, device)
            and g.device_class in (None, device_class)]  # fmt: skip


def network_violations(tenant: Tenant, interfaces: list) -> set[str]:
    broken = set()
    prefix = f"tenant.{tenant.key}."
    for item in interfaces:
        if item.network_id not in tenant.networks:
            broken.add(prefix + "networks")
        if item.vn_mad == "ovswitch_vxlan":  # the VNI is OUTER_VLAN_ID; VLAN_ID tags inside the segment
            outer = item.attributes.get("OUTER_VLAN_ID", "")
            if not outer.isdigit() or not any(lo <= int(outer) <= hi for lo, hi in tenant.vnis.ranges):
                broken.add(prefix + "vnis")
        elif item.vlan_id is not None:
            if item.vn_mad == "vxlan":
                if not any(lo <= item.vlan_id <= hi for lo, hi in tenant.vnis.ranges):
                    broken.add(prefix + "vnis")
            elif not any(lo <= item.vlan_id <= hi for lo, hi in tenant.vlans.ranges):
                broken.add(prefix + "vlans")
        raw = item.attributes.get("IB_PKEY")
        if raw is not None:
            key = parse_pkey(raw)
            if key is None or not any(lo <= key <= hi for lo, hi in tenant.ib_pkeys.ranges):
                broken.add(prefix + "ib_pkeys")
    return broken


def violations(policy: Policy, request: VmRequest, usage: Usage, devices: dict | None = None) -> set[str]:
    """The oracle: every rule the request breaks, from the rules' definitions. ``devices``: what
    sits at each SHORT_ADDRESS (a request naming only one is that device; unknown: none)."""
    tenant = policy.by_gid.get(request.gid) if request.gid is not None else None
    if tenant is None:
        return set() if request.gid == 0 or not request.pci else {"tenant"}
    broken = set()
    prefix = f"tenant.{tenant.key}."
    gpus = 0
    for item in request.pci:
        vendor, device, device_class = item.vendor, item.device, item.device_class
        if item.short_address and vendor is None and device is None and device_class is None:
            vendor, device, device_class = (devices or {}).get(item.short_address, (None, None, None))
        if not network_class(device_class):
            gpus += 1  # may be given something else than a network function
        if oned_nic(item) and network_class(device_class):
            continue  # a NIC that can only be a network function: the network rules decide it
        grants = covering(tenant, vendor, device, device_class)
        if not grants or (request.cluster_id is not None
                          and all(g.clusters is not None and request.cluster_id not in g.clusters for g in grants)):
            broken.add(prefix + "devices")
    others = sum(n for vm, (t, n) in usage.by_vm.items() if t == tenant.key and vm != request.vm_id)
    if gpus and others + gpus > tenant.max_gpus:
        broken.add(prefix + "max_gpus")
    return broken | network_violations(tenant, [*request.nics, *(p for p in request.pci if oned_nic(p))])


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies(), requests(), usages, device_lists)
def test_no_admission_outside_the_grant_and_every_refusal_names_its_rule(text, request, entries, devices) -> None:
    policy = parsed(text)
    usage = Usage.of(entries)
    decision = decide(policy, resolve_addresses(request, devices.get), usage)
    expected = violations(policy, request, usage, devices)
    assert {refusal.rule for refusal in decision.refusals} == expected
    assert decision.admitted == (not expected)
    for refusal in decision.refusals:
        assert refusal.message and refusal.rule in str(refusal)


# ---- the host gate -------------------------------------------------------------------------------

HOST_SIZES = st.integers(1, 10)
HOLDERS = st.integers(0, 12)  # 10..12: a VM the gate never saw holds the device
MAYBE_GIDS = st.sampled_from([None, *GIDS])
DEPLOY_COUNTS = st.integers(1, 5)
GRANTED_DRIVERS = st.sampled_from([None, "802.1Q", "bridge"])
ONE_IN_FIVE = st.integers(0, 4)
ONE_IN_SIX = st.integers(0, 5)


def host_address(index: int) -> str:
    return f"0000:{0x10 + index:02x}:00.0"


def granted_identity(grants: tuple[DeviceGrant, ...], draw: st.DrawFn) -> tuple[int, int, int]:
    """Mostly what some tenant's grant names (so admissions happen and can be checked), else any."""
    if not grants or not draw(ONE_IN_FOUR):
        return draw(identities)
    grant = draw(one_of_these(grants))
    return (grant.vendor, grant.device if grant.device is not None else draw(DEVICE_IDS),
            grant.device_class if grant.device_class is not None else draw(CLASS_IDS))


@dataclass
class Host:
    table: dict[str, tuple[int, int, int]]  # a host's PCI functions: address -> the identity its sysfs reports
    held: dict[str, int]  # address -> the VM holding it (10..12: VMs the gate never saw)
    owners: dict[int, int]  # VM -> its group, where known
    deploys: int  # how many VMs are deployed onto it next


@st.composite
def hosts(draw: st.DrawFn, policy: Policy) -> Host:
    """A host with some devices held before, and how many deploys follow."""
    grants = tuple(grant for tenant in policy.tenants.values() for grant in tenant.devices)
    count = draw(HOST_SIZES)
    table = {host_address(index): granted_identity(grants, draw) for index in range(count)}
    held = {address: vm for address in table if (vm := draw(HOLDERS)) >= 10}
    owners = {vm: gid for vm in set(held.values()) if (gid := draw(MAYBE_GIDS)) is not None}
    return Host(table, held, owners, draw(DEPLOY_COUNTS))


def tenant_networks(tenant: Tenant | None, draw: st.DrawFn) -> tuple[int | None, int | None, str | None]:
    """NETWORK_ID, VLAN_ID, VN_MAD: mostly within ``tenant``'s grant, else anything."""
    if tenant is None or not tenant.networks or not draw(ONE_IN_FOUR):
        return draw(networks), draw(vlans), draw(vn_mads)
    vlan = None if not tenant.vlans.ranges or draw(BOOLEANS) else tenant.vlans.ranges[0][0]
    return draw(one_of_these(tuple(sorted(tenant.networks)))), vlan, draw(GRANTED_DRIVERS)


def allocated(address: str, claimed: tuple[int, int, int], pci_type: str | None,
              interface: tuple[int | None, int | None, str | None]) -> PciRequest:
    """A PCI element as vm.xml carries it once oned allocated ``address``: VENDOR/DEVICE/CLASS as
    the document claims (the truth, or not), TYPE as the template wrote it, a network if TYPE asked."""
    return pci(*claimed, pci_type, *interface, None, None, address[5:], address)


def vm_document(vm_id: int, gid: int, cluster: int | None, items: list[PciRequest], nic_list: list) -> VmRequest:
    return VmRequest(
        vm_id=vm_id, name=None, uid=5, gid=gid, uname=None, gname=None, state=3, lcm_state=3, deploy_id=None,
        host=None, host_id=None, cluster_id=cluster, pci=tuple(items), nics=tuple(nic_list), topology=None,
        numa_nodes=(), vcpu=None, cpu=None, memory_mib=None, hugepage_size=None, template_id=None,
    )  # fmt: skip


def leaks(policy: Policy, table: dict, held: dict[str, int], owners: dict[int, int], deploy: DeployRequest,
          document: VmRequest) -> list[str]:
    """What an admission of ``deploy`` would give that its tenant may not have (empty: nothing)."""
    given = list(dict.fromkeys([*deploy.pci_addresses, *(item.address for item in document.pci)]))
    if deploy.gid is not None and deploy.gid != document.gid:
        return ["two documents name two owners"]
    if any(address not in table for address in given):
        return ["a device that is not on the host"]
    tenant = policy.by_gid.get(document.gid)
    if tenant is None:
        return [] if document.gid == 0 or not given else ["devices to a group that is no tenant"]
    found = []
    typed = {item.address: item for item in document.pci}
    for address in given:
        vendor, device, device_class = table[address]
        if address in typed and oned_nic(typed[address]) and network_class(device_class):
            continue
        grants = covering(tenant, vendor, device, device_class)
        if document.cluster_id is not None:
            grants = [g for g in grants if g.clusters is None or document.cluster_id in g.clusters]
        if not grants:
            found.append(f"{address} ({vendor:04x}:{device:04x}:{device_class:04x}) not granted")
    holds = sum(1 for address, vm in held.items() if owners.get(vm) is not None
                and policy.by_gid.get(owners[vm]) is tenant and not network_class(table[address][2]))  # fmt: skip
    mine = sum(1 for address in given if not network_class(table[address][2]))
    if mine and holds + mine > tenant.max_gpus:
        found.append(f"{holds} held + {mine} > max_gpus {tenant.max_gpus}")
    nic_list = [*document.nics, *(item for item in document.pci if oned_nic(item))]
    return found + sorted(network_violations(tenant, nic_list))


@st.composite
def deploys_onto(draw: st.DrawFn, policy: Policy, table: dict, held: dict[str, int],
                 vm: int) -> tuple[DeployRequest, VmRequest]:
    """One deploy onto the host: oned allocated free functions to ``vm`` (vm.xml may claim other
    VENDOR/DEVICE/CLASS than the host's, TYPE takes every form), the deployment file may add a
    hostdev vm.xml does not list (or one the host does not have) and name another owner."""
    tenant_gids = tuple(sorted(policy.by_gid))
    gid = draw(one_of_these(tenant_gids)) if tenant_gids and draw(ONE_IN_FOUR) else draw(ANY_GID)
    tenant = policy.by_gid.get(gid)
    free = tuple(address for address in table if address not in held)
    chosen = draw(unique_lists(free, max_size=4)) if free else []
    items = [allocated(address, table[address] if draw(ONE_IN_FOUR) else draw(identities), draw(types),
                       tenant_networks(tenant, draw)) for address in chosen]  # fmt: skip
    nic_list = [nic(*tenant_networks(tenant, draw), None)] if draw(BOOLEANS) else []
    document = vm_document(vm, gid, draw(ANY_CLUSTER), items, nic_list)
    extra = []
    if free and draw(ONE_IN_FIVE) == 0:
        extra = [draw(one_of_these((*free, "0000:ee:00.0")))]
    meta_gid = gid if draw(ONE_IN_SIX) else draw(MAYBE_GIDS)
    hostdevs = tuple(dict.fromkeys([*(item.address for item in items), *extra]))
    return DeployRequest(vm_id=vm, pci_addresses=hostdevs, gid=meta_gid), document


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.data_too_large])
@given(policies(), st.data())
def test_host_gate_gives_no_device_outside_the_grant_and_no_tenant_more_gpus_than_its_cap(text, data) -> None:
    """VMs deployed one after another onto a random host through the host gate's decision: each
    admitted VM holds its devices (the ownership records) under its group (the tenancy records);
    some devices were held before by VMs the gate never saw (owner known or not). Every admission
    gives nothing the tenant was not granted and keeps every tenant within its cap on the host,
    whatever vm.xml claims and whatever TYPE the PCI requests carry; on a truthful vm.xml whose
    hostdevs are its PCI list the host decides exactly as the frontend does."""
    policy = parsed(text)
    host = data.draw(hosts(policy))
    table, held, owners = host.table, host.held, host.owners
    for vm in range(1, host.deploys + 1):
        deploy, document = data.draw(deploys_onto(policy, table, held, vm))
        usage = usage_of(held, lambda holder: (owners[holder], None) if holder in owners else None, policy,
                         lambda address: is_gpu_identity(table.get(address)))
        decision = decide_on_host(policy, deploy, document, table.get, None, usage)
        if decision.admitted:
            assert leaks(policy, table, held, owners, deploy, document) == []
            held.update({address: vm for address in deploy.pci_addresses})
            owners[vm] = document.gid
        truthful = all((item.vendor, item.device, item.device_class) == table[item.address]
                       for item in document.pci)  # fmt: skip
        if truthful and deploy.gid in (None, document.gid) and deploy.pci_addresses == tuple(
                item.address for item in document.pci):
            assert decision == decide(policy, document, usage)
    for tenant in policy.tenants.values():
        gpus = sum(1 for address, vm in held.items() if vm < 10 and policy.by_gid.get(owners[vm]) is tenant
                   and not network_class(table[address][2]))  # fmt: skip
        assert gpus <= tenant.max_gpus, (tenant.key, gpus)


# ---- the frontend across VMs and state changes ----------------------------------------------------

STATE_PENDING, STATE_HOLD, STATE_ACTIVE, STATE_STOPPED, STATE_SUSPENDED = 1, 2, 3, 4, 5
STATE_DONE, STATE_POWEROFF, STATE_UNDEPLOYED = 6, 8, 9
IN_USE = frozenset({STATE_PENDING, STATE_ACTIVE, STATE_SUSPENDED, STATE_POWEROFF})  # devices held or being placed
TENANT_MOVES = {  # what a VM owner may do (MANAGE operations), from -> to, as oned's DispatchManager
    "hold": ({STATE_PENDING}, STATE_HOLD),
    "poweroff": ({STATE_ACTIVE}, STATE_POWEROFF),
    "suspend": ({STATE_ACTIVE}, STATE_SUSPENDED),
    "stop": ({STATE_ACTIVE}, STATE_STOPPED),
    "undeploy": ({STATE_ACTIVE, STATE_POWEROFF}, STATE_UNDEPLOYED),
    "resume": ({STATE_POWEROFF, STATE_SUSPENDED}, STATE_ACTIVE),
    "resume-from-disk": ({STATE_STOPPED, STATE_UNDEPLOYED}, STATE_PENDING),  # no hooked call: the scheduler deploys
    "terminate": ({STATE_PENDING, STATE_HOLD, STATE_ACTIVE, STATE_STOPPED, STATE_SUSPENDED, STATE_POWEROFF,
                   STATE_UNDEPLOYED}, STATE_DONE),
}  # fmt: skip  # release is not here: install makes it an ADMIN operation


def frontend_vm(vm_id: int, gid: int, items: list[PciRequest], state: int) -> VmRequest:
    numbered = tuple(replace(item, pci_id=index) for index, item in enumerate(items))
    return replace(vm_document(vm_id, gid, None, [], []), pci=numbered, state=state, lcm_state=0)


DEVICE_TYPES = st.sampled_from([None, "GPU", "nic"])
STEP_COUNTS = st.integers(8, 14)
MOVES = st.sampled_from(["instantiate", "instantiate", "tenant", "tenant", "tenant", "attachpci"])
PCI_REQUESTS = st.lists(pcis, max_size=3)
GRANTED_COUNTS = st.integers(1, 3)


def granted_pci(tenant: Tenant, draw: st.DrawFn) -> PciRequest:
    """A PCI request one of ``tenant``'s grants covers (any TYPE oned accepts for a device)."""
    grant = draw(one_of_these(tenant.devices))
    device = grant.device if grant.device is not None else draw(DEVICE_IDS)
    device_class = grant.device_class if grant.device_class is not None else draw(CLASS_IDS)
    return pci(grant.vendor, device, device_class, draw(DEVICE_TYPES), None, None, None, None)


@dataclass(frozen=True)
class Action:
    """One step on the frontend: ``move`` on ``vm`` (the new VM, or the one moved or attached to)."""

    move: str
    vm: VmRequest | None = None
    target: int | None = None  # a tenant move: the state it leads to
    item: PciRequest | None = None  # attachpci: the device attached
    window: bool = False  # the scheduler deploys PENDING VMs after the move
    skipped: bool = False  # nothing happens (an attach oned would not do): no window, no check


@st.composite
def actions(draw: st.DrawFn, policy: Policy, vms: dict[int, VmRequest], step: int) -> Action:
    """What happens next, given the VMs so far (every choice of the step, in the order it is made)."""
    move = draw(MOVES)
    if move == "instantiate":
        tenant_gids = tuple(sorted(policy.by_gid))
        gid = draw(one_of_these(tenant_gids)) if tenant_gids and draw(ONE_IN_FIVE) else draw(ANY_GID)
        if vms and draw(BOOLEANS):  # the same tenant again: caps are about a tenant's several VMs
            gid = vms[max(vms)].gid or 0
        tenant = policy.by_gid.get(gid)
        items = draw(PCI_REQUESTS)
        if tenant is not None and tenant.devices and draw(ONE_IN_FOUR):
            items = [granted_pci(tenant, draw) for _ in range(draw(GRANTED_COUNTS))]
        action = Action(move, frontend_vm(step, gid, items, STATE_HOLD))
    elif move == "tenant":
        movable = tuple(sorted(vm_id for vm_id, vm in vms.items() if vm.state != STATE_DONE))
        action = Action(move)
        if movable:
            vm = vms[draw(one_of_these(movable))]
            moves = tuple(sorted(name for name, (sources, _) in TENANT_MOVES.items() if vm.state in sources))
            action = Action(move, vm, target=TENANT_MOVES[draw(one_of_these(moves))][1])
    else:
        off = tuple(sorted(vm_id for vm_id, vm in vms.items() if vm.state in (STATE_POWEROFF, STATE_UNDEPLOYED)))
        if not off:
            return Action(move, skipped=True)
        vm = vms[draw(one_of_these(off))]
        owner = policy.by_gid.get(vm.gid) if vm.gid is not None else None
        if owner is not None and owner.devices and draw(BOOLEANS):
            item = granted_pci(owner, draw)
        else:
            item = draw(by_selectors)
        if item.type == "NIC":
            return Action(move, vm, item=item, skipped=True)  # oned attaches it only through one.vm.attachnic
        action = Action(move, vm, item=item)
    return replace(action, window=draw(ONE_IN_FOUR) != 0)


def granted_alone(policy: Policy, vm: VmRequest) -> bool:
    """Every PCI of ``vm`` passes the device and tenant rules on its own (the cap aside)."""
    for item in vm.pci:
        alone = replace(vm, pci=(item,), nics=())
        if any(not refusal.rule.endswith(".max_gpus") for refusal in decide(policy, alone).refusals):
            return False
    return True


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.data_too_large])
@given(policies(), st.data())
def test_frontend_admission_keeps_every_tenant_within_its_cap_across_vms_and_state_changes(text, data) -> None:
    """Sequences of what tenants and operators do on the frontend: instantiate (held, then the
    admission hook: release or keep held), the scheduler deploying PENDING VMs, the owner's MANAGE
    operations (hold, poweroff, suspend, stop, undeploy, resume -- from STOPPED/UNDEPLOYED without
    any hooked call --, terminate; never release, an ADMIN operation), and an operator's PCI attach
    to a POWEROFF/UNDEPLOYED VM followed by the hook's detaches. After every step no tenant has
    more GPUs in use (PENDING, ACTIVE, SUSPENDED, POWEROFF) than its cap and no VM in use has a
    device its tenant was not granted, whatever TYPE the PCI requests carry."""
    from aifactory_core.policy.admission import Event, detach_steps, plan, usage_from_pool
    from aifactory_core.policy.decide import gpu_count

    policy = parsed(text)
    vms: dict[int, VmRequest] = {}
    for step in range(data.draw(STEP_COUNTS)):
        action = data.draw(actions(policy, vms, step))
        if action.skipped:
            continue
        if action.move == "instantiate":
            assert action.vm is not None
            vm = action.vm
            decision = decide(policy, vm, usage_from_pool(policy, vms.values()))
            vms[vm.vm_id] = vm
            for call in plan(Event("one.template.instantiate", None), vm, decision):  # type: ignore[arg-type]
                if call.params[0] == "release":
                    vms[vm.vm_id] = VmRequest(**{**vm.__dict__, "state": STATE_PENDING})
        elif action.move == "tenant":
            if action.vm is not None:
                vms[action.vm.vm_id] = VmRequest(**{**action.vm.__dict__, "state": action.target})
        elif action.move == "attachpci":
            assert action.vm is not None and action.item is not None
            vm = action.vm
            vm = frontend_vm(vm.vm_id, vm.gid or 0, [*vm.pci, action.item], vm.state)
            event = Event("one.vm.attachpci", None)  # type: ignore[arg-type]
            others = [other for other_id, other in vms.items() if other_id != vm.vm_id]
            usage = usage_from_pool(policy, [*others, vm])
            decision = decide(policy, vm, usage)
            calls = plan(event, vm, decision, detach=detach_steps(policy, event, vm, usage) if not decision.admitted
                         else ())  # fmt: skip
            gone = {call.params[1] for call in calls if call.method == "one.vm.detachpci"}
            kept = [pci for pci in vm.pci if pci.pci_id not in gone]
            vms[vm.vm_id] = frontend_vm(vm.vm_id, vm.gid or 0, kept, vm.state)
        if action.window:  # the scheduler's window: PENDING VMs are deployed
            for vm_id, vm in list(vms.items()):
                if vm.state == STATE_PENDING:
                    vms[vm_id] = VmRequest(**{**vm.__dict__, "state": STATE_ACTIVE})
        for tenant in policy.tenants.values():
            in_use = sum(gpu_count(vm) for vm in vms.values()
                         if vm.state in IN_USE and policy.tenant_for(vm.gid, None) is tenant)  # fmt: skip
            assert in_use <= tenant.max_gpus, (tenant.key, in_use, vms)
    for vm in vms.values():  # every device in use is granted (a VM's PCI only shrinks once admitted)
        if vm.state in IN_USE and vm.pci:
            if policy.tenant_for(vm.gid, None) is None:
                assert policy.is_infrastructure_admin(vm.gid, None), vm
            else:
                assert granted_alone(policy, vm), vm
