"""Admission of a request by SHORT_ADDRESS alone: identified from the host pool oned answers.

The host documents are the synthesized OpenNebula sample ``host_gpu_numa.xml`` (XSD-valid for
7.0.2), put into a ``HOST_POOL`` as ``one.hostpool.info`` answers; the real-oned counterpart is
``tests/oned/test_oned_isolation.py``.
"""

from __future__ import annotations

import copy
from pathlib import Path

from lxml import etree

from aifactory_core.one.xmlsafe import parse_xml
from aifactory_core.policy.admission import address_lookup

SAMPLE = Path(__file__).parent / "fixtures" / "opennebula" / "samples" / "synthesized" / "host_gpu_numa.xml"
H100 = (0x10DE, 0x2330, 0x0302)


def pool(*hosts: etree._Element) -> etree._Element:
    root = etree.Element("HOST_POOL")
    root.extend(hosts)
    return root


def host() -> etree._Element:
    return parse_xml(SAMPLE.read_bytes(), SAMPLE.name)


def test_an_address_every_host_lists_with_one_device_is_identified() -> None:
    lookup = address_lookup(pool(host(), host()))
    assert lookup("17:00.0") == H100
    assert lookup("18:00.2") == (0x15B3, 0x101E, 0x0200)


def test_an_address_no_host_lists_stays_unidentified() -> None:
    assert address_lookup(pool(host()))("aa:00.0") is None
    assert address_lookup(pool())("17:00.0") is None


def test_hosts_listing_different_devices_at_one_address_leave_it_unidentified() -> None:
    other = host()
    for pci in other.iterfind("HOST_SHARE/PCI_DEVICES/PCI"):
        if pci.findtext("SHORT_ADDRESS") == "17:00.0":
            pci.find("DEVICE").text = "2331"  # an H100 PCIe where the first host has an SXM5
    assert address_lookup(pool(host(), other))("17:00.0") is None
    assert address_lookup(pool(host(), other))("18:00.2") == (0x15B3, 0x101E, 0x0200)


def test_a_malformed_entry_leaves_its_address_unidentified_whatever_other_hosts_list() -> None:
    bad = host()
    first = next(bad.iterfind("HOST_SHARE/PCI_DEVICES/PCI"))
    first.find("VENDOR").text = "not-hex"
    short = first.findtext("SHORT_ADDRESS")
    assert address_lookup(pool(host()))(short) is not None
    assert address_lookup(pool(bad))(short) is None
    assert address_lookup(pool(bad, copy.deepcopy(host())))(short) is None
