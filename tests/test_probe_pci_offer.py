"""The host's PCI list the host/system probe gives oned: the suite's passthrough devices, healthy
ones only, nothing else of the host — on the real H100 capture and the DGX-shaped host, with NVML
answers from the real recording (a fault written into one GPU's copy in the recording's format)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hostroots import dgx_root, h100_root  # noqa: F401 - fixtures
from probe_replays import DGX_GPUS, H100_NVML, multi_gpu, write

from aifactory_core.one.template import parse_template, template_to_dict
from aifactory_core.probes import host_system
from aifactory_core.probes.sysfs import Root, pci_functions

# The keys (and their order) of upstream's im/kvm-probes.d/host/system/pci.rb for a non-vGPU device:
# 7.0.2's, then the two 7.4.0 adds (IFNAME, SRIOV; SRIOV_NUM is for a PF, never offered).
PCI_RB_KEYS = ["TYPE", "VENDOR", "VENDOR_NAME", "DEVICE", "CLASS", "CLASS_NAME", "ADDRESS", "SHORT_ADDRESS",
               "DOMAIN", "BUS", "SLOT", "FUNCTION", "NUMA_NODE", "DEVICE_NAME", "IFNAME", "SRIOV"]


def _probe(root: Path, state: Path, replay: Path | None, config: Path | None,
           monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    monkeypatch.setenv("AIFACTORY_CONFIG", str(config) if config else "/nonexistent/aifactory.conf")
    text = host_system.probe(Root(str(root), str(state)), str(replay) if replay else None)
    return template_to_dict(parse_template(text, "probe output"))


def _offered(parsed: dict[str, list[Any]]) -> list[str]:
    return [f"{vector['DOMAIN']}:{vector['SHORT_ADDRESS']}" for vector in parsed.get("PCI", [])]


def test_h100_host_offers_its_gpu_and_nothing_else(h100_root: Path, tmp_path: Path,  # noqa: F811
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = _probe(h100_root, tmp_path, H100_NVML, None, monkeypatch)
    assert len(pci_functions(Root(str(h100_root)))) > 1  # the capture has the VM's own devices too
    [vector] = parsed["PCI"]
    assert list(vector) == PCI_RB_KEYS
    assert vector == {"TYPE": "10de:2330:0302", "VENDOR": "10de", "VENDOR_NAME": "NVIDIA Corporation",
                      "DEVICE": "2330", "CLASS": "0302", "CLASS_NAME": "3D controller", "ADDRESS": "0000:00:06:0",
                      "SHORT_ADDRESS": "00:06.0", "DOMAIN": "0000", "BUS": "00", "SLOT": "06", "FUNCTION": "0",
                      "NUMA_NODE": "-", "DEVICE_NAME": "NVIDIA H100 80GB HBM3", "IFNAME": "", "SRIOV": "no"}
    assert parsed["AIF_PCI_OFFERED"] == ["0000:00:06.0"] and parsed["AIF_PCI_WITHHELD"] == [""]
    assert parsed["AIF_PROBE"][0]["STATUS"] == "OK"


def _failed_recording(tmp_path: Path, address: str) -> Path:
    data = multi_gpu(DGX_GPUS)
    index = DGX_GPUS.index(address)
    data["devices"][index]["RemappedRows"]["value"] = [0, 0, 0, 1]  # row remapping failure
    return write(data, tmp_path / "failed.json")


def test_a_failed_gpu_is_withheld_and_offered_again_once_healthy(dgx_root: Path, tmp_path: Path,  # noqa: F811
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    healthy = write(multi_gpu(DGX_GPUS), tmp_path / "healthy.json")
    assert _offered(_probe(dgx_root, tmp_path / "s", healthy, None, monkeypatch)) == DGX_GPUS
    failing = DGX_GPUS[2]
    parsed = _probe(dgx_root, tmp_path / "s", _failed_recording(tmp_path, failing), None, monkeypatch)
    assert _offered(parsed) == [gpu for gpu in DGX_GPUS if gpu != failing]
    assert parsed["AIF_PCI_WITHHELD"] == [f"{failing} FAILED: row remapping failed: replace the GPU"]
    assert [gpu["HEALTH"] for gpu in parsed["AIF_GPU"] if gpu["BUS_ID"] == failing] == ["FAILED"]
    assert _offered(_probe(dgx_root, tmp_path / "s", healthy, None, monkeypatch)) == DGX_GPUS


def test_quarantined_and_held_failed_gpus_are_withheld(dgx_root: Path, tmp_path: Path,  # noqa: F811
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU on vfio-pci (NVML cannot see it) judged from the host side: the quarantine marker a
    failed reset leaves withholds it; one a VM holds is withheld too (oned keeps it with the VM)."""
    state = tmp_path / "state"
    (state / "quarantine").mkdir(parents=True)
    (state / "quarantine" / DGX_GPUS[0]).write_text("config space reads all-ones after reset\n")
    (state / "owners").mkdir()
    (state / "owners" / DGX_GPUS[1]).write_text("42\n")
    parsed = _probe(dgx_root, state, None, None, monkeypatch)
    assert DGX_GPUS[0] not in _offered(parsed)
    assert parsed["AIF_PCI_WITHHELD"] == [f"{DGX_GPUS[0]} FAILED: quarantined: config space reads all-ones after reset"]
    assert DGX_GPUS[1] in _offered(parsed)  # held but healthy: still reported, oned knows its VM
    (state / "quarantine" / DGX_GPUS[0]).unlink()
    assert _offered(_probe(dgx_root, state, None, None, monkeypatch)) == DGX_GPUS


