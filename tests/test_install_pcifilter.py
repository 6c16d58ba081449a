"""install.sh's ``[frontend] pci_filter`` into both host types' ``pci.conf`` (aifactory_core.install.pcifilter)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from aifactory_core.config import parse_config
from aifactory_core.errors import ConfigError
from aifactory_core.install import layout, pcifilter
from aifactory_core.install.stage import InstallError, Transaction

SHIPPED = """# what the probe lists
:filter: '0:0'

# exact addresses
:short_address: []
:device_name: []
"""


def _target(tmp_path: Path, text: str = SHIPPED) -> layout.Layout:
    target = layout.Layout(tmp_path, "/opt/aifactory", "/one")
    for host_type in pcifilter.HOST_TYPES:
        path = target.path(pcifilter.pci_conf(target, host_type))
        path.parent.mkdir(parents=True)
        path.write_text(text)
    return target


def _filters(target: layout.Layout, host_type: str) -> list[str]:
    return pcifilter.parse(target.path(pcifilter.pci_conf(target, host_type)).read_text())[0]


def test_filters_go_into_both_host_types_and_come_out_again(tmp_path: Path) -> None:
    target = _target(tmp_path)
    tx = Transaction(out=io.StringIO())
    added = pcifilter.apply(tx, target, ("8086:10d3", "10de:*"), {}, [])
    tx.commit()
    assert set(added) == {pcifilter.pci_conf(target, "kvm"), pcifilter.pci_conf(target, "qemu")}
    for host_type in pcifilter.HOST_TYPES:
        text = target.path(pcifilter.pci_conf(target, host_type)).read_text()
        assert ":filter:\n  - '8086:10d3'\n  - '10de:*'\n\n# exact addresses" in text
        assert ":short_address: []" in text
    again = Transaction(out=io.StringIO())
    assert pcifilter.apply(again, target, ("8086:10d3", "10de:*"), added, []) == added
    assert again.changes == 0
    out = Transaction(out=io.StringIO())
    pcifilter.remove(out, target, added, [])
    out.commit()
    assert target.path(pcifilter.pci_conf(target, "qemu")).read_text() == SHIPPED


def test_the_operators_filters_stay_and_a_dropped_filter_of_ours_goes(tmp_path: Path) -> None:
    target = _target(tmp_path, SHIPPED.replace("'0:0'", "'10de:*, 15b3:*'"))
    tx = Transaction(out=io.StringIO())
    added = pcifilter.apply(tx, target, ("10de:*", "8086:10d3"), {}, [])
    assert _filters(target, "kvm") == ["10de:*", "15b3:*", "8086:10d3"]
    assert added[pcifilter.pci_conf(target, "kvm")] == ["8086:10d3"]
    later = pcifilter.apply(Transaction(out=io.StringIO()), target, (), added, [])
    assert later == {}
    assert _filters(target, "qemu") == ["10de:*", "15b3:*"]


def test_a_failed_run_puts_the_file_back(tmp_path: Path) -> None:
    target = _target(tmp_path)
    tx = Transaction(out=io.StringIO())
    pcifilter.apply(tx, target, ("8086:10d3",), {}, [])
    assert tx.rollback() == []
    assert target.path(pcifilter.pci_conf(target, "kvm")).read_text() == SHIPPED


def test_a_link_where_pci_conf_goes_is_refused(tmp_path: Path) -> None:
    target = _target(tmp_path)
    path = target.path(pcifilter.pci_conf(target, "qemu"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text(SHIPPED)
    path.unlink()
    path.symlink_to(elsewhere)
    with pytest.raises(InstallError, match="link"):
        pcifilter.apply(Transaction(out=io.StringIO()), target, ("8086:10d3",), {}, [])
    assert elsewhere.read_text() == SHIPPED
    assert not [name for name in os.listdir(path.parent) if name.startswith(".pci.conf")]


@pytest.mark.parametrize("bad", ["*:*", "8086:10D3", "8086", "../x:1", "8086:10d3:0200:1"])
def test_config_refuses_filters_that_are_not_vendor_device_class(bad: str) -> None:
    with pytest.raises(ConfigError, match="frontend.pci_filter"):
        parse_config({"frontend": {"pci_filter": [bad]}})
