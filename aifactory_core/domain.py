"""The libvirt domain XML ("deployment file") OpenNebula hands to the VMM ``deploy`` action.

One owner for reading, normalising and writing it: the hardened parser, the merge of oned's second
top-level ``<devices>`` block (written when the guest agent is on; libvirt accepts it, its schema
does not), the ``<one:vm>`` metadata that identifies the VM's owner on the host, and the hostdevs.
Plugins edit the parsed tree through the ``aifactory_domain_xml`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aifactory_core.errors import DocumentError, UsageError
from aifactory_core.validate import pci_address

if TYPE_CHECKING:
    from lxml import etree

ONE_METADATA_NS = "http://opennebula.org/xmlns/libvirt/1.0"
MAX_DOMAIN_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class OneMetadata:
    """``<metadata><one:vm>``: who owns the VM, as oned wrote it into the domain."""

    name: str | None
    uname: str | None
    uid: int | None
    gname: str | None
    gid: int | None
    pci_devices: tuple[str, ...]


@dataclass(frozen=True)
class HostdevRef:
    """A ``<hostdev type='pci'>`` of the domain: the host function and how libvirt manages it."""

    address: str
    managed: bool


def load_domain(data: bytes | str, what: str = "deployment file") -> etree._Element:
    """Parse a domain document hardened, check it is a domain, and merge duplicate ``<devices>``."""
    from aifactory_core.one.xmlsafe import parse_xml

    root = parse_xml(data, what, max_bytes=MAX_DOMAIN_BYTES)
    if root.tag != "domain":
        raise DocumentError(f"{what} is not a libvirt domain (root element <{root.tag}>)")
    merge_devices(root)
    return root


def merge_devices(root: etree._Element) -> None:
    """Move the children of every later top-level ``<devices>`` into the first one."""
    blocks = root.findall("devices")
    if len(blocks) < 2:
        return
    first = blocks[0]
    for extra in blocks[1:]:
        for child in list(extra):
            first.append(child)
        root.remove(extra)


def dump_domain(root: etree._Element) -> bytes:
    """Serialise the domain as libvirt reads it (UTF-8, no XML declaration)."""
    from lxml import etree

    text: bytes = etree.tostring(root, encoding="utf-8")
    return text + b"\n"


def _int_or_none(text: str | None, what: str) -> int | None:
    if text is None or not text.strip():
        return None
    if not text.strip().isdigit():
        raise DocumentError(f"deployment file metadata {what} is not a number: {text!r}")
    return int(text.strip())


def one_metadata(root: etree._Element) -> OneMetadata | None:
    """The VM identity oned wrote into ``<metadata><one:vm>``, or ``None`` when absent."""
    vm = root.find(f"metadata/{{{ONE_METADATA_NS}}}vm")
    if vm is None:
        return None

    def text(name: str) -> str | None:
        value = vm.findtext(f"{{{ONE_METADATA_NS}}}{name}")
        return value.strip() if value is not None else None

    pci = text("pci_devices") or ""
    return OneMetadata(
        name=text("name"),
        uname=text("uname"),
        uid=_int_or_none(text("uid"), "uid"),
        gname=text("gname"),
        gid=_int_or_none(text("gid"), "gid"),
        pci_devices=tuple(item for item in pci.split(",") if item),
    )


def hostdev_address(hostdev: etree._Element) -> str:
    """The host PCI address in ``<hostdev><source><address domain= bus= slot= function=>``."""
    source = hostdev.find("source/address")
    if source is None:
        raise DocumentError("deployment file has a PCI hostdev without <source><address>")
    try:
        parts = [int(source.get(key, ""), 16) for key in ("domain", "bus", "slot", "function")]
        return pci_address(f"{parts[0]:04x}:{parts[1]:02x}:{parts[2]:02x}.{parts[3]:x}")
    except (ValueError, UsageError):
        raise DocumentError(f"deployment file hostdev address is invalid: {dict(source.attrib)}") from None


def pci_hostdevs(root: etree._Element) -> list[tuple[etree._Element, HostdevRef]]:
    """Every PCI ``<hostdev>`` of the domain with the host function it takes."""
    result = []
    for hostdev in root.iterfind("devices/hostdev"):
        if hostdev.get("type") != "pci" or hostdev.get("mode", "subsystem") != "subsystem":
            continue
        result.append((hostdev, HostdevRef(hostdev_address(hostdev), hostdev.get("managed", "no") == "yes")))
    return result
