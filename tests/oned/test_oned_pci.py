"""The host's PCI list in a real oned: the GPUs the suite reports, given to VMs by oned's own
scheduler, withheld while a recorded health reading says FAILED, and back once healthy.

The host is this machine as a ``qemu``-type host over SSH (``qemunode``: a private sshd, the bundled
H100 capture as the probes' host root, its NVML recording replayed);
oned runs upstream's real
probes there too — ``pci.rb`` reads this machine's ``lspci`` through the stock ``pci.conf``
(``'0:0'``), so every PCI device oned learns comes from the suite's probe. VMs are deployed by the
dummy VMM (the host's ``VM_MAD``): oned assigns a PCI device when it dispatches the VM to the host,
which is what is under test; a real deploy needs a kernel that binds the device (the end-to-end
tests). The FAILED reading is the real recording with one answer changed in its own format
(``RemappedRows`` reporting a remapping failure).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemunode import host_xml, onehost_show_section, pci_share, qemu_node, remove_host, wait_for
from realone import REPO, SYSTEM_PROBES_PERIOD, Installed, RealOne, in_frontend, note

from aifactory_core.samples import extract_sample

pytestmark = pytest.mark.realone
NODE = "aifactory-pci-node"  # a node of its own (test_oned_probes has aifactory-node)
SAMPLES = REPO / "aifactory_core" / "samples"
GPU = "0000:00:06:0"  # oned's spelling of the capture's H100 at 0000:00:06.0
MONITOR_TIMEOUT = 300 + 3 * SYSTEM_PROBES_PERIOD


def _gpu_health(one: RealOne, host: int) -> str:
    return host_xml(one, host).findtext("TEMPLATE/AIF_GPU/HEALTH") or ""


def _monitored_with_gpu(one: RealOne, host: int) -> bool:
    if host_xml(one, host).findtext("STATE") == "3":
        raise AssertionError(f"{NODE} in ERROR: {host_xml(one, host).findtext('TEMPLATE/ERROR')}\n"
                             + one.log_tail("monitor.log"))
    return GPU in pci_share(one, host)


@pytest.fixture(scope="module")
def node(real_one: RealOne, suite_installed: Installed) -> Iterator[Path]:
    """``aifactory-pci-node`` (:func:`qemunode.qemu_node`), whose SSH sessions read a copy of the
    bundled H100 capture as their host root and replay its NVML recording (``nvml.json`` beside it,
    which the test rewrites)."""
    import shutil
    import subprocess

    top = real_one.top / "pci-node-data"
    top.mkdir()
    host_root = top / "host-root"
    shutil.copytree(extract_sample("h100-sxm5-vm"), host_root, symlinks=True)
    shutil.copy(SAMPLES / "h100-sxm5-vm.nvml.json", top / "nvml.json")
    subprocess.run(["chown", "-R", "oneadmin:oneadmin", str(top)], check=True)
    with qemu_node(real_one, NODE, {"AIFACTORY_HOST_ROOT": str(host_root),
                                    "AIFACTORY_NVML_REPLAY": str(top / "nvml.json")}):
        yield host_root


@pytest.fixture(scope="module")
def gpu_host(real_one: RealOne, suite_installed: Installed, node: Path) -> Iterator[dict[str, Any]]:
    """The node as a qemu host whose VMs the dummy VMM deploys, and a dummy system datastore."""
    synced = suite_installed.install_sh("--sync")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    client = real_one.client()
    datastore = client.datastore.allocate('NAME="pci-system" TYPE="SYSTEM_DS" TM_MAD="dummy"', -1)
    t0 = time.monotonic()
    host = client.host.allocate(NODE, "qemu", "dummy", -1)
    replay = node.parent / "nvml.json"
    healthy = replay.read_text()
    try:
        wait_for(lambda: _monitored_with_gpu(real_one, host), f"{GPU} in {NODE}'s PCI share", MONITOR_TIMEOUT,
                 lambda: real_one.log_tail("monitor.log"))
        note(f"pci: {NODE} created -> the GPU in oned's PCI share after {time.monotonic() - t0:.0f} s")
        yield {"host": host, "datastore": datastore, "replay": replay, "healthy": healthy,
               "installed": suite_installed}
    finally:
        replay.write_text(healthy)
        import pyone

        try:
            for vm in client.vmpool.info(-2, -1, -1, -1).VM:
                if _last_host(vm) not in ("", NODE):
                    continue  # another module's VM
                try:
                    client.vm.action("terminate-hard", vm.ID)
                except pyone.OneException:  # a state terminate refuses (BOOT under load): delete it
                    client.vm.recover(vm.ID, 3)
            wait_for(lambda: not [vm for vm in client.vmpool.info(-2, -1, -1, -1).VM if _last_host(vm) in ("", NODE)],
                     "the VMs to end", 120)
        finally:
            remove_host(real_one, host)  # a host left behind fails later onehost sync runs


def _last_host(vm: Any) -> str:
    """The host of a VM's newest history record ("" for a VM never placed)."""
    records = vm.HISTORY_RECORDS.HISTORY if vm.HISTORY_RECORDS else []
    return str(records[-1].HOSTNAME) if records else ""


