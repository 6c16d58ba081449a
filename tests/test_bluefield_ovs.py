"""The ``ovs_port`` action against a real Open vSwitch (userspace ``netdev`` datapath, started in a
temporary directory on this host): three "representors" (veth pairs whose far ends sit in network
namespaces, standing in for the VFs) are plugged into the tenant bridge by the lifecycle with the
tenants' VLAN tags; ping works within a tenant and fails across, and release removes the ports.
Skipped where OVS, ``ip netns`` or root are missing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from aifactory_plugins import bluefield

from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import executor

TOOLS = ("ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ip", "ping")
SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in TOOLS) or not SCHEMA.exists(),
                                reason="needs root, Open vSwitch and iproute2")


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
        yield vsctl
    finally:
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
    executor.prepare(host, 1, [bluefield.ovs_action(a1, "br-tnt", 100, 1, ovs),
                               bluefield.ovs_action(a2, "br-tnt", 100, 1, ovs)])
    executor.prepare(host, 2, [bluefield.ovs_action(b1, "br-tnt", 200, 2, ovs)])
    assert run(*ovs, "get", "Port", a1, "tag").stdout.strip() == "100"
    assert run(*ovs, "get", "Interface", b1, "external_ids:aifactory-vm").stdout.strip() == '"2"'
    assert ping(a1, "10.78.0.2")
    assert not ping(a1, "10.78.0.3") and not ping(b1, "10.78.0.2")
    executor.release(host, 2)
    assert b1 not in run(*ovs, "list-ports", "br-tnt").stdout.split()
    executor.release(host, 1)
    assert run(*ovs, "list-ports", "br-tnt").stdout.split() == []
