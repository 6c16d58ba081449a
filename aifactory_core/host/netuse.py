"""Network interfaces the host uses, by the PCI function behind them: an interface that carries an
address (IPv6 from ``/proc/net/if_inet6``, IPv4 over netlink) or the default route
(``/proc/net/route``, ``/proc/net/ipv6_route``), itself or through an interface stacked on it (a
bond, bridge, VLAN or macvlan: its ``upper_*`` links). Link-local IPv6 addresses do not count: the
kernel gives every interface that is up one of its own.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from aifactory_core.errors import HostError
from aifactory_core.host.pcipath import pci_function_of
from aifactory_core.host.sysfs import list_dir, read_int
from aifactory_core.hostroot import HostRoot

IPV6_LINK_SCOPE = 0x20
ROUTE_UP = 0x0001
ROUTE_REJECT = 0x0200
MAX_STACK = 8


def _ipv6_addresses(host: HostRoot) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (host.read_text("/proc/net/if_inet6") or "").splitlines():
        fields = line.split()
        if len(fields) != 6 or int(fields[3], 16) == IPV6_LINK_SCOPE:
            continue
        found.setdefault(fields[5], []).append(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    return found


def _ipv4_addresses(host: HostRoot) -> dict[str, list[str]]:
    """IPv4 addresses by interface. No procfs file maps them to interfaces, so they come over
    netlink (:mod:`aifactory_core.host.rtnl_addr`), from the live machine only: another host
    root has none to tell."""
    if not host.is_live:
        return {}
    from aifactory_core.host.rtnl_addr import ipv4_addresses

    try:
        by_index = ipv4_addresses()
    except OSError as error:
        raise HostError(f"cannot read the interfaces' addresses over netlink: {error}") from None
    names = {index: name for name, index in _ifindexes(host).items()}
    return {names[index]: addresses for index, addresses in by_index.items() if index in names}


def _ifindexes(host: HostRoot) -> dict[str, int]:
    base = host.path("/sys/class/net")
    return {name: index for name in list_dir(base) if (index := read_int(base / name / "ifindex")) is not None}


def interface_addresses(host: HostRoot) -> dict[str, list[str]]:
    """Interface name -> its addresses (link-local IPv6 left out)."""
    found = _ipv4_addresses(host)
    for name, addresses in _ipv6_addresses(host).items():
        found.setdefault(name, []).extend(addresses)
    return found


def default_route_interfaces(host: HostRoot) -> set[str]:
    """The interfaces an IPv4 or IPv6 default route leaves through."""
    found = set()
    for line in (host.read_text("/proc/net/route") or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "00000000" and fields[7] == "00000000" and int(fields[3], 16) & ROUTE_UP:
            found.add(fields[0])
    for line in (host.read_text("/proc/net/ipv6_route") or "").splitlines():
        fields = line.split()
        if len(fields) != 10 or fields[0] != "0" * 32 or fields[1] != "00" or fields[9] == "lo":
            continue
        flags = int(fields[8], 16)
        if flags & ROUTE_UP and not flags & ROUTE_REJECT:
            found.add(fields[9])
    return found


def _stacked_on(base: Path, name: str) -> list[str]:
    """``name`` and every interface stacked on it, transitively (bounded)."""
    seen = [name]
    for current in seen:
        if len(seen) > MAX_STACK:
            break
        for entry in list_dir(base / current):
            upper = entry.removeprefix("upper_")
            if entry.startswith("upper_") and upper not in seen:
                seen.append(upper)
    return seen


def net_uses(host: HostRoot) -> dict[str, str]:
    """PCI address -> why the host uses an interface it serves (the first reason found)."""
    addresses = interface_addresses(host)
    routes = default_route_interfaces(host)
    base = host.path("/sys/class/net")
    uses: dict[str, str] = {}
    for name in list_dir(base):
        if not (base / name / "device").exists():
            continue
        address = pci_function_of(base / name / "device")
        if address is None or address in uses:
            continue
        for carrier in _stacked_on(base, name):
            through = "" if carrier == name else f" (through {carrier})"
            if carrier in routes:
                uses[address] = f"{name} carries the default route{through}"
            elif addresses.get(carrier):
                uses[address] = f"{name} carries {addresses[carrier][0]}{through}"
            else:
                continue
            break
    return uses
