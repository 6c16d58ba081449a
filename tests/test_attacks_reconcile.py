"""Attacks on what root does when devices are given back after their VM left (reconciliation,
release), in the style of ``tests/test_attacks_root.py``: each is one attack, each must fail.

Reconciliation runs as ``oneadmin`` and decides from ``oneadmin``'s records (journals, owner files)
and libvirt's state; every device move or reset it makes goes through the root helper. So the
attacks are ``oneadmin``'s: forged records saying a VM is gone whose device a running guest still
uses, forged records naming the host's own devices, and links planted where root opens a lock or a
journal. 11 distinct attacks, each marked ``root_attack`` (counted in the run's summary line,
:mod:`rootattacks`; the control is not):

* the root helper asked to take from a running guest a function it uses through VFIO (5): ``reset``,
  ``set-driver`` to the host driver, ``set-driver none``, the same through the iommufd node, and a
  function of the guest's IOMMU group that the guest holds through the group;
* forged records for a VM without a domain (3): naming a function a running guest (of another VM)
  uses, a function in ``[host] host_devices``, and the host's NIC with the default route;
* links planted in the state directory (3): as the VM's lock file, as the reconciliation's run lock,
  and as the VM's journal (pointing at a journal that names the host NIC).

The host is the generated DGX tree; a running guest is a process entry under the host root's
``/proc`` whose descriptor links to the function's ``/dev/vfio`` node, as the kernel shows it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import needs
import pytest
from simkernel import KernelWriter

from aifactory_core import roothelper
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import executor, ownership
from aifactory_core.lifecycle.reconcile import reconcile

ATTACKER = 65534
GPU = "0000:1b:00.0"
GPU_GROUP = "24"
NIC = "0000:01:00.0"
NIC_NAME = "enp1s0f0"
NIC_SIBLING = "0000:01:00.1"
NIC_GROUP = "1"


@pytest.fixture
def host(dgx_root: Path, tmp_path: Path) -> HostRoot:
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", str(dgx_root), str(root)], check=True)
    (root / "run/libvirt/qemu").mkdir(parents=True)  # this host's libvirt, running no domain yet
    return HostRoot(root, tmp_path / "state")


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="aifactory-attack-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def helper(host: HostRoot, open_tmp: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    from aifactory_core import rootconfig

    monkeypatch.setattr(roothelper, "HOST_ROOT", str(host.root))
    monkeypatch.setattr(rootconfig, "ROOT_CONFIG_PATH", str(open_tmp / "etc" / "aifactory.conf"))
    return lambda *argv: roothelper.main(list(argv))


def snapshot(root: Path) -> dict[str, str]:
    """Every file under the PCI tree, by content hash, and where each driver link points."""
    pci = root / "sys/bus/pci"
    found = {}
    for path in sorted(pci.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(root))] = os.readlink(path)
        elif path.is_file():
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def on_vfio(host: HostRoot, address: str) -> None:
    """``address`` on vfio-pci, as a deploy leaves it."""
    device = host.pci_devices / address
    link = device / "driver"
    link.unlink()
    (host.pci_drivers / "vfio-pci").mkdir(exist_ok=True)
    link.symlink_to(os.path.relpath(host.pci_drivers / "vfio-pci", os.path.realpath(device)))
    (device / "driver_override").write_text("vfio-pci\n")


def guest_uses(host: HostRoot, node: str, pid: int = 4242, name: str = "one-42") -> None:
    """A running QEMU holding ``node`` open (its descriptor 23), as ``/proc/<pid>/fd`` shows it."""
    process = host.path(f"/proc/{pid}")
    (process / "fd").mkdir(parents=True)
    (process / "fd" / "23").symlink_to(node)
    (process / "comm").write_text("qemu-system-x86\n")
    (process / "cmdline").write_bytes(b"\0".join([b"qemu-system-x86_64", b"-name", f"guest={name}".encode(), b""]))


def iommufd_node(host: HostRoot, address: str) -> str:
    (host.pci_devices / address / "vfio-dev" / "vfio3").mkdir(parents=True)
    return "/dev/vfio/devices/vfio3"


HELPER_ATTACKS = [
    pytest.param(["reset", GPU], GPU, f"/dev/vfio/{GPU_GROUP}", "reset it", id="reset-under-a-guest"),
    pytest.param(["set-driver", GPU, "nvidia"], GPU, f"/dev/vfio/{GPU_GROUP}", "move it to nvidia",
                 id="back-to-the-host-driver-under-a-guest"),
    pytest.param(["set-driver", GPU, "none"], GPU, f"/dev/vfio/{GPU_GROUP}", "move it to no driver",
                 id="unbind-under-a-guest"),
    pytest.param(["set-driver", GPU, "nvidia"], GPU, "iommufd", "move it to nvidia",
                 id="iommufd-node-under-a-guest"),
    pytest.param(["set-driver", NIC_SIBLING, "ixgbe"], NIC_SIBLING, f"/dev/vfio/{NIC_GROUP}", "move it to ixgbe",
                 id="group-sibling-under-a-guest"),
]


@pytest.mark.root_attack
@pytest.mark.parametrize(("argv", "address", "node", "refused"), HELPER_ATTACKS)
def test_helper_takes_no_function_from_a_running_guest(host: HostRoot, helper, capsys: pytest.CaptureFixture[str],  # noqa: ANN001
                                                       argv: list[str], address: str, node: str, refused: str) -> None:
    on_vfio(host, address)
    guest_uses(host, iommufd_node(host, address) if node == "iommufd" else node)
    before = snapshot(host.root)
    status = helper(*argv)
    error = capsys.readouterr().err
    assert status != 0 and len(error.splitlines()) == 1, error
    assert error == (f"aifactory-root-helper: {address} is in use through VFIO by process 4242 "
                     f"(qemu-system-x86): refusing to {refused}\n")
    assert snapshot(host.root) == before


def test_the_same_helper_resets_it_once_the_guest_is_gone(host: HostRoot, helper,  # noqa: ANN001
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The control: the refusals above are the judgement, not a helper that cannot act here."""
    on_vfio(host, GPU)
    guest_uses(host, "/dev/vfio/99")  # another group: not this function's
    assert helper("reset", GPU) == 0, capsys.readouterr().err
    assert (host.pci_devices / GPU / "reset").read_text() == "1"


