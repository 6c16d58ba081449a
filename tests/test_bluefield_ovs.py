"""The ``ovs_port`` and ``ovs_vxlan_port`` actions against a real Open vSwitch (userspace ``netdev``
datapath, started in a temporary directory on this host): three "representors" (veth pairs whose far
ends sit in network namespaces, standing in for the VFs) are plugged into the tenant bridge by the
lifecycle with the tenants' VLAN tags or VXLAN segments; ping works within a tenant and fails across,
and release removes the ports (a VNI's tunnel port with its last representor).
Skipped where OVS, ``ip netns`` or root are missing."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import needs
import pytest
from aifactory_plugins import bluefield
from aifactory_plugins.bluefield import ovs as bluefield_ovs
from aifactory_plugins.bluefield.vxlan import VxlanSegment
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aifactory_core.errors import HostError
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import executor

TOOLS = ("ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ip", "ping")
SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
@pytest.fixture(autouse=True)
def real_open_vswitch() -> None:
    needs.root("runs ovsdb-server and ovs-vswitchd")
    needs.tools(*TOOLS, hint="apt-get install openvswitch-switch iproute2 iputils-ping")
    if not SCHEMA.exists():
        needs.unavailable(f"{SCHEMA} missing (openvswitch-common)")


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=check)


@pytest.fixture
def ovs(tmp_path: Path) -> Iterator[list[str]]:
    d = tmp_path / "ovs"
    d.mkdir()
    env = {**os.environ, "OVS_RUNDIR": str(d), "OVS_LOGDIR": str(d), "OVS_DBDIR": str(d), "OVS_SYSCONFDIR": str(d)}
    sock = f"unix:{d}/db.sock"
    subprocess.run(["ovsdb-tool", "create", f"{d}/conf.db", str(SCHEMA)], check=True, env=env)
    subprocess.run(["ovsdb-server", f"{d}/conf.db", f"--remote=punix:{d}/db.sock", f"--pidfile={d}/db.pid",
                    f"--log-file={d}/db.log", "--detach"], check=True, env=env)
    vsctl = ["ovs-vsctl", f"--db={sock}", "--timeout=20"]
    subprocess.run([*vsctl, "--no-wait", "init"], check=True, env=env)
    subprocess.run(["ovs-vswitchd", sock, f"--pidfile={d}/vs.pid", f"--log-file={d}/vs.log", "--detach"],
                   check=True, env=env)
    try:
        run(*vsctl, "add-br", "br-tnt", "--", "set", "bridge", "br-tnt", "datapath_type=netdev")
        bluefield_ovs.configure_vsctl({"ovs_vsctl": vsctl})  # the actions run the configured command
        yield vsctl
    finally:
        bluefield_ovs.configure_vsctl({})
        for pid in ("vs.pid", "db.pid"):
            try:
                os.kill(int((d / pid).read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        for dev in ("br-tnt", "ovs-netdev"):
            run("ip", "link", "del", dev, check=False)


@pytest.fixture
def representors() -> Iterator[dict[str, str]]:
    tag = f"r{os.getpid() % 10000}"
    ends = {f"{tag}a1": "10.78.0.1", f"{tag}a2": "10.78.0.2", f"{tag}b1": "10.78.0.3"}
    try:
        for name, address in ends.items():
            run("ip", "netns", "add", name)
            run("ip", "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", name)
            run("ip", "link", "set", name, "up")
            run("ip", "netns", "exec", name, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
            run("ip", "netns", "exec", name, "ip", "link", "set", "eth0", "up")
        yield ends
    finally:
        for name in ends:
            run("ip", "netns", "del", name, check=False)
            run("ip", "link", "del", name, check=False)


def ping(ns: str, address: str) -> bool:
    return run("ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "2", address, check=False).returncode == 0


def test_representors_in_the_tenant_bridge_isolate_tenants(tmp_path: Path, ovs: list[str],
                                                          representors: dict[str, str]) -> None:
    host = HostRoot(tmp_path, tmp_path / "state")
    a1, a2, b1 = representors
    executor.prepare(host, 1, [bluefield.ovs_action(a1, "br-tnt", 100, 1),
                               bluefield.ovs_action(a2, "br-tnt", 100, 1)])
    executor.prepare(host, 2, [bluefield.ovs_action(b1, "br-tnt", 200, 2)])
    assert run(*ovs, "get", "Port", a1, "tag").stdout.strip() == "100"
    assert run(*ovs, "get", "Interface", b1, "external_ids:aifactory-vm").stdout.strip() == '"2"'
    assert ping(a1, "10.78.0.2")
    assert not ping(a1, "10.78.0.3") and not ping(b1, "10.78.0.2")
    executor.release(host, 2)
    assert b1 not in run(*ovs, "list-ports", "br-tnt").stdout.split()
    executor.release(host, 1)
    assert run(*ovs, "list-ports", "br-tnt").stdout.split() == []


def ports_of(vsctl: list[str], bridge: str = "br-tnt") -> dict[str, bluefield_ovs.PortRow]:
    rows = bluefield_ovs.bridge_ports(vsctl, bridge)
    assert rows is not None
    return {name: row for name, row in rows.items() if name != bridge}


def segment(vni: int) -> VxlanSegment:
    return VxlanSegment(vni, "192.0.2.10", "192.0.2.1", (4000, 4094))


def test_vxlan_segments_share_a_tunnel_per_vni_until_the_last_release(tmp_path: Path, ovs: list[str],
                                                                      representors: dict[str, str]) -> None:
    """Two VMs of VNI 5001 and one of VNI 5002: one tunnel port per VNI (``type=vxlan``,
    ``options:key``), each VNI on its own host-local tag shared only with its representors; the
    release of one VM of 5001 keeps the tunnel for the other, the last release removes it."""
    host = HostRoot(tmp_path, tmp_path / "state")
    a1, a2, b1 = representors
    executor.prepare(host, 1, [bluefield.vxlan_action(a1, "br-tnt", segment(5001), 1)])
    executor.prepare(host, 2, [bluefield.vxlan_action(a2, "br-tnt", segment(5001), 2)])
    executor.prepare(host, 3, [bluefield.vxlan_action(b1, "br-tnt", segment(5002), 3)])
    ports = ports_of(ovs)
    assert set(ports) == {a1, a2, b1, "vxlan5001", "vxlan5002"}
    assert ports[a1].tag == ports[a2].tag == ports["vxlan5001"].tag == 4000
    assert ports[b1].tag == ports["vxlan5002"].tag == 4001
    assert ports["vxlan5001"].external_ids == {"aifactory-vxlan": "5001"}
    assert ports[a2].external_ids == {"aifactory-vni": "5001", "aifactory-vm": "2"}
    assert run(*ovs, "get", "Interface", "vxlan5001", "type").stdout.strip() == "vxlan"
    assert run(*ovs, "get", "Interface", "vxlan5002", "options").stdout.strip() == (
        '{key="5002", local_ip="192.0.2.1", remote_ip="192.0.2.10"}')
    assert run(*ovs, "get", "Port", a1, "vlan_mode").stdout.strip() == "access"
    assert ping(a1, "10.78.0.2")  # one segment on this host
    assert not ping(a1, "10.78.0.3") and not ping(b1, "10.78.0.2")  # another VNI
    executor.release(host, 1)
    assert set(ports_of(ovs)) == {a2, b1, "vxlan5001", "vxlan5002"}
    executor.release(host, 2)
    assert set(ports_of(ovs)) == {b1, "vxlan5002"}
    executor.prepare(host, 4, [bluefield.vxlan_action(a1, "br-tnt", segment(5003), 4)])
    assert ports_of(ovs)["vxlan5003"].tag == 4000  # the freed tag is reused
    executor.release(host, 3)
    executor.release(host, 4)
    assert run(*ovs, "list-ports", "br-tnt").stdout.split() == []


def test_vxlan_failure_undoes_the_tunnel_and_undo_is_idempotent(tmp_path: Path, ovs: list[str],
                                                                representors: dict[str, str]) -> None:
    """A VM whose second port fails leaves neither its first port nor the tunnel it created; a VLAN
    port asking for a segment's local tag is refused; undoing twice is harmless."""
    host = HostRoot(tmp_path, tmp_path / "state")
    a1, a2, b1 = representors
    with pytest.raises(HostError, match="no OVS bridge br-gone"):
        executor.prepare(host, 1, [bluefield.vxlan_action(a1, "br-tnt", segment(5001), 1),
                                   bluefield.vxlan_action(a2, "br-gone", segment(5001), 1)])
    assert run(*ovs, "list-ports", "br-tnt").stdout.split() == []
    action = bluefield.vxlan_action(a1, "br-tnt", segment(5001), 2)
    executor.prepare(host, 2, [action])
    with pytest.raises(HostError, match="local tag of VXLAN 5001"):
        executor.prepare(host, 3, [bluefield.ovs_action(b1, "br-tnt", 4000, 3)])
    assert b1 not in run(*ovs, "list-ports", "br-tnt").stdout.split()
    other_vm = bluefield.vxlan_action(a1, "br-tnt", segment(5001), 9)
    executor.EXECUTORS[other_vm.kind].undo(host, other_vm, None)  # not VM 9's port: kept
    assert set(ports_of(ovs)) == {a1, "vxlan5001"}
    for _ in range(2):
        executor.EXECUTORS[action.kind].undo(host, action, None)
    assert run(*ovs, "list-ports", "br-tnt").stdout.split() == []
    executor.release(host, 2)


