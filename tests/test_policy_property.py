"""Property: the decision never admits a VM outside its tenant's grant, and every refusal is
justified and names its rule. Random policies (written as TOML and parsed) and random requests;
an independent oracle written from the rules' definitions checks each verdict."""

from __future__ import annotations

from types import MappingProxyType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aifactory_core.one.vm import NicRequest, PciRequest, VmRequest
from aifactory_core.policy.decide import Usage, decide, parse_pkey
from aifactory_core.policy.schema import Policy, parse_policy

VENDORS = [0x10DE, 0x1002, 0x15B3]
DEVICES = [0x2330, 0x2335, 0x20B5, 0x101E]
CLASSES = [0x0302, 0x0300, 0x0200]
CLUSTERS = [100, 101, 102]
NETWORKS = list(range(8))


@st.composite
def policies(draw: st.DrawFn) -> str:
    count = draw(st.integers(1, 4))
    lines = ['[opennebula]\nversion = "7.0"\n']
    for index in range(count):
        base = index * 1000
        lines.append(f"[tenant.t{index}]\ngroup = \"g{index}\"\ngroup_id = {100 + index}")
        lines.append(f"max_gpus = {draw(st.integers(0, 6))}")
        clusters = draw(st.lists(st.sampled_from(CLUSTERS), unique=True, max_size=3))
        lines.append(f"clusters = {clusters}")
        lines.append(f"networks = {draw(st.lists(st.sampled_from(NETWORKS), unique=True, max_size=5))}")
        low = draw(st.integers(1, 900))
        lines.append(f'vlans = ["{base + low}-{base + low + draw(st.integers(0, 50))}"]')
        lines.append(f'vnis = ["{10000 + base + low}-{10000 + base + low + draw(st.integers(0, 50))}"]')
        first = 0x100 + index * 0x40
        lines.append(f'ib_pkeys = ["{hex(first)}-{hex(first + draw(st.integers(0, 63)))}"]')
        for grant in range(draw(st.integers(0, 3))):
            lines.append(f"[[tenant.t{index}.devices]]\nname = \"d{grant}\"")
            lines.append(f'vendor = "{draw(st.sampled_from(VENDORS)):04x}"')
            if draw(st.booleans()):
                lines.append(f'device = "{draw(st.sampled_from(DEVICES)):04x}"')
            if draw(st.booleans()):
                lines.append(f'class = "{draw(st.sampled_from(CLASSES)):04x}"')
            if clusters and draw(st.booleans()):
                lines.append(f"clusters = {draw(st.lists(st.sampled_from(clusters), unique=True, min_size=1))}")
        lines.append("")
    return "\n".join(lines)


def nic_attributes(pkey: str | None, outer: str | None) -> MappingProxyType[str, str]:
    values = {"IB_PKEY": pkey, "OUTER_VLAN_ID": outer}
    return MappingProxyType({name: value for name, value in values.items() if value is not None})


def pci(vendor: int, device: int, device_class: int, nic: bool, network: int | None, vlan: int | None,
        vn_mad: str | None, pkey: str | None, outer: str | None = None) -> PciRequest:  # fmt: skip
    attributes = nic_attributes(pkey, outer)
    return PciRequest(
        pci_id=0, type="NIC" if nic else None, address=None, short_address=None, vendor=vendor, device=device,
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
pcis = st.builds(pci, st.sampled_from(VENDORS), st.sampled_from(DEVICES), st.sampled_from(CLASSES), st.booleans(),
                 networks, vlans, vn_mads, pkeys, outers)  # fmt: skip
nics = st.builds(nic, networks, vlans, vn_mads, pkeys, outers)


@st.composite
def requests(draw: st.DrawFn) -> VmRequest:
    gid = draw(st.sampled_from([0, 1, 100, 101, 102, 103, 500]))
    return VmRequest(
        vm_id=draw(st.integers(0, 30)), name=None, uid=5, gid=gid, uname=None, gname=None, state=None,
        lcm_state=None, deploy_id=None, host=None, host_id=None,
        cluster_id=draw(st.one_of(st.none(), st.sampled_from(CLUSTERS))),
        pci=tuple(draw(st.lists(pcis, max_size=4))), nics=tuple(draw(st.lists(nics, max_size=3))), topology=None,
        numa_nodes=(), vcpu=None, cpu=None, memory_mib=None, hugepage_size=None, template_id=None,
    )  # fmt: skip


usages = st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["t0", "t1", "t2", "t3"]), st.integers(0, 4)),
                  max_size=12)  # fmt: skip


def violations(policy: Policy, request: VmRequest, usage: Usage) -> set[str]:
    """The oracle: every rule the request breaks, from the rules' definitions."""
    tenant = policy.by_gid.get(request.gid) if request.gid is not None else None
    if tenant is None:
        return set() if request.gid == 0 or not request.pci else {"tenant"}
    broken = set()
    prefix = f"tenant.{tenant.key}."
    for item in request.pci:
        if item.is_nic:
            continue
        grants = [g for g in tenant.devices if g.vendor == item.vendor and g.device in (None, item.device)
                  and g.device_class in (None, item.device_class)]  # fmt: skip
        if not grants or (request.cluster_id is not None
                          and all(g.clusters is not None and request.cluster_id not in g.clusters for g in grants)):
            broken.add(prefix + "devices")
    gpus = sum(1 for item in request.pci if not item.is_nic)
    others = sum(n for vm, (t, n) in usage.by_vm.items() if t == tenant.key and vm != request.vm_id)
    if gpus and others + gpus > tenant.max_gpus:
        broken.add(prefix + "max_gpus")
    for item in [*request.nics, *(p for p in request.pci if p.is_nic)]:
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


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies(), requests(), usages)
def test_no_admission_outside_the_grant_and_every_refusal_names_its_rule(text, request, entries) -> None:
    policy = parse_policy(text, "random.toml")
    usage = Usage.of(entries)
    decision = decide(policy, request, usage)
    expected = violations(policy, request, usage)
    assert {refusal.rule for refusal in decision.refusals} == expected
    assert decision.admitted == (not expected)
    for refusal in decision.refusals:
        assert refusal.message and refusal.rule in str(refusal)
