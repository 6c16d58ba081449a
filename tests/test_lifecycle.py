"""The transaction engine: journal before change, ownership, rollback, release, crash repair."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from simkernel import SimulatedDriverCore

from aifactory_core.errors import HostError
from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import executor, ownership
from aifactory_core.lifecycle.journal import Journal
from aifactory_core.lifecycle.repair import repair
from aifactory_core.model import Action

GPU = "0000:1b:00.0"
GPU2 = "0000:43:00.0"
MGMT = ("0000:01:00.0", "0000:01:00.1")


@pytest.fixture
def host(tmp_path: Path) -> HostRoot:
    from hostroots import generate_host

    root = generate_host("dgx-h100", tmp_path / "root")
    return HostRoot(root, tmp_path / "state")


def _driver(host: HostRoot, address: str) -> str | None:
    return HostInventory(host).pci[address].driver


def _actions(host: HostRoot, *addresses: str, vm: int = 7) -> list[Action]:
    return [Action("pci_driver", address, "vfio-pci", _driver(host, address) or "", f"VM {vm}")
            for address in addresses]


def test_prepare_journals_claims_and_release_restores(host: HostRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    SimulatedDriverCore().install(monkeypatch)
    executor.prepare(host, 7, _actions(host, *MGMT))
    assert [_driver(host, address) for address in MGMT] == ["vfio-pci", "vfio-pci"]
    journal = json.loads((host.state_dir / "vms" / "7.json").read_text())
    assert journal["phase"] == "prepared"
    assert [step["status"] for step in journal["steps"]] == ["done", "done"]
    assert ownership.held_devices(host) == {MGMT[0]: 7, MGMT[1]: 7}
    assert executor.release(host, 7)
    assert [_driver(host, address) for address in MGMT] == ["ixgbe", "ixgbe"]
    assert ownership.held_devices(host) == {}
    assert not (host.state_dir / "vms" / "7.json").exists()
    assert not executor.release(host, 7)  # idempotent: cancel after a release


def test_failure_half_way_rolls_back_in_reverse(host: HostRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    core = SimulatedDriverCore(fail_on=f"{MGMT[1]}->vfio-pci")
    core.install(monkeypatch)
    with pytest.raises(HostError, match="simulated failure"):
        executor.prepare(host, 7, _actions(host, *MGMT))
    # the two binds run as one parallel batch; the undo goes newest step first
    assert sorted(core.calls[:2]) == [(MGMT[0], "vfio-pci"), (MGMT[1], "vfio-pci")]
    assert core.calls[2:] == [(MGMT[1], "ixgbe"), (MGMT[0], "ixgbe")]
    assert [_driver(host, address) for address in MGMT] == ["ixgbe", "ixgbe"]
    assert ownership.held_devices(host) == {} and Journal.load(host, 7) is None


def test_a_held_device_is_refused_and_nothing_changes(host: HostRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    SimulatedDriverCore().install(monkeypatch)
    executor.prepare(host, 7, _actions(host, GPU))
    core = SimulatedDriverCore()
    core.install(monkeypatch)
    with pytest.raises(ownership.DeviceHeld, match=f"device {GPU} held by VM 7"):
        executor.prepare(host, 8, _actions(host, GPU2, GPU, vm=8))
    assert core.calls == []  # every claim comes before any change
    assert _driver(host, GPU2) == "nvidia"
    assert ownership.held_devices(host) == {GPU: 7}


def test_dry_run_lists_the_exact_writes_without_changing_anything(host: HostRoot) -> None:
    before = sorted(p.name for p in (host.pci_devices / GPU).iterdir())
    writes = executor.plan_writes(host, _actions(host, GPU))
    assert [(Path(w.path).relative_to(host.root).as_posix(), w.value) for w in writes] == [
        (f"sys/bus/pci/devices/{GPU}/driver_override", "vfio-pci\n"),
        (f"sys/bus/pci/devices/{GPU}/driver/unbind", GPU),
        ("sys/bus/pci/drivers_probe", GPU),
    ]
    assert sorted(p.name for p in (host.pci_devices / GPU).iterdir()) == before
    assert _driver(host, GPU) == "nvidia" and not host.state_dir.exists()


def test_repair_rolls_back_an_interrupted_prepare(host: HostRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    core = SimulatedDriverCore()
    core.install(monkeypatch)
    journal = Journal(host, 9)
    journal.save()
    ownership.claim(host, MGMT[0], 9)
    ownership.claim(host, MGMT[1], 9)
    step = executor.Step(_actions(host, MGMT[0], vm=9)[0])
    journal.steps.append(step)
    journal.save()
    core.set_driver(host, MGMT[0], "vfio-pci")  # made, but the crash came before it was marked done
    report = repair(host)
    assert report.rolled_back == [9] and report.problems == []
    assert [_driver(host, address) for address in MGMT] == ["ixgbe", "ixgbe"]
    assert ownership.held_devices(host) == {}


def test_repair_keeps_prepared_vms_and_drops_unexplained_ownership(
        host: HostRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    SimulatedDriverCore().install(monkeypatch)
    executor.prepare(host, 7, _actions(host, GPU))
    ownership.claim(host, GPU2, 99)  # no journal for VM 99
    report = repair(host)
    assert report.kept == [7] and report.orphans_dropped == [GPU2]
    assert ownership.held_devices(host) == {GPU: 7}


def test_sixteen_concurrent_claims_one_winner(host: HostRoot) -> None:
    """Sixteen processes race for one device: exactly one owns it, fifteen are told who does."""
    script = (
        "import sys; from pathlib import Path\n"
        "from aifactory_core.hostroot import HostRoot\n"
        "from aifactory_core.lifecycle import ownership\n"
        "host = HostRoot(Path(sys.argv[1]), Path(sys.argv[2]))\n"
        "try:\n    ownership.claim(host, sys.argv[3], int(sys.argv[4])); print('won')\n"
        "except ownership.DeviceHeld as error:\n    print(error.message)\n"
    )
    processes = [subprocess.Popen([sys.executable, "-c", script, str(host.root), str(host.state_dir), GPU, str(vm)],
                                  stdout=subprocess.PIPE, text=True) for vm in range(100, 116)]
    outputs = [process.communicate(timeout=120)[0].strip() for process in processes]
    assert outputs.count("won") == 1
    winner = 100 + outputs.index("won")
    assert all(output == f"device {GPU} held by VM {winner}" for output in outputs if output != "won")
    assert ownership.held_devices(host) == {GPU: winner}


def test_fault_injection_kills_after_the_chosen_journal_write(host: HostRoot) -> None:
    script = (
        "import sys; from pathlib import Path\n"
        "from aifactory_core.lifecycle.journal import Journal\n"
        "from aifactory_core.hostroot import HostRoot\n"
        "j = Journal(HostRoot(Path(sys.argv[1]), Path(sys.argv[2])), 5)\n"
        "for n in range(5):\n    j.phase = 'preparing'; j.save(); print(n, flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(host.root), str(host.state_dir)],
                            env={**os.environ, "AIFACTORY_FAULT_AT": "3"}, capture_output=True, text=True)
    assert result.returncode == -9 and result.stdout.split() == ["0", "1"]