@pytest.fixture
def underlay(ovs: list[str]) -> Iterator[dict[str, str]]:
    """The wire between this host's VTEP and a remote one: bridge ``br-phy`` (netdev) holding
    192.0.2.1 and a veth to namespace ``<tag>u`` (192.0.2.10), where kernel VXLAN devices for VNI
    5001 and 5002 each sit in their own namespace as a remote VM (10.78.0.9 and 10.78.0.10).

    The remote devices send without UDP checksums (``noudpcsum``): over a veth the kernel leaves
    them to an offload that never happens, and the userspace datapath drops such packets."""
    tag = f"u{os.getpid() % 10000}"
    wire, remote_a, remote_b = f"{tag}w", f"{tag}a", f"{tag}b"
    try:
        for ns in (tag, remote_a, remote_b):
            run("ip", "netns", "add", ns)
        run("ip", "link", "add", wire, "type", "veth", "peer", "name", "eth0", "netns", tag)
        run("ip", "link", "set", wire, "up")
        run(*ovs, "add-br", "br-phy", "--", "set", "bridge", "br-phy", "datapath_type=netdev",
            "--", "add-port", "br-phy", wire)
        run("ip", "addr", "add", "192.0.2.1/24", "dev", "br-phy")
        run("ip", "link", "set", "br-phy", "up")
        run("ip", "netns", "exec", tag, "ip", "addr", "add", "192.0.2.10/24", "dev", "eth0")
        run("ip", "netns", "exec", tag, "ip", "link", "set", "eth0", "up")
        for vni, ns, address in ((5001, remote_a, "10.78.0.9"), (5002, remote_b, "10.78.0.10")):
            run("ip", "netns", "exec", tag, "ip", "link", "add", f"vx{vni}", "type", "vxlan", "id", str(vni),
                "local", "192.0.2.10", "remote", "192.0.2.1", "dstport", "4789", "noudpcsum")
            run("ip", "netns", "exec", tag, "ip", "link", "set", f"vx{vni}", "netns", ns)
            run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{address}/24", "dev", f"vx{vni}")
            run("ip", "netns", "exec", ns, "ip", "link", "set", f"vx{vni}", "up")
        yield {"5001": remote_a, "5002": remote_b, "vtep": tag}
    finally:
        run(*ovs, "--if-exists", "del-br", "br-phy", check=False)
        for ns in (tag, remote_a, remote_b):
            run("ip", "netns", "del", ns, check=False)
        run("ip", "link", "del", wire, check=False)
        run("ip", "link", "del", "br-phy", check=False)


