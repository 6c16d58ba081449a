"""The VFIO transaction on a real kernel: prepare, release, crash at every journaled step, races,
and a libvirt domain started with the hostdevs the deploy path rewrote to managed='no'."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from testhost.guest import PCI, driver_of, iommu_group, read, wait_for, write

pytestmark = pytest.mark.realkernel

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def nvme_vf(nvme_pf: str) -> Iterator[str]:
    pf = PCI / nvme_pf
    write(pf / "sriov_drivers_autoprobe", "0")
    write(pf / "sriov_numvfs", "2")
    try:
        yield os.path.basename(os.readlink(pf / "virtfn0"))
    finally:
        for index in range(2):
            vf = os.path.basename(os.readlink(pf / f"virtfn{index}"))
            if driver_of(vf) is not None:
                write(PCI / vf / "driver" / "unbind", vf)
            write(PCI / vf / "driver_override", "\n")
        write(pf / "sriov_numvfs", "0")
        write(pf / "sriov_drivers_autoprobe", "1")


def _host(state: Path):  # noqa: ANN202
    from aifactory_core.hostroot import HostRoot

    return HostRoot(Path("/"), state)


def _vfio_actions(state: Path, vm: int, *addresses: str):  # noqa: ANN202
    from aifactory_core.config import Config
    from aifactory_core.host.inventory import HostInventory
    from aifactory_core.model import DeployRequest
    from aifactory_core.plugins import build_manager

    manager, _ = build_manager(Config())
    request = DeployRequest(vm_id=vm, pci_addresses=addresses)
    return [action for result in manager.hook.aifactory_prepare(
        inventory=HostInventory(_host(state)), request=request, config=Config()) for action in (result or ())]


def test_prepare_binds_e1000e_and_nvme_vf_and_release_restores(state_dir: Path, e1000e_bdf: str,
                                                                nvme_vf: str) -> None:
    from aifactory_core.lifecycle import executor, ownership

    host = _host(state_dir)
    before = {e1000e_bdf: driver_of(e1000e_bdf), nvme_vf: driver_of(nvme_vf)}
    assert before == {e1000e_bdf: "e1000e", nvme_vf: None}
    actions = _vfio_actions(state_dir, 42, e1000e_bdf, nvme_vf)
    assert {action.target for action in actions} >= {e1000e_bdf, nvme_vf}
    executor.prepare(host, 42, actions)
    try:
        for address in (e1000e_bdf, nvme_vf):
            assert driver_of(address) == "vfio-pci"
            assert Path(f"/dev/vfio/{iommu_group(address)}").exists()
        assert ownership.held_devices(host)[e1000e_bdf] == 42
    finally:
        executor.release(host, 42)
    from aifactory_core.host.sanitize import quarantined

    assert quarantined(host) == {}
    assert {address: driver_of(address) for address in before} == before
    assert read(PCI / e1000e_bdf / "driver_override") == "(null)"
    assert ownership.held_devices(host) == {}


def test_kill_at_every_journaled_step_then_repair_restores(state_dir: Path, e1000e_bdf: str, nvme_vf: str) -> None:
    """One prepare process per injection point, SIGKILLed right after that journal write, until a
    prepare runs past the last write; after each kill, repair must restore every driver."""
    from aifactory_core.lifecycle.executor import release
    from aifactory_core.lifecycle.repair import repair

    host = _host(state_dir)
    before = {e1000e_bdf: driver_of(e1000e_bdf), nvme_vf: driver_of(nvme_vf)}
    killed = 0
    for point in range(1, 64):
        result = subprocess.run(
            [sys.executable, "-m", "aifactory_core.cli", "device", "bind", e1000e_bdf, nvme_vf, "--vm", "50"],
            env={**os.environ, "AIFACTORY_FAULT_AT": str(point)}, capture_output=True, text=True, timeout=300,
            cwd=REPO)
        if result.returncode == 0:  # past the last journal write: every point has been covered
            release(host, 50)
            break
        assert result.returncode == -9, (point, result.stdout, result.stderr)
        killed += 1
        report = repair(host)
        assert report.problems == [], (point, report)
        if report.kept == [50]:  # killed after the final "prepared" write: the VM owns its devices
            release(host, 50)
        assert {address: driver_of(address) for address in before} == before, f"injection point {point}"
    print(f"fault injection: {killed} journaled steps, each killed and repaired")
    assert killed >= 4
    assert {address: driver_of(address) for address in before} == before


def test_sixteen_concurrent_prepares_one_wins(state_dir: Path, e1000e_bdf: str) -> None:
    from aifactory_core.lifecycle import executor, ownership

    host = _host(state_dir)
    script = ("import sys, os; from pathlib import Path\n"
              "from aifactory_core.hostroot import HostRoot\n"
              "from aifactory_core.lifecycle import executor\n"
              "from aifactory_core.model import Action\n"
              "from aifactory_core.errors import AifactoryError\n"
              "host = HostRoot(Path('/'), Path(os.environ['AIFACTORY_STATE_DIR']))\n"
              "try:\n"
              "    action = Action('pci_driver', sys.argv[1], 'vfio-pci', 'e1000e', 'race')\n"
              "    executor.prepare(host, int(sys.argv[2]), [action])\n"
              "    print('won')\n"
              "except AifactoryError as error:\n    print(error.message)\n")
    processes = [subprocess.Popen([sys.executable, "-c", script, e1000e_bdf, str(vm)], stdout=subprocess.PIPE,
                                  text=True, cwd=REPO) for vm in range(100, 116)]
    outputs = [process.communicate(timeout=300)[0].strip() for process in processes]
    try:
        assert outputs.count("won") == 1, outputs
        winner = 100 + outputs.index("won")
        assert all(output == f"device {e1000e_bdf} held by VM {winner}" for output in outputs if output != "won")
        assert driver_of(e1000e_bdf) == "vfio-pci"
    finally:
        for vm in range(100, 116):
            executor.release(host, vm)
    assert driver_of(e1000e_bdf) == "e1000e" and ownership.held_devices(host) == {}


def test_deploy_path_domain_with_unmanaged_hostdev_starts(state_dir: Path, e1000e_bdf: str, libvirt_conn) -> None:  # noqa: ANN001
    from aifactory_core.config import Config
    from aifactory_core.lifecycle.executor import release
    from aifactory_core.vmm import prepare_deploy

    domain, bus, slot, function = e1000e_bdf.replace(".", ":").split(":")
    xml = f"""<domain type='qemu'><name>aif-hostdev</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
      <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='network'/></os>
      <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
        <hostdev mode='subsystem' type='pci' managed='yes'><driver name='vfio'/>
          <source><address domain='0x{domain}' bus='0x{bus}' slot='0x{slot}' function='0x{function}'/></source>
        </hostdev><memballoon model='none'/></devices></domain>"""
    host = _host(state_dir)
    rewritten, _network_made = prepare_deploy(host, Config(), xml.encode(), 77)
    assert b"managed=\"no\"" in rewritten or b"managed='no'" in rewritten
    path = state_dir / "aif-hostdev.xml"
    path.write_bytes(rewritten)
    try:
        assert driver_of(e1000e_bdf) == "vfio-pci"
        libvirt_conn("create", str(path))
        assert "running" in libvirt_conn("domstate", "aif-hostdev")
    finally:
        subprocess.run(["virsh", "-c", "qemu:///system", "destroy", "aif-hostdev"], capture_output=True)
        wait_for(lambda: "aif-hostdev" not in libvirt_conn("list", "--name"), "the domain to go")
        release(host, 77)
    assert driver_of(e1000e_bdf) == "e1000e"
