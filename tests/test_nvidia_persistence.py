"""Persistence per GPU on the real H100 capture: a host-pool GPU ([host] host_devices) may persist, a
VM-pool GPU must not; doctor's advice and the deploy refusal name the same per-GPU fix. The process
table holding /dev/nvidia0 is added to the capture (as the kernel shows it: comm cut at 15), the
persistence mode comes from the real NVML recording (which has it on)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from aifactory_plugins import nvidia_gpu
from hostroots import H100_CAPTURE, h100_root  # noqa: F401 - fixture

from aifactory_core.config import parse_config
from aifactory_core.errors import HostError
from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot
from aifactory_core.model import DeployRequest

GPU = "0000:00:06.0"
FIX = f"nvidia-smi -i {GPU} -pm 0 (VM-pool GPUs never persist; host-pool GPUs may)"


def _host(h100_root: Path, tmp_path: Path, daemon: bool) -> HostInventory:  # noqa: F811
    root = tmp_path / "h100"
    shutil.copytree(h100_root, root, symlinks=True)
    info = root / "proc/driver/nvidia/gpus" / GPU
    info.mkdir(parents=True)
    (info / "information").write_text("Model: \t\t NVIDIA H100 80GB HBM3\nDevice Minor: \t 0\n")
    if daemon:
        (root / "proc/4242/fd").mkdir(parents=True)
        (root / "proc/4242/comm").write_text("nvidia-persiste\n")
        os.symlink("/dev/nvidia0", root / "proc/4242/fd/3")
    return HostInventory(HostRoot(root))


def _checks(inventory: HostInventory, config: dict) -> dict[str, tuple[str, str, str | None]]:
    devices = list(nvidia_gpu.aifactory_discover_devices(inventory))
    return {check.name: (check.status, check.message, check.fix) for check in
            nvidia_gpu.aifactory_doctor_checks(inventory, devices, parse_config(config))}


@pytest.fixture(autouse=True)
def _no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIFACTORY_NVML_REPLAY", raising=False)


def test_a_vm_pool_gpu_held_by_the_daemon_doctor_and_deploy_say_the_same_fix(
        h100_root: Path, tmp_path: Path) -> None:  # noqa: F811
    inventory = _host(h100_root, tmp_path, daemon=True)
    assert inventory.pci[GPU].driver == "nvidia"
    checks = _checks(inventory, {})
    assert checks["gpu-persistence"] == ("WARN", "VM-pool GPU held open by nvidia-persiste[4242]: its deploys are "
                                         "refused until it lets go", FIX)
    assert "nvidia-persistence" not in checks  # no host pool: nothing advises persistence for every GPU
    assert "let aifactory stop them" not in str(checks["nvidia-holders"])
    with pytest.raises(HostError) as refused:
        nvidia_gpu.aifactory_prepare(inventory, DeployRequest(1, (GPU,)), parse_config({}))
    assert refused.value.message == f"GPU {GPU} is held open by nvidia-persiste[4242] (persistence): {FIX}"


def test_a_host_pool_gpu_may_persist(h100_root: Path, tmp_path: Path) -> None:  # noqa: F811
    checks = _checks(_host(h100_root, tmp_path, daemon=True), {"host": {"host_devices": [GPU]}})
    assert "gpu-persistence" not in checks
    assert checks["nvidia-persistence"] == ("PASS", f"host-pool GPUs {GPU}: persistence daemon running", None)


def test_a_host_pool_without_the_daemon_is_advised_to_persist_only_there(
        h100_root: Path, tmp_path: Path) -> None:  # noqa: F811
    checks = _checks(_host(h100_root, tmp_path, daemon=False), {"host": {"host_devices": [GPU]}})
    assert checks["nvidia-persistence"] == ("WARN", f"host-pool GPUs {GPU}: persistence daemon not running",
                                            "start nvidia-persistenced")


def test_persistence_mode_from_the_recording_is_flagged_not_refused(
        h100_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("AIFACTORY_NVML_REPLAY", str(H100_CAPTURE / "nvml.json"))  # PersistenceMode 1, recorded
    inventory = _host(h100_root, tmp_path, daemon=False)
    assert _checks(inventory, {})["gpu-persistence"] == ("WARN", "VM-pool GPU in persistence mode", FIX)
    nvidia_gpu.aifactory_prepare(inventory, DeployRequest(1, (GPU,)), parse_config({}))  # unbind not blocked


@pytest.mark.parametrize(("restrict", "granted", "status"), [("0", False, "PASS"), ("1", False, "FAIL"),
                                                             ("1", True, "PASS")])
def test_doctor_says_whether_the_probes_can_read_xids(h100_root: Path, tmp_path: Path, restrict: str,  # noqa: F811
                                                      granted: bool, status: str) -> None:
    inventory = _host(h100_root, tmp_path, daemon=False)
    root = inventory.host.root
    (root / "proc/sys/kernel").mkdir(parents=True, exist_ok=True)
    (root / "proc/sys/kernel/dmesg_restrict").write_text(restrict + "\n")
    if granted:  # what host-setup installs: the shipped snippet and the root helper
        (root / "etc/sudoers.d").mkdir(parents=True)
        shutil.copy(Path(__file__).resolve().parents[1] / "drivers/sudoers/aifactory", root / "etc/sudoers.d")
        helper = root / nvidia_gpu.ROOT_HELPER.lstrip("/")
        helper.parent.mkdir(parents=True)
        helper.write_text("#!/bin/sh\n")
    check = _checks(inventory, {})["xid-source"]
    assert check[0] == status
    if status == "FAIL":
        assert check[2] == "as root: aifactory host-setup (installs the root helper and its sudoers snippet)"
    elif granted:
        assert "through the root helper's xid-log" in check[1]
