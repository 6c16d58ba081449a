"""Strict patterns for every value that becomes a path, a netlink argument or a command argument.

Anything that reaches sysfs, procfs, netlink or argv passes through one of these checks first;
they raise :class:`UsageError` with a one-line message naming the offending value.
"""

from __future__ import annotations

import re

from aifactory_core.errors import UsageError

_PCI_ADDRESS = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{2}):([0-1][0-9a-f])\.([0-7])$")
_PCI_SHORT = re.compile(r"^([0-9a-f]{2}):([0-1][0-9a-f])\.([0-7])$")
# OpenNebula's ADDRESS attribute uses ':' before the function: 0000:17:00:0
_PCI_ONE = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{2}):([0-1][0-9a-f]):([0-7])$")
_DRIVER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,14}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_HEX16 = re.compile(r"^(0x)?[0-9a-f]{1,4}$")


def _clean(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{what} must be a string, got {type(value).__name__}")
    text = value.strip().lower()
    if not text or len(text) > 64:
        raise UsageError(f"{what} {value!r} is empty or too long")
    return text


def pci_address(value: object) -> str:
    """Return the canonical ``dddd:bb:ss.f`` form of a PCI address, or raise.

    Accepts the full sysfs form, the short ``bb:ss.f`` form (domain 0000) and OpenNebula's
    ``dddd:bb:ss:f`` ADDRESS form. Rejects anything else, including ``../`` and wrong widths.
    """
    text = _clean(value, "PCI address")
    for pattern, has_domain in ((_PCI_ADDRESS, True), (_PCI_ONE, True), (_PCI_SHORT, False)):
        match = pattern.fullmatch(text)
        if match:
            groups = match.groups()
            if not has_domain:
                groups = ("0000", *groups)
            return f"{groups[0]}:{groups[1]}:{groups[2]}.{groups[3]}"
    raise UsageError(f"invalid PCI address {value!r}: expected dddd:bb:ss.f (hex)")


def driver_name(value: object) -> str:
    """A kernel driver name as it appears under /sys/bus/pci/drivers (no '/', no spaces)."""
    if not isinstance(value, str) or not _DRIVER.fullmatch(value):
        raise UsageError(f"invalid driver name {value!r}: letters, digits, '_', '-', '.' only")
    return value


def ifname(value: object) -> str:
    """A Linux network interface name (at most 15 characters, no '/', no spaces)."""
    if not isinstance(value, str) or not _IFNAME.fullmatch(value) or value in (".", ".."):
        raise UsageError(f"invalid interface name {value!r}")
    return value


def mac_address(value: object, *, allow_multicast: bool = False) -> str:
    """A unicast MAC address in lower-case colon form."""
    text = _clean(value, "MAC address").replace("-", ":")
    if not _MAC.fullmatch(text):
        raise UsageError(f"invalid MAC address {value!r}")
    if not allow_multicast and int(text[:2], 16) & 1:
        raise UsageError(f"MAC address {value!r} is multicast")
    return text


def hex_id(value: object, what: str = "PCI id") -> int:
    """A 16-bit hexadecimal identifier such as a PCI vendor or device id ('10de', '0x10de')."""
    text = _clean(value, what)
    if not _HEX16.fullmatch(text):
        raise UsageError(f"invalid {what} {value!r}: expected up to 4 hex digits")
    return int(text, 16)


def int_in_range(value: object, low: int, high: int, what: str) -> int:
    """An integer within [low, high]; accepts int or decimal string."""
    if isinstance(value, bool):
        raise UsageError(f"invalid {what} {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,12}", value.strip()):
        number = int(value.strip())
    else:
        raise UsageError(f"invalid {what} {value!r}: not an integer")
    if not low <= number <= high:
        raise UsageError(f"{what} {number} outside {low}..{high}")
    return number


def vm_id(value: object) -> int:
    """An OpenNebula VM id."""
    return int_in_range(value, 0, 2**31 - 1, "VM id")


MAX_VNI = 2**24 - 1


def vni(value: object) -> int:
    """A VXLAN network identifier (24 bits; 0 is reserved)."""
    return int_in_range(value, 1, MAX_VNI, "VNI")


def ip_address(value: object, what: str = "IP address") -> str:
    """A unicast IPv4 or IPv6 address in its canonical text form (no prefix, no zone)."""
    import ipaddress

    if not isinstance(value, str) or not 2 <= len(value) <= 45:
        raise UsageError(f"invalid {what} {value!r}")
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        raise UsageError(f"invalid {what} {value!r}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise UsageError(f"invalid {what} {value!r}: no zone index")
    if address.is_multicast or address.is_unspecified:
        raise UsageError(f"{what} {value!r} is not a unicast address")
    return str(address)