def test_host_devices_and_vf_pools_from_the_config(dgx_root: Path, tmp_path: Path,  # noqa: F811
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "aifactory.conf"
    config.write_text(f'[host]\nhost_devices = ["{DGX_GPUS[7]}"]\nvf_pools = ["0000:aa:00.0"]\n')
    state = tmp_path / "state"
    root = Root(str(dgx_root))
    vfs = sorted(root.link_name(f"/sys/bus/pci/devices/0000:aa:00.0/{name}") or ""
                 for name in root.listdir("/sys/bus/pci/devices/0000:aa:00.0") if name.startswith("virtfn"))
    assert len(vfs) == 4
    parsed = _probe(dgx_root, state, None, config, monkeypatch)
    assert _offered(parsed) == DGX_GPUS[:7] + vfs
    assert parsed["AIF_PCI_WITHHELD"] == [f"{DGX_GPUS[7]} listed in [host] host_devices"]
    [vf] = [vector for vector in parsed["PCI"] if vector["SHORT_ADDRESS"] == vfs[0][5:]]
    assert (vf["VENDOR"], vf["CLASS"], vf["SRIOV"]) == ("15b3", "0200", "vf") and list(vf) == PCI_RB_KEYS
    (state / "quarantine").mkdir()
    (state / "quarantine" / vfs[1]).write_text("reset failed\n")
    parsed = _probe(dgx_root, state, None, config, monkeypatch)  # settings from the cache this time
    assert vfs[1] not in _offered(parsed) and f"{vfs[1]} quarantined: reset failed" in parsed["AIF_PCI_WITHHELD"][0]
    assert (state / "probes" / "host-config.tsv").read_text().splitlines()[1:] == [
        f"host_devices\t{DGX_GPUS[7]}", "vf_pools\t0000:aa:00.0"]
    config.write_text("[host]\nhost_devices = []\n")  # a changed config is read again
    assert _offered(_probe(dgx_root, state, None, config, monkeypatch)) == DGX_GPUS


def test_a_bad_config_is_a_problem_and_the_gpus_are_still_offered(dgx_root: Path, tmp_path: Path,  # noqa: F811
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "aifactory.conf"
    config.write_text('[host]\nhost_devices = ["../../etc"]\n')
    parsed = _probe(dgx_root, tmp_path / "state", None, config, monkeypatch)
    assert _offered(parsed) == DGX_GPUS
    assert parsed["AIF_PROBE"][0]["STATUS"] == "PARTIAL"
    assert "[host] host_devices must be a list of PCI addresses" in parsed["AIF_PROBE"][0]["PROBLEMS"]


def test_a_host_without_passthrough_devices_reports_no_pci(tmp_path: Path, h100_root: Path,  # noqa: F811
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    shutil.copytree(h100_root, root, symlinks=True)
    (root / "sys/bus/pci/devices/0000:00:06.0").unlink()  # the link to the GPU's directory
    parsed = _probe(root, tmp_path / "state", None, None, monkeypatch)
    assert "PCI" not in parsed  # no vector at all: oned drops every free device of the host
    assert parsed["AIF_PCI_OFFERED"] == [""]


def test_a_vf_the_host_uses_is_withheld_by_the_root_helpers_rule(dgx_root: Path, tmp_path: Path,  # noqa: F811
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With VF pools offered, the probe judges as the root helper does (hostuse): a VF whose netdev
    carries an IPv6 address is the host's. The address is written where the kernel shows it."""
    from aifactory_core.host import hostuse
    from aifactory_core.probes import pci_offer

    assert pci_offer.LISTED == hostuse.LISTED
    root = tmp_path / "root"
    shutil.copytree(dgx_root, root, symlinks=True)
    host = Root(str(root))
    vf = host.link_name("/sys/bus/pci/devices/0000:aa:00.0/virtfn0") or ""
    ifname = "enp170s0f0v0"  # the VF's netdev, as mlx5 names it, laid out as the kernel does
    netdev = (root / "sys/bus/pci/devices" / vf).resolve() / "net" / ifname
    netdev.mkdir(parents=True)
    (netdev / "device").symlink_to("../..")
    (netdev / "ifindex").write_text("99\n")
    (root / "sys/class/net" / ifname).symlink_to(os.path.relpath(netdev, root / "sys/class/net"))
    (root / "proc/net").mkdir(parents=True, exist_ok=True)
    (root / "proc/net/if_inet6").write_text(f"20010db8000000000000000000000001 05 40 00 80 {ifname}\n")
    config = tmp_path / "aifactory.conf"
    config.write_text('[host]\nvf_pools = ["0000:aa:00.0"]\n')
    parsed = _probe(root, tmp_path / "state", None, config, monkeypatch)
    assert vf not in _offered(parsed)
    assert parsed["AIF_PCI_WITHHELD"][0].startswith(f"{vf} ") and ifname in parsed["AIF_PCI_WITHHELD"][0]


def test_a_vendor_plugins_accelerator_is_offered_while_not_failed(h100_root: Path, tmp_path: Path) -> None:  # noqa: F811
    """Rows of probe plugins' devices (``snapshot["devices"]``, the AIF_DEVICE rows) are judged as
    the GPUs: an accelerator is offered, a FAILED one withheld, other kinds never offered."""
    from aifactory_core.probes import pci_offer

    root = tmp_path / "root"
    shutil.copytree(h100_root, root, symlinks=True)
    accel = root / "sys/bus/pci/devices/0000:00:07.0"  # a Habana-style accelerator, as sysfs shows one
    accel.mkdir()
    (accel / "uevent").write_text("PCI_CLASS=120000\nPCI_ID=1DA3:1020\nPCI_SLOT_NAME=0000:00:07.0\n")
    (accel / "numa_node").write_text("-1\n")
    host = Root(str(root), str(tmp_path / "state"))
    row = {"PLUGIN": "example_accel", "KIND": "accelerator", "BUS_ID": "0000:00:07.0", "MODEL": "Gaudi2",
           "HEALTH": "OK", "HEALTH_REASON": ""}
    switch = {**row, "KIND": "nvswitch", "BUS_ID": "0000:00:06.0"}
    snapshot: dict[str, Any] = {"gpus": [], "devices": [row, switch]}
    offered, withheld = pci_offer.offer(host, snapshot, {"host_devices": (), "vf_pools": ()}, {})
    assert [(v["SHORT_ADDRESS"], v["TYPE"], v["DEVICE_NAME"]) for v in offered] == [("00:07.0", "1da3:1020:1200",
                                                                                    "Gaudi2")]
    assert withheld == []
    row.update(HEALTH="FAILED", HEALTH_REASON="quarantined: reset failed")
    assert pci_offer.offer(host, snapshot, {"host_devices": (), "vf_pools": ()}, {}) == (
        [], [("0000:00:07.0", "FAILED: quarantined: reset failed")])