def _gpu_vm(one: RealOne, name: str, datastore: int) -> int:
    """A VM asking for the H100 by vendor/device/class, released from the admission hold."""
    import pyone

    client = one.client()
    vm = client.vm.allocate(f'NAME="{name}" CPU="0.1" MEMORY="32" SCHED_DS_REQUIREMENTS="ID={datastore}" '
                            'PCI=[ VENDOR="10de", DEVICE="2330", CLASS="0302" ]', False)
    time.sleep(1)
    if client.vm.info(vm).STATE == 2:  # HOLD (VM_SUBMIT_ON_HOLD): the admission hook may keep it
        try:
            client.vm.action("release", vm)
        except pyone.OneException:
            pass  # the hook released it first
    return int(vm)


def _placed(one: RealOne, vm: int) -> tuple[int, str]:
    """(state, the PCI ADDRESS oned gave the VM, '' when none)."""
    info = one.client().vm.info(vm)
    pci = info.TEMPLATE.get("PCI") or {}
    return int(info.STATE), str(pci.get("ADDRESS", "")) if isinstance(pci, dict) else ""


def _doctor(installed: Installed) -> str:
    """``aifactory doctor --frontend`` as the operator runs it on the frontend (root)."""
    argv = [str(installed.prefix / "venv" / "bin" / "aifactory"), "doctor", "--frontend"]
    done = in_frontend(installed.one, installed.etc_binds, argv)
    return done.stdout + done.stderr


def _onehost_pci(one: RealOne) -> str:
    """``onehost show``'s PCI section, as an operator sees it."""
    shown = one.run("onehost", "show", NODE).stdout
    section = onehost_show_section(shown.splitlines(), "PCI DEVICES")
    return "\n".join(section) if section else "(no PCI DEVICES section: the host's PCI list is empty)"


