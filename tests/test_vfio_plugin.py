"""The vfio and nvidia_gpu plugins' prepare-side decisions on generated and captured hosts."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from aifactory_plugins import nvidia_gpu, vfio

from aifactory_core.config import parse_config
from aifactory_core.domain import dump_domain, load_domain
from aifactory_core.errors import HostError
from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot
from aifactory_core.model import DeployRequest

GPU = "0000:1b:00.0"


@pytest.fixture
def host(tmp_path: Path) -> HostRoot:
    from hostroots import generate_host

    return HostRoot(generate_host("dgx-h100", tmp_path / "root"), tmp_path / "state")


def _prepare(host: HostRoot, *addresses: str, config: dict | None = None) -> list:
    request = DeployRequest(vm_id=3, pci_addresses=addresses)
    return vfio.aifactory_prepare(HostInventory(host), request, parse_config(config or {})) or []


def test_closure_takes_the_whole_group_and_fingerprints(host: HostRoot) -> None:
    actions = _prepare(host, "0000:01:00.0")
    assert [(a.kind, a.target) for a in actions if a.kind == "pci_driver"] == [
        ("pci_driver", "0000:01:00.0"), ("pci_driver", "0000:01:00.1")]
    assert all(a.undo_value == "ixgbe" for a in actions if a.kind == "pci_driver")
    assert {a.target for a in actions if a.kind == "fingerprint"} == {"0000:01:00.0", "0000:01:00.1"}


def test_group_with_a_host_device_is_refused(host: HostRoot) -> None:
    with pytest.raises(HostError, match="0000:01:00.1 .* which the host uses"):
        _prepare(host, "0000:01:00.0", config={"host": {"host_devices": ["0000:01:00.1"]}})


def test_a_requested_device_the_host_uses_is_refused_by_the_root_helpers_rule(host: HostRoot) -> None:
    """The plan refuses what the root helper would refuse (aifactory_core.host.hostuse), the
    requested device itself included, not only its group companions."""
    with pytest.raises(HostError, match=rf"{GPU} is used by the host \(listed in \[host\] host_devices\)"):
        _prepare(host, GPU, config={"host": {"host_devices": [GPU]}})
    uplink = host.root / "proc/net/route"
    uplink.parent.mkdir(parents=True)
    uplink.write_text("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
                      "enp1s0f1\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n")
    with pytest.raises(HostError, match="0000:01:00.1 .* which the host uses .enp1s0f1 carries the default route"):
        _prepare(host, "0000:01:00.0")


def test_fingerprint_drift_is_refused(host: HostRoot) -> None:
    from aifactory_core.host.fingerprint import fingerprint, record

    record(host, GPU, fingerprint(host, GPU))
    assert _prepare(host, GPU)
    (host.pci_devices / GPU / "max_link_width").write_text("8\n")
    with pytest.raises(HostError, match=r"changed since it was last assigned \(max_link_width 16 -> 8\)"):
        _prepare(host, GPU)


def test_large_bar_gets_a_64bit_hole_that_libvirt_accepts(host: HostRoot, tmp_path: Path) -> None:
    domain = load_domain(b"<domain type='kvm'><name>one-3</name><memory unit='KiB'>1048576</memory><vcpu>1</vcpu>"
                         b"<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>"
                         b"<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' "
                         b"bus='0x1b' slot='0x00' function='0x0'/></source></hostdev></devices></domain>")
    request = DeployRequest(vm_id=3, pci_addresses=(GPU,))
    vfio.aifactory_domain_xml(HostInventory(host), request, domain, parse_config({}))
    assert domain.find("devices/hostdev").get("managed") == "no"
    assert int(domain.findtext("devices/controller[@model='pcie-root']/pcihole64")) == 256 * 1024 * 1024
    if shutil.which("virt-xml-validate"):
        path = tmp_path / "domain.xml"
        path.write_bytes(dump_domain(domain))
        result = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_large_bar_on_i440fx_is_refused(host: HostRoot) -> None:
    domain = load_domain(b"<domain type='kvm'><os><type machine='pc-i440fx-7.2'>hvm</type></os><devices/></domain>")
    with pytest.raises(HostError, match="128 GiB 64-bit PCI hole.*q35"):
        vfio.aifactory_domain_xml(HostInventory(host), DeployRequest(3, (GPU,)), domain, parse_config({}))


def test_gpu_held_open_is_refused_with_the_pids(h100_root: Path, tmp_path: Path) -> None:
    """The captured H100 host, with a process table added that holds /dev/nvidia0 open."""
    root = tmp_path / "h100"
    shutil.copytree(h100_root, root, symlinks=True)
    gpu = "0000:00:06.0"
    info = root / "proc/driver/nvidia/gpus" / gpu
    info.mkdir(parents=True)
    (info / "information").write_text("Model: \t\t NVIDIA H100 80GB HBM3\nDevice Minor: \t 0\n")
    for pid, comm, target in (("4242", "nvidia-persiste", "/dev/nvidia0"), ("77", "bash", "/dev/null")):
        (root / "proc" / pid / "fd").mkdir(parents=True)
        (root / "proc" / pid / "comm").write_text(comm + "\n")
        os.symlink(target, root / "proc" / pid / "fd" / "3")
    inventory = HostInventory(HostRoot(root))
    assert nvidia_gpu.device_holders(inventory, gpu) == ["nvidia-persiste[4242]"]
    with pytest.raises(HostError, match=r"GPU 0000:00:06.0 is held open by nvidia-persiste\[4242\]"):
        nvidia_gpu.aifactory_prepare(inventory, DeployRequest(1, (gpu,)), parse_config({}))


def _replay(tmp_path: Path, **changes: object) -> Path:
    """The real H100 NVML recording, with the named fields changed (derived, for refusal cases)."""
    import json

    from hostroots import H100_CAPTURE

    recording = json.loads((H100_CAPTURE / "nvml.json").read_text())
    for name, value in changes.items():
        recording["devices"][0][name] = {"value": value, "us": 1.0}
    path = tmp_path / "nvml.json"
    path.write_text(json.dumps(recording))
    return path


def test_nvml_state_of_the_real_h100_recording(h100_root: Path, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    from aifactory_plugins.nvidia_state import gpu_state

    monkeypatch.setenv("AIFACTORY_NVML_REPLAY", str(_replay(tmp_path)))
    state = gpu_state(HostRoot(h100_root), "0000:00:06.0")
    assert state is not None
    assert (state.mig_enabled, state.persistence, state.process_pids) == (False, True, ())
    nvidia_gpu.aifactory_prepare(HostInventory(HostRoot(h100_root)), DeployRequest(1, ("0000:00:06.0",)),
                                 parse_config({}))  # nothing in the way: no refusal


@pytest.mark.parametrize(("changes", "message"), [
    ({"MigMode": ["1", "1"]}, "has MIG enabled"),
    ({"ComputeRunningProcesses": [{"pid": 4242, "usedGpuMemory": 1024}]}, "runs processes 4242"),
])
def test_nvml_state_refuses_mig_and_running_processes(h100_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path, changes: dict, message: str) -> None:
    monkeypatch.setenv("AIFACTORY_NVML_REPLAY", str(_replay(tmp_path, **changes)))
    with pytest.raises(HostError, match=message):
        nvidia_gpu.aifactory_prepare(HostInventory(HostRoot(h100_root)), DeployRequest(1, ("0000:00:06.0",)),
                                     parse_config({}))


@pytest.mark.parametrize(("content", "reason"), [
    (None, "No such file or directory"),
    ("{not json", "Expecting property name enclosed in double quotes"),
    ("[1, 2]", "not an nvml.json recording"),
    ('{"devices": ["0000:00:06.0"]}', "not an nvml.json recording"),
])
def test_a_broken_nvml_recording_is_one_config_error(h100_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path, content: str | None, reason: str) -> None:
    from aifactory_core.errors import ConfigError

    path = tmp_path / "nvml.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("AIFACTORY_NVML_REPLAY", str(path))
    with pytest.raises(ConfigError) as raised:
        nvidia_gpu.aifactory_prepare(HostInventory(HostRoot(h100_root)), DeployRequest(1, ("0000:00:06.0",)),
                                     parse_config({}))
    message = str(raised.value)
    assert message.startswith(f"AIFACTORY_NVML_REPLAY={path}: ") and reason in message and "\n" not in message


def test_doctor_reports_what_host_setup_installs(host: HostRoot) -> None:
    """Missing pieces are named with the fix; a helper others may write is not trusted; all three
    in place pass (as root, which owns what the test writes)."""
    def check() -> object:
        checks = vfio.aifactory_doctor_checks(HostInventory(host), [], parse_config({}))
        return next(item for item in checks if item.name == "host-setup")

    first = check()
    assert first.status == "WARN" and "no root helper" in first.message and "host-setup" in (first.fix or "")
    assert "no /etc/sudoers.d/aifactory" in first.message and "not enabled" in first.message
    helper = host.path("/usr/local/lib/aifactory/venv/bin/aifactory-root-helper")
    helper.parent.mkdir(parents=True)
    helper.write_text("#!/bin/sh\n")
    helper.chmod(0o775)
    (host.path("/etc/sudoers.d")).mkdir(parents=True)
    host.path("/etc/sudoers.d/aifactory").write_text("# snippet\n")
    wants = host.path("/etc/systemd/system/multi-user.target.wants")
    wants.mkdir(parents=True)
    (wants / "aifactory-repair.service").symlink_to("../aifactory-repair.service")
    host.path("/etc/systemd/system/aifactory-repair.service").write_text("[Unit]\n")
    assert check().status == "WARN" and "not root-owned and closed to others" in check().message
    helper.chmod(0o755)
    if os.geteuid() == 0:
        assert check().status == "PASS"
    else:
        assert "not root-owned" in check().message