@pytest.fixture
def kernel(host: HostRoot, monkeypatch: pytest.MonkeyPatch) -> KernelWriter:
    writer = KernelWriter(host)
    monkeypatch.setattr(executor, "SysfsWriter", lambda: writer)
    return writer


def forge_journal(host: HostRoot, vm: int, address: str, original: str) -> None:
    """``oneadmin``'s forgery: a prepared journal and owner record of VM ``vm`` naming ``address``."""
    ownership.claim(host, address, vm)
    step = {"kind": "pci_driver", "target": address, "value": "vfio-pci", "undo_value": original,
            "reason": "forged", "status": "done"}
    (host.state_dir / "vms").mkdir(parents=True, exist_ok=True)
    (host.state_dir / "vms" / f"{vm}.json").write_text(
        f'{{"vm_id": {vm}, "phase": "prepared", "steps": [{str(step).replace(chr(39), chr(34))}]}}\n')


@pytest.mark.root_attack
def test_records_saying_a_vm_is_gone_take_no_device_from_a_running_guest(host: HostRoot,
                                                                         kernel: KernelWriter) -> None:
    """VM 42 runs with the GPU; records forged for VM 99 (no domain) claim the same GPU."""
    on_vfio(host, GPU)
    guest_uses(host, f"/dev/vfio/{GPU_GROUP}", name="one-42")
    forge_journal(host, 99, GPU, "nvidia")
    before = snapshot(host.root)
    report = reconcile(host)
    assert report.released == [] and len(report.problems) == 1, report
    assert "in use through VFIO by process 4242 (qemu-system-x86): refusing to give it back" in report.problems[0]
    assert snapshot(host.root) == before and kernel.resets == []


