"""``doctor --frontend``'s PCI checks: pci.conf must not report the GPUs the suite gates on health,
and every device a host's probe offered must be in oned's PCI share (PCI_FILTER named when it drops
one). The oned documents are shaped as oned 7.0.2 writes them (HOST_SHARE/PCI_DEVICES/PCI, the
host's TEMPLATE, CLUSTER/TEMPLATE); the live comparison runs in tests/oned/test_oned_pci.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostroots import dgx_root  # noqa: F401 - fixture
from lxml import etree

from aifactory_core.install import layout, pci_doctor

STOCK_PCI_CONF = """# upstream's comments
:filter: '0:0'

:short_address: []

:device_name: []

:nvidia_vendors:
  - '10de'
"""


def _target(tmp_path: Path, filters: dict[str, str]) -> layout.Layout:
    for host_type, value in filters.items():
        directory = tmp_path / "var/lib/one/remotes/etc/im" / f"{host_type}-probes.d"
        directory.mkdir(parents=True)
        (directory / "pci.conf").write_text(STOCK_PCI_CONF.replace("'0:0'", value))
    return layout.Layout(tmp_path)


def test_stock_and_other_devices_pass(tmp_path: Path) -> None:
    checks = pci_doctor.pci_conf_checks(_target(tmp_path, {"kvm": "'0:0'", "qemu": "\n  - '8086:10d3'"}))
    assert [(check.status, check.message) for check in checks] == [
        ("PASS", "kvm hosts: pci.rb reports no device; the GPUs come from the suite's probe"),
        ("PASS", "qemu hosts: pci.rb reports 8086:10d3; the GPUs come from the suite's probe")]


@pytest.mark.parametrize("value", ["'10de:*'", "'*:*'", "'10de::0302'", "\n  - '15b3:101e'\n  - '10de:2330:0302'",
                                   "'::0300'"])
def test_a_filter_covering_nvidia_gpus_fails(tmp_path: Path, value: str) -> None:
    [kvm, qemu] = pci_doctor.pci_conf_checks(_target(tmp_path, {"kvm": "'0:0'", "qemu": value}))
    assert kvm.status == "PASS"
    assert qemu.status == "FAIL" and "withholds as FAILED" in qemu.message
    assert qemu.fix is not None and "onehost sync --force" in qemu.fix


@pytest.mark.parametrize("value", ["'10de:*:0403'", "'15b3:*'", "'8086::0200'"])
def test_nvidia_audio_or_other_vendors_are_not_gpus(tmp_path: Path, value: str) -> None:
    checks = pci_doctor.pci_conf_checks(_target(tmp_path, {"kvm": value}))
    assert [check.status for check in checks] == ["PASS", "WARN"]  # qemu-probes.d/pci.conf missing here
    assert "is missing" in checks[1].message


def _pool(hosts: str) -> etree._Element:
    return etree.fromstring(f"<HOST_POOL>{hosts}</HOST_POOL>")


def _host(name: str, offered: str | None, share: list[str], template: str = "", cluster: int = 0,
          im: str = "qemu") -> str:
    pcis = "".join(f"<PCI><ADDRESS>{address}</ADDRESS><VMID>-1</VMID></PCI>" for address in share)
    offer = f"<AIF_PCI_OFFERED><![CDATA[{offered}]]></AIF_PCI_OFFERED>" if offered is not None else ""
    return (f"<HOST><ID>0</ID><NAME>{name}</NAME><STATE>2</STATE><IM_MAD>{im}</IM_MAD>"
            f"<CLUSTER_ID>{cluster}</CLUSTER_ID>"
            f"<HOST_SHARE><PCI_DEVICES>{pcis}</PCI_DEVICES></HOST_SHARE><TEMPLATE>{offer}{template}</TEMPLATE></HOST>")


CLUSTERS = etree.fromstring("<CLUSTER_POOL><CLUSTER><ID>0</ID><NAME>default</NAME><TEMPLATE/></CLUSTER>"
                            "<CLUSTER><ID>100</ID><NAME>gpus</NAME><TEMPLATE><PCI_FILTER>15b3:*</PCI_FILTER>"
                            "</TEMPLATE></CLUSTER></CLUSTER_POOL>")


def test_every_offered_device_in_the_share_passes() -> None:
    [check] = pci_doctor.share_checks(_pool(_host("gpu1", "0000:1b:00.0,0000:43:00.0",
                                                  ["0000:1b:00:0", "0000:43:00:0"])), CLUSTERS)
    assert (check.status, check.message) == ("PASS", "gpu1: 2 passthrough devices in oned's PCI list")


def test_a_cluster_pci_filter_dropping_a_gpu_fails_and_is_named() -> None:
    [check] = pci_doctor.share_checks(_pool(_host("gpu1", "0000:1b:00.0", [], cluster=100)), CLUSTERS)
    assert check.status == "FAIL"
    assert check.message == ("gpu1: 0000:1b:00.0 offered by the suite's probe but not in oned's PCI list: dropped by "
                             "PCI_FILTER '15b3:*' on cluster gpus")


def test_the_host_filter_wins_over_the_cluster() -> None:
    host = _host("gpu1", "0000:1b:00.0", [], "<PCI_SHORT_ADDRESS>07:00.0</PCI_SHORT_ADDRESS>", cluster=100)
    [check] = pci_doctor.share_checks(_pool(host), CLUSTERS)
    assert "PCI_FILTER '15b3:*' on cluster gpus and PCI_SHORT_ADDRESS '07:00.0' on host gpu1" in check.message


def test_a_host_whose_probe_has_not_reported_warns_and_other_drivers_are_skipped() -> None:
    checks = pci_doctor.share_checks(_pool(_host("old", None, []) + _host("dummy", "", [], im="dummy")), CLUSTERS)
    assert [(check.status, check.subject) for check in checks] == [("WARN", "old")]


def test_a_suite_filter_lost_from_pci_conf_fails(tmp_path: Path) -> None:
    """What install.sh recorded adding ([frontend] pci_filter) must still be there."""
    target = _target(tmp_path, {"kvm": "\n  - '8086:10d3'", "qemu": "'0:0'"})
    record = {"pci_filter": {f"{target.remotes}/etc/im/kvm-probes.d/pci.conf": ["8086:10d3"],
                             f"{target.remotes}/etc/im/qemu-probes.d/pci.conf": ["8086:10d3"]}}
    kvm, qemu_lost, qemu = pci_doctor.pci_conf_checks(target, record)
    assert (kvm.status, qemu.status) == ("PASS", "PASS")
    assert qemu_lost.status == "FAIL" and "8086:10d3 is no longer in pci.conf" in qemu_lost.message
    assert qemu_lost.fix == "run install.sh --upgrade --sync"


def test_host_doctor_says_what_oned_is_offered_and_leaves_the_probe_state_alone(dgx_root: Path,  # noqa: F811
                                                                                 tmp_path: Path) -> None:
    from hostroots import run_cli

    state = tmp_path / "state"
    (state / "quarantine").mkdir(parents=True)
    (state / "quarantine" / "0000:43:00.0").write_text("config space reads all-ones after reset\n")
    (state / "probes").mkdir()
    (state / "probes" / "xid-seq").write_text("41 boot\n")
    done = run_cli("--host-root", str(dgx_root), "doctor", env={"AIFACTORY_STATE_DIR": str(state)})
    assert ("PASS  pci-offer: oned is offered 7 passthrough devices: 0000:1b:00.0, 0000:52:00.0, 0000:61:00.0, "
            "0000:9d:00.0, 0000:c3:00.0, 0000:d1:00.0, 0000:df:00.0") in done.stdout, done.stdout
    assert ("WARN  pci-offer [0000:43:00.0]: withheld from oned: FAILED: quarantined: config space reads all-ones "
            "after reset") in done.stdout
    assert sorted(path.name for path in (state / "probes").iterdir()) == ["xid-seq"]  # nothing written
    assert (state / "probes" / "xid-seq").read_text() == "41 boot\n"
