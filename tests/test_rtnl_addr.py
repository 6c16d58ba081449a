"""The IPv4 address dump over real rtnetlink, in a network namespace of its own, against iproute2's
``ip -4 -o addr`` and pyroute2's reading of the same kernel: enough addresses that the kernel
splits the dump over several datagrams, on veth interfaces up and down, a secondary address and a
peer address (``IFA_LOCAL`` differs from ``IFA_ADDRESS``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import needs
import pytest

SCRIPT = textwrap.dedent("""
    import json, socket, subprocess, sys
    def ip(*args):
        subprocess.run(["ip", *args], check=True)
    ip("link", "set", "lo", "up")
    ip("link", "add", "many0", "type", "veth", "peer", "name", "many1")
    ip("link", "set", "many0", "up")
    batch = "".join(f"addr add 10.{i // 250}.{i % 250}.1/32 dev many0\\n" for i in range(600))
    subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)
    ip("link", "add", "down0", "type", "veth", "peer", "name", "down1")
    ip("addr", "add", "192.0.2.9/24", "dev", "down0")
    ip("addr", "add", "192.0.2.10/24", "dev", "down0")  # a secondary address
    ip("link", "add", "ptp0", "type", "veth", "peer", "name", "ptp1")
    ip("addr", "add", "198.51.100.1", "peer", "198.51.100.2", "dev", "ptp0")
    from aifactory_core.host.rtnl_addr import ipv4_addresses
    ours = {str(index): sorted(addresses) for index, addresses in ipv4_addresses().items()}
    listed = {}
    shown = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    for line in shown.splitlines():
        index, _name, _inet, address = line.split()[:4]
        listed.setdefault(index.rstrip(":"), []).append(address.split("/")[0])
    from pyroute2 import IPRoute
    with IPRoute() as route:
        theirs = {}
        for message in route.get_addr(family=socket.AF_INET):
            address = message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS")
            theirs.setdefault(str(message["index"]), []).append(address)
    print(json.dumps({"ours": ours, "ip": {k: sorted(v) for k, v in listed.items()},
                      "pyroute2": {k: sorted(v) for k, v in theirs.items()}}))
""")


@pytest.fixture(scope="module")
def readings() -> dict[str, dict[str, list[str]]]:
    needs.tool("unshare", hint="util-linux")
    needs.tool("ip", hint="iproute2")
    needs.root("a network namespace of its own")
    done = subprocess.run(["unshare", "--net", sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, dict[str, list[str]]] = json.loads(done.stdout)
    return result


def test_every_address_iproute2_lists_and_nothing_else(readings: dict[str, dict[str, list[str]]]) -> None:
    assert readings["ours"] == readings["ip"]
    assert sum(len(addresses) for addresses in readings["ours"].values()) == 1 + 600 + 2 + 1


def test_the_same_reading_as_pyroute2(readings: dict[str, dict[str, list[str]]]) -> None:
    assert readings["ours"] == readings["pyroute2"]


def test_the_local_end_of_a_peer_address_and_a_down_interfaces_addresses(
        readings: dict[str, dict[str, list[str]]]) -> None:
    addresses = {address for listed in readings["ours"].values() for address in listed}
    assert {"198.51.100.1", "192.0.2.9", "192.0.2.10"} <= addresses
    assert "198.51.100.2" not in addresses  # the peer's end is no address of this host


def test_judging_the_live_hosts_use_loads_no_pyroute2() -> None:
    """What the root helper reads before every device move (``HostEvidence.read`` on the live
    machine) reads the addresses without pyroute2's package (about 280 more modules)."""
    statement = ("import sys; from pathlib import Path; from aifactory_core.hostroot import HostRoot; "
                 "from aifactory_core.host.hostuse import HostEvidence; HostEvidence.read(HostRoot(Path('/'))); "
                 "print(sorted({name.split('.')[0] for name in sys.modules}))")
    done = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True, timeout=60, check=True)
    loaded = set(json.loads(done.stdout.replace("'", '"')))
    assert "aifactory_core" in loaded and "pyroute2" not in loaded, sorted(loaded)