@pytest.mark.root_attack
def test_records_naming_a_host_device_move_nothing(host: HostRoot, kernel: KernelWriter, open_tmp: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A forged journal of a gone VM naming a function in [host] host_devices, left on vfio-pci by it."""
    from aifactory_core import rootconfig

    needs.root("the release trusts only a config root owns")
    (open_tmp / "etc").mkdir()
    config = open_tmp / "etc" / "aifactory.conf"
    config.write_text(f'[host]\nhost_devices = ["{GPU}"]\n')
    config.chmod(0o644)
    monkeypatch.setattr(rootconfig, "ROOT_CONFIG_PATH", str(config))
    on_vfio(host, GPU)
    forge_journal(host, 99, GPU, "nvidia")
    before = snapshot(host.root)
    report = reconcile(host)
    assert report.released == [] and any("listed in [host] host_devices" in problem for problem in report.problems)
    assert snapshot(host.root) == before and kernel.resets == []


@pytest.mark.root_attack
def test_records_naming_the_host_uplink_move_nothing(host: HostRoot, kernel: KernelWriter) -> None:
    """A forged journal of a gone VM says the NIC carrying the default route was taken for it."""
    route = host.path("/proc/net/route")
    route.parent.mkdir(parents=True, exist_ok=True)
    route.write_text("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
                     f"{NIC_NAME}\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n")
    forge_journal(host, 99, NIC, "")
    (host.pci_devices / NIC / "driver_override").write_text("vfio-pci\n")  # a pin, as a cut-short move leaves
    before = snapshot(host.root)
    report = reconcile(host)
    assert report.released == [] and any(f"{NIC_NAME} carries the default route" in problem
                                         for problem in report.problems), report
    assert snapshot(host.root) == before and kernel.resets == []


def as_attacker(*argv: str) -> None:
    needs.root("switches to an unprivileged user")
    setpriv = needs.tool("setpriv", hint="util-linux")
    subprocess.run([setpriv, f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups", *argv],
                   check=True, capture_output=True, timeout=60)


@pytest.fixture
def state(host: HostRoot, open_tmp: Path) -> HostRoot:
    directory = open_tmp / "state"
    directory.mkdir()
    os.chown(directory, ATTACKER, ATTACKER)
    return HostRoot(host.root, directory)


@pytest.mark.root_attack
@pytest.mark.parametrize("planted", ["locks/vm-42.lock", "locks/reconcile.lock"])
def test_root_follows_no_link_planted_as_a_lock(state: HostRoot, open_tmp: Path, kernel: KernelWriter,
                                                planted: str) -> None:
    """Root's reconciliation (an administrator's 'aifactory repair --reconcile' in process) opens
    the VM's lock and its own run lock in oneadmin's directory: a link there creates nothing."""
    from aifactory_core.errors import AifactoryError
    from aifactory_core.lifecycle.reconcile import run_exclusive

    ownership.claim(state, GPU, 42)
    outside = open_tmp / "outside"
    outside.mkdir()
    as_attacker("mkdir", "-p", str(state.state_dir / "locks"))
    as_attacker("ln", "-s", str(outside / "target"), str(state.state_dir / planted))
    try:
        report = run_exclusive(state, lambda: reconcile(state))
    except AifactoryError as error:
        assert "not following it" in error.message and planted.endswith("reconcile.lock")
    else:
        assert report is not None and report.released == []
        assert any("not following it" in problem for problem in report.problems), report
    assert list(outside.iterdir()) == []
    assert ownership.held_devices(state) == {GPU: 42}


@pytest.mark.root_attack
def test_root_reads_no_journal_through_a_planted_link(state: HostRoot, open_tmp: Path, kernel: KernelWriter) -> None:
    """The VM's journal is a link to a journal elsewhere that names the host's uplink."""
    outside = open_tmp / "outside"
    outside.mkdir()
    elsewhere = HostRoot(state.root, outside)
    forge_journal(elsewhere, 42, NIC, "")
    as_attacker("mkdir", "-p", str(state.state_dir / "vms"))
    as_attacker("ln", "-s", str(outside / "vms" / "42.json"), str(state.state_dir / "vms" / "42.json"))
    before = snapshot(state.root)
    report = reconcile(state)
    assert report.released == [] and len(report.problems) == 1 and "42.json" in report.problems[0], report
    assert snapshot(state.root) == before and kernel.resets == []
