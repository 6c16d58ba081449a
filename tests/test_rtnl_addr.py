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


# --- answers the kernel will not give on demand: a scripted socket stands in for it ------------------

class _ScriptedSocket:
    """Gives the datagrams of ``script`` (one list per dump attempt) as ``recvfrom`` answers."""

    def __init__(self, script: list[list[tuple[bytes, int]]]) -> None:
        self.script = script

    def __call__(self, *args: object) -> _ScriptedSocket:
        self.answers = self.script.pop(0)
        return self

    def __enter__(self) -> _ScriptedSocket:
        return self

    def __exit__(self, *args: object) -> None:
        return None

    def settimeout(self, value: float) -> None:
        return None

    def bind(self, address: tuple[int, int]) -> None:
        return None

    def sendall(self, data: bytes) -> None:
        return None

    def recvfrom(self, size: int) -> tuple[bytes, tuple[int, int]]:
        data, port = self.answers.pop(0)
        return data, (port, 0)


def _message(kind: int, body: bytes, flags: int = 0) -> bytes:
    from aifactory_core.host import rtnl_addr

    header = rtnl_addr.NLMSG_HEADER
    raw = header.pack(header.size + len(body), kind, flags, rtnl_addr.SEQUENCE, 0) + body
    return raw + b"\0" * (-len(raw) % 4)


def _address(index: int, address: str, flags: int = 0) -> bytes:
    import socket as sockets

    from aifactory_core.host import rtnl_addr

    packed = sockets.inet_aton(address)
    attribute = rtnl_addr.RTATTR.pack(rtnl_addr.RTATTR.size + 4, rtnl_addr.IFA_LOCAL) + packed
    body = rtnl_addr.IFADDRMSG.pack(sockets.AF_INET, 24, 0, 0, index) + attribute
    return _message(rtnl_addr.RTM_NEWADDR, body, flags)


def _done(error: int = 0) -> bytes:
    from aifactory_core.host import rtnl_addr

    return _message(rtnl_addr.NLMSG_DONE, rtnl_addr.ERROR_CODE.pack(error))


def _read(monkeypatch: pytest.MonkeyPatch, script: list[list[tuple[bytes, int]]]) -> dict[int, list[str]]:
    import socket as sockets

    from aifactory_core.host import rtnl_addr

    monkeypatch.setattr(sockets, "socket", _ScriptedSocket(script))
    return rtnl_addr.ipv4_addresses()


def test_an_interrupted_dump_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from aifactory_core.host import rtnl_addr

    def interrupted() -> list[tuple[bytes, int]]:
        return [(_address(2, "10.0.0.1", rtnl_addr.NLM_F_DUMP_INTR) + _done(), 0)]

    whole = [(_address(2, "10.0.0.1") + _address(3, "10.0.0.2") + _done(), 0)]
    assert _read(monkeypatch, [interrupted(), whole]) == {2: ["10.0.0.1"], 3: ["10.0.0.2"]}
    with pytest.raises(OSError, match="kept changing"):
        _read(monkeypatch, [interrupted() for _ in range(rtnl_addr.ATTEMPTS)])


def test_an_error_the_dump_ends_with_is_an_oserror(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from aifactory_core.host import rtnl_addr

    with pytest.raises(OSError) as raised:
        _read(monkeypatch, [[(_address(2, "10.0.0.1") + _done(-errno.EINTR), 0)]])
    assert raised.value.errno == errno.EINTR
    with pytest.raises(OSError, match="short rtnetlink error"):  # a header alone: no struct.error
        _read(monkeypatch, [[(_message(rtnl_addr.NLMSG_ERROR, b""), 0)]])


def test_datagrams_not_from_the_kernel_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    forged = (_address(2, "10.9.9.9") + _done(), 4242)
    assert _read(monkeypatch, [[forged, (_address(2, "10.0.0.1") + _done(), 0)]]) == {2: ["10.0.0.1"]}