def test_host_reports_its_gpu_a_vm_gets_it_and_a_failed_gpu_is_not_given_again(
        real_one: RealOne, gpu_host: dict[str, Any]) -> None:
    host, datastore, replay = gpu_host["host"], gpu_host["datastore"], gpu_host["replay"]
    # 1. The host's PCI list is the GPU and nothing else of this machine or the capture.
    assert pci_share(real_one, host) == {GPU: -1}
    template = host_xml(real_one, host)
    assert template.findtext("TEMPLATE/AIF_PCI_OFFERED") == "0000:00:06.0"
    assert template.find("TEMPLATE/PCI") is None  # oned moved the vectors into its share
    shown = _onehost_pci(real_one)
    note("onehost show (healthy):\n" + shown)
    assert "00:06.0" in shown and "10de:2330:0302" in shown
    doctor = _doctor(gpu_host["installed"])
    assert f"PASS  pci-share [{NODE}]: {NODE}: 1 passthrough devices in oned's PCI list" in doctor, doctor
    note("doctor --frontend (healthy): " + " | ".join(line for line in doctor.splitlines() if " pci" in line))
    assert "PASS  pci.conf [" in doctor and "FAIL  pci" not in doctor, doctor

    # 2. A VM asking for a GPU is scheduled and oned gives it the GPU.
    first = _gpu_vm(real_one, "gpu-first", datastore)
    wait_for(lambda: _placed(real_one, first) == (3, GPU), f"VM {first} ACTIVE with {GPU}", 180,
             lambda: str(real_one.client().vm.info(first).USER_TEMPLATE) + real_one.log_tail("sched.log"))
    assert pci_share(real_one, host) == {GPU: first}
    note("onehost show (VM holding the GPU):\n" + _onehost_pci(real_one))

    # 3. A recorded reading says FAILED: the VM holding the GPU keeps it, undisturbed.
    failed = json.loads(gpu_host["healthy"])
    failed["devices"][0]["RemappedRows"]["value"] = ["0", "0", "0", "1"]
    replay.write_text(json.dumps(failed))
    t0 = time.monotonic()
    wait_for(lambda: _gpu_health(real_one, host) == "FAILED", "AIF_GPU/HEALTH FAILED", MONITOR_TIMEOUT)
    note(f"pci: FAILED reading -> HEALTH=FAILED in the host template after {time.monotonic() - t0:.0f} s")
    assert "FAILED: row remapping failed" in (host_xml(real_one, host).findtext("TEMPLATE/AIF_PCI_WITHHELD") or "")
    time.sleep(SYSTEM_PROBES_PERIOD + 2)  # one more report without the GPU
    assert pci_share(real_one, host) == {GPU: first}
    assert _placed(real_one, first)[1] == GPU and _placed(real_one, first)[0] == 3

    # 4. Once the VM gives it back, the failed GPU leaves the share at the next report...
    real_one.client().vm.action("terminate-hard", first)
    t0 = time.monotonic()
    wait_for(lambda: pci_share(real_one, host) == {}, f"{GPU} gone from the share", MONITOR_TIMEOUT)
    note(f"pci: failed GPU released -> gone from oned's PCI share after {time.monotonic() - t0:.0f} s")
    note("onehost show (GPU FAILED):\n" + _onehost_pci(real_one))

    # ...and is not given to the next VM, which waits.
    second = _gpu_vm(real_one, "gpu-second", datastore)
    time.sleep(2 * SYSTEM_PROBES_PERIOD)  # several scheduler windows (1 s) and monitoring cycles
    assert _placed(real_one, second) == (1, ""), real_one.client().vm.info(second).USER_TEMPLATE  # PENDING
    message = str(real_one.client().vm.info(second).USER_TEMPLATE.get("SCHED_MESSAGE", ""))
    note(f"pci: next VM {second} while the GPU is FAILED: PENDING, SCHED_MESSAGE={message!r}")
    doctor = _doctor(gpu_host["installed"])
    assert (f"PASS  pci-share [{NODE}]: {NODE}: 0 passthrough devices in oned's PCI list; withheld: 0000:00:06.0 "
            "FAILED: row remapping failed: replace the GPU") in doctor, doctor
    note("doctor --frontend (GPU FAILED): " + " | ".join(line for line in doctor.splitlines() if "pci-share" in line))
    sched_log = real_one.location / "var" / "sched.log"
    pci_lines = [line for line in sched_log.read_text(errors="replace").splitlines() if "PCI" in line] \
        if sched_log.exists() else []
    note("sched.log: " + (pci_lines[-1] if pci_lines else "(no line naming PCI)"))

    # 5. Healthy again: offered again, and the waiting VM gets it.
    replay.write_text(gpu_host["healthy"])
    t0 = time.monotonic()
    wait_for(lambda: _placed(real_one, second) == (3, GPU), f"VM {second} ACTIVE with {GPU}", MONITOR_TIMEOUT)
    note(f"pci: healthy reading -> waiting VM {second} given {GPU} after {time.monotonic() - t0:.0f} s")
    assert pci_share(real_one, host) == {GPU: second}
