"""The cpu_pinning rewrite on deployment files as OpenNebula 7.0.2 and 7.4.0 write them.

The PCI tree differs between the releases (expanders at ``20 + 14 i`` behind a switch on 7.0,
``3 + 9 i`` with eight root ports and ``ROOT = "dedicated"`` expanders on 7.4, a flat row of root
ports, unindexed on 7.0, for a VM oned did not pin): the rewrite reads it from the domain, so each
shape comes out with every device behind an expander of its guest cell, no address naming a
missing controller and no guest address twice, libvirt's schema satisfied, every possible vCPU
pinned, and the same document when rewritten again (``tests/pinning_oned.py``). Deployment files a
real oned 7.0.2 wrote (``tests/fixtures/opennebula/recorded/``) have the PCI tree of the 7.0.2
shapes and go through the same checks.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import needs
import pytest
from pinning_oned import (
    KINDS,
    VERSIONS,
    check_rewrite_of_oned_domain,
    dangling_buses,
    oned_domain,
    shared_guest_addresses,
    validate,
)

from aifactory_core.domain import dump_domain, load_domain

SHAPES = [(version, kind) for version in VERSIONS for kind in KINDS if kind != "dedicated" or version == "7.4.0"]


@pytest.fixture(autouse=True)
def validator() -> str:
    return needs.tool("virt-xml-validate", hint="apt-get install libvirt-clients")


@pytest.mark.parametrize(("version", "kind"), SHAPES)
def test_each_releases_deployment_file_is_rewritten_soundly(version: str, kind: str, tmp_path: Path) -> None:
    text = oned_domain(version, kind)
    raw = load_domain(text.encode())
    validate(dump_domain(raw), tmp_path, "as-oned-wrote-it.xml")  # the shape itself is libvirt's
    if kind == "pinned":  # oned numbers the device's port by its host node (#7408): no such controller
        assert dangling_buses(raw)
    if kind == "dedicated":  # ... and on 7.4 a shared device of node 1 lands on the dedicated GPU's port
        assert shared_guest_addresses(raw) == [(13, 0, 0)]
    domain, placement = check_rewrite_of_oned_domain(text.encode(), tmp_path)
    if kind == "vcpu-max":
        assert domain.find("vcpu").get("current") == "2" and len(domain.findall("cputune/vcpupin")) == 4
    if kind == "pinned-2cells-crossed":
        nodes = {e.get("index"): e.findtext("target/node")
                 for e in domain.findall("devices/controller[@model='pcie-expander-bus']")}
        expected = {"7.0.2": {"20": "1", "34": "0"}, "7.4.0": {"3": "1", "12": "0"}}[version]
        assert nodes == expected, "each expander takes the guest cell of the device beneath it"
    if version == "7.0.2" and kind == "flat":  # 16 unindexed root ports and the bridge hold 1..17
        added = [int(e.get("index")) for e in domain.findall("devices/controller[@model='pcie-expander-bus']")]
        assert added and min(added) > 17


RECORDED = Path(__file__).resolve().parent / "fixtures" / "opennebula" / "recorded"


def _pci_tree(domain: Any) -> list[tuple[str | None, str | None, str | None]]:
    """(model, index, parent bus) of each PCI controller and the hostdevs' guest buses, in order."""
    tree: list[tuple[str | None, str | None, str | None]] = [
        (c.get("model"), c.get("index"), c.find("address").get("bus") if c.find("address") is not None else None)
        for c in domain.findall("devices/controller[@type='pci']")
    ]
    tree += [("hostdev", None, h.find("address").get("bus")) for h in domain.findall("devices/hostdev")]
    return tree


def test_a_real_oneds_deployment_files_match_the_shapes_and_rewrite_soundly(tmp_path: Path) -> None:
    recorded = {path.stem.removeprefix("deployment-7.0.2-"): path for path in RECORDED.glob("deployment-7.0.2-*.xml")}
    assert "flat" in recorded
    for kind, path in sorted(recorded.items()):
        real = load_domain(path.read_bytes())
        assert _pci_tree(real) == _pci_tree(load_domain(oned_domain("7.0.2", kind).encode())), kind
        check_rewrite_of_oned_domain(path.read_bytes(), tmp_path)


def test_libvirt_itself_defines_every_rewritten_shape() -> None:
    """Beyond the schema: libvirt's own parser (controller indexes, the expander's NUMA node against
    the guest cells, PCI address assignment) defines each rewritten domain. oned's own 7.4
    ``dedicated`` domain is refused there: its expander names host node 1, which is no guest cell."""
    from libvirt_session import session

    from aifactory_core.domain import load_domain

    with session() as (work, virsh):
        def define(name: str, domain: Any) -> subprocess.CompletedProcess[str]:
            domain.set("type", "qemu")
            domain.find("devices/emulator").text = needs.tool("qemu-system-x86_64")
            for tag in ("os/loader", "os/nvram", "uuid"):
                element = domain.find(tag)
                element.getparent().remove(element)
            domain.find("name").text = name
            path = work / f"{name}.xml"
            path.write_bytes(dump_domain(domain))
            path.chmod(0o644)
            return virsh("define", str(path))

        for version, kind in SHAPES:
            domain, _ = check_rewrite_of_oned_domain(oned_domain(version, kind).encode(), work)
            done = define(f"{kind}-{version.replace('.', '')}", domain)
            assert done.returncode == 0, f"{version} {kind}: {done.stderr}"
        refused = define("oned-dedicated-740", load_domain(oned_domain("7.4.0", "dedicated").encode()))
        assert refused.returncode != 0 and "not present in the domain's <cpu><numa>" in refused.stderr
