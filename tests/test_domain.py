"""The deployment-file owner, against the OpenNebula-shaped sample and libvirt's own validator."""

import subprocess
from pathlib import Path

import needs
import pytest

from aifactory_core.domain import dump_domain, load_domain, one_metadata, pci_hostdevs
from aifactory_core.errors import DocumentError

SAMPLE = Path(__file__).parent / "fixtures" / "opennebula" / "samples" / "synthesized" / "deployment.0.xml"


def test_second_devices_block_is_merged() -> None:
    from lxml import etree

    raw = SAMPLE.read_bytes()
    assert len(etree.fromstring(raw).findall("devices")) == 2
    root = load_domain(raw)
    assert len(root.findall("devices")) == 1
    assert root.find("devices/channel") is not None  # the guest-agent channel moved into the first block


def test_metadata_and_hostdevs() -> None:
    root = load_domain(SAMPLE.read_bytes())
    meta = one_metadata(root)
    assert meta is not None
    assert (meta.uname, meta.uid, meta.gname, meta.gid) == ("alice", 5, "tenant-a", 100)
    assert meta.pci_devices == ("10de:2330:0302", "15b3:101e:0200")
    refs = [ref for _element, ref in pci_hostdevs(root)]
    assert [ref.address for ref in refs] == ["0000:17:00.0", "0000:18:00.2"]
    assert all(ref.managed for ref in refs)


def test_merged_domain_passes_libvirt_schema(tmp_path: Path) -> None:
    needs.tool("virt-xml-validate", hint="apt-get install libvirt-clients")
    original = tmp_path / "original.xml"
    original.write_bytes(SAMPLE.read_bytes())
    merged = tmp_path / "merged.xml"
    merged.write_bytes(dump_domain(load_domain(SAMPLE.read_bytes())))
    before = subprocess.run(["virt-xml-validate", str(original), "domain"], capture_output=True, text=True)
    after = subprocess.run(["virt-xml-validate", str(merged), "domain"], capture_output=True, text=True)
    assert before.returncode != 0, "the unmerged oned output is expected to fail libvirt's schema"
    assert after.returncode == 0, after.stderr


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"<VM><ID>1</ID></VM>", "not a libvirt domain"),
        (b"<domain><devices><hostdev mode='subsystem' type='pci'><source><address domain='0x0000' bus='0xzz' "
         b"slot='0x00' function='0x0'/></source></hostdev></devices></domain>", "hostdev address is invalid"),
        (b"<domain", "not well-formed"),
    ],
)
def test_bad_deployment_files_are_refused(document: bytes, message: str) -> None:
    with pytest.raises(DocumentError, match=message):
        root = load_domain(document)
        pci_hostdevs(root)