def test_vxlan_on_the_wire_reaches_its_own_vni_only(tmp_path: Path, ovs: list[str], representors: dict[str, str],
                                                   underlay: dict[str, str]) -> None:
    """Real VXLAN encapsulation by the userspace datapath: each tenant's VF reaches the remote VM of
    its own VNI over the tunnel and never the other tenant's, though both sit behind one remote VTEP."""
    host = HostRoot(tmp_path, tmp_path / "state")
    a1, _a2, b1 = representors
    remote = VxlanSegment(5001, "192.0.2.10", "192.0.2.1", (4000, 4094))
    executor.prepare(host, 1, [bluefield.vxlan_action(a1, "br-tnt", remote, 1)])
    executor.prepare(host, 3, [bluefield.vxlan_action(b1, "br-tnt", replace(remote, vni=5002), 3)])
    assert ping(a1, "10.78.0.9") and ping(b1, "10.78.0.10")
    assert not ping(a1, "10.78.0.10") and not ping(b1, "10.78.0.9")
    executor.release(host, 3)
    assert ping(a1, "10.78.0.9")
    executor.release(host, 1)
    assert not ping(a1, "10.78.0.9")


@pytest.fixture
def spare_ports() -> Iterator[list[str]]:
    names = [f"s{os.getpid() % 10000}v{index}" for index in range(4)]
    try:
        for name in names:
            run("ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p")
        yield names
    finally:
        for name in names:
            run("ip", "link", "del", name, check=False)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([5001, 5002])), min_size=1, max_size=8))
def test_tunnel_ports_follow_their_representors(tmp_path: Path, ovs: list[str], spare_ports: list[str],
                                                steps: list[tuple[int, int]]) -> None:
    """Any order of plugs and releases of four VMs over two VNIs: a VNI has its tunnel port exactly
    while some representor of it is on the bridge, and shares its tag with them and nobody else."""
    host = HostRoot(tmp_path, tmp_path / "state-property")
    plugged: dict[int, int] = {}
    try:
        for vm, number in steps:
            if vm in plugged:
                executor.release(host, vm)
                del plugged[vm]
            else:
                executor.prepare(host, vm, [bluefield.vxlan_action(spare_ports[vm], "br-tnt", segment(number), vm)])
                plugged[vm] = number
            ports = ports_of(ovs)
            assert {name for name in ports if name.startswith("vxlan")} == {f"vxlan{n}" for n in plugged.values()}
            tags = {n: ports[f"vxlan{n}"].tag for n in set(plugged.values())}
            assert len(set(tags.values())) == len(tags)
            assert all(ports[spare_ports[v]].tag == tags[n] for v, n in plugged.items())
    finally:
        for vm in list(plugged):
            executor.release(host, vm)
    assert run(*ovs, "list-ports", "br-tnt").stdout.split() == []
