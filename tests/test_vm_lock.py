"""The per-VM lock between a deploy and ``aifactory repair``, and a redeploy over a stale journal.

Generated DGX tree; :class:`simkernel.KernelWriter` answers for the kernel's driver core, so the real
``pci_driver`` executor runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from simkernel import KernelWriter

from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import executor, ownership
from aifactory_core.lifecycle.journal import Journal, Step
from aifactory_core.lifecycle.repair import repair
from aifactory_core.lifecycle.vmlock import vm_lock
from aifactory_core.model import Action

GPU = "0000:1b:00.0"
GPU2 = "0000:43:00.0"
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def host(dgx_root: Path, tmp_path: Path) -> HostRoot:
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", str(dgx_root), str(root)], check=True)
    return HostRoot(root, tmp_path / "state")


@pytest.fixture
def kernel(host: HostRoot, monkeypatch: pytest.MonkeyPatch) -> KernelWriter:
    writer = KernelWriter(host)
    monkeypatch.setattr(executor, "SysfsWriter", lambda: writer)
    return writer


def driver(host: HostRoot, address: str) -> str:
    link = host.pci_devices / address / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else ""


def test_repair_leaves_a_vm_whose_deploy_holds_its_lock(host: HostRoot, kernel: KernelWriter) -> None:
    """Repair found VM 42's journal 'preparing' while its deploy was binding, rolled it back, and the
    deploy went on to say prepared: one GPU on nvidia, one on vfio-pci, no owner."""
    half, finish = threading.Event(), threading.Event()

    def deploy() -> None:
        with vm_lock(host, 42):
            journal = Journal(host, 42)
            journal.save()
            for address in (GPU, GPU2):
                ownership.claim(host, address, 42)
            journal.steps.append(Step(Action("pci_driver", GPU, "vfio-pci", "nvidia", "VM 42"), "done"))
            journal.save()
            executor.EXECUTORS["pci_driver"].do(host, journal.steps[0].action, kernel)
            half.set()
            finish.wait(30)
            journal.steps.append(Step(Action("pci_driver", GPU2, "vfio-pci", "nvidia", "VM 42"), "done"))
            executor.EXECUTORS["pci_driver"].do(host, journal.steps[1].action, kernel)
            journal.phase = "prepared"
            journal.save()

    worker = threading.Thread(target=deploy)
    worker.start()
    try:
        assert half.wait(30)
        report = repair(host)
        assert (report.busy, report.rolled_back, report.orphans_dropped) == ([42], [], [])
        assert driver(host, GPU) == "vfio-pci" and ownership.held_devices(host) == {GPU: 42, GPU2: 42}
    finally:
        finish.set()
        worker.join()
    assert driver(host, GPU) == driver(host, GPU2) == "vfio-pci"
    assert ownership.held_devices(host) == {GPU: 42, GPU2: 42}
    assert repair(host).kept == [42]


DEPLOY = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from simkernel import KernelWriter
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import executor, ownership
from aifactory_core.lifecycle.vmlock import vm_lock
from aifactory_core.model import Action
host = HostRoot(Path(sys.argv[1]), Path(sys.argv[2]))
writer = KernelWriter(host)
gpus = ("0000:1b:00.0", "0000:43:00.0")
for round in range(int(sys.argv[4])):
    with vm_lock(host, 42):  # the deploy wrapper, from its claim until the original returned
        executor.prepare(host, 42, [Action("pci_driver", gpu, "vfio-pci", "nvidia", "VM 42") for gpu in gpus],
                         writer)
        drivers = [(host.pci_devices / gpu / "driver").resolve().name for gpu in gpus]
        if drivers != ["vfio-pci", "vfio-pci"] or ownership.held_devices(host) != {gpu: 42 for gpu in gpus}:
            print("inconsistent", drivers, ownership.held_devices(host), flush=True)
            sys.exit(1)
    with vm_lock(host, 42):  # shutdown's give-back
        executor.release(host, 42, writer)
print("consistent", flush=True)
"""


def test_repair_in_a_loop_never_breaks_a_deploy_in_another_process(host: HostRoot, kernel: KernelWriter) -> None:
    deploy = subprocess.Popen([sys.executable, "-c", DEPLOY, str(host.root), str(host.state_dir), str(TESTS), "20"],
                              stdout=subprocess.PIPE, text=True)
    rolled_back: list[int] = []
    while deploy.poll() is None:
        report = repair(host)
        rolled_back += report.rolled_back + report.released
        assert report.problems == []
    assert deploy.communicate(timeout=60)[0].strip() == "consistent" and deploy.returncode == 0
    assert rolled_back == []
    assert driver(host, GPU) == driver(host, GPU2) == "nvidia" and ownership.held_devices(host) == {}


def test_a_redeploy_asking_for_more_gives_every_device_back_to_its_own_driver(host: HostRoot,
                                                                              kernel: KernelWriter) -> None:
    """A prepared journal of VM 42 (GPU) meets a new deploy of VM 42 asking for GPU and GPU2: the
    plan saw GPU on vfio-pci, where the old journal left it; the new journal must still give it back
    to nvidia."""
    executor.prepare(host, 42, [Action("pci_driver", GPU, "vfio-pci", "nvidia", "VM 42")])
    assert driver(host, GPU) == "vfio-pci"
    planned = [Action("pci_driver", address, "vfio-pci", driver(host, address), "VM 42") for address in (GPU, GPU2)]
    assert planned[0].undo_value == "vfio-pci"
    journal = executor.prepare(host, 42, planned)
    assert [step.action.undo_value for step in journal.steps] == ["nvidia", "nvidia"]
    assert kernel.resets == [GPU]  # the old claim was given back, reset, before the new one
    assert executor.release(host, 42)
    assert driver(host, GPU) == driver(host, GPU2) == "nvidia" and ownership.held_devices(host) == {}
