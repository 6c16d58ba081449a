"""Parts of a VM's transaction (a hot-plugged device) added and released alone, on a generated
DGX-shaped host through the simulated driver core (see ``simkernel``)."""

import pytest
from simkernel import SimulatedDriverCore

from aifactory_core.errors import HostError
from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import executor, ownership
from aifactory_core.lifecycle.journal import Journal
from aifactory_core.lifecycle.parts import add_part, release_part
from aifactory_core.model import Action

BASE = "0000:01:00.0"
ADDED = "0000:01:00.1"


@pytest.fixture
def host(tmp_path, monkeypatch: pytest.MonkeyPatch) -> HostRoot:  # noqa: ANN001
    from hostroots import generate_host

    SimulatedDriverCore().install(monkeypatch)
    return HostRoot(generate_host("dgx-h100", tmp_path / "root"), tmp_path / "state")


def _bind(address: str) -> Action:
    return Action("pci_driver", address, "vfio-pci", "ixgbe", f"VM 7 takes {address}")


def _driver(host: HostRoot, address: str) -> str | None:
    return HostInventory(host).pci[address].driver


def test_a_part_joins_a_prepared_vm_and_leaves_alone(host: HostRoot) -> None:
    executor.prepare(host, 7, [_bind(BASE)], scopes=["base"])
    add_part(host, 7, "nic2", [_bind(ADDED)])
    assert (_driver(host, BASE), _driver(host, ADDED)) == ("vfio-pci", "vfio-pci")
    assert ownership.held_devices(host) == {BASE: 7, ADDED: 7}
    add_part(host, 7, "nic2", [_bind(ADDED)])  # repeated: nothing made twice
    assert len(Journal.load(host, 7).steps) == 2  # type: ignore[union-attr]

    assert release_part(host, 7, "nic2")
    assert (_driver(host, BASE), _driver(host, ADDED)) == ("vfio-pci", "ixgbe")
    assert ownership.held_devices(host) == {BASE: 7}
    assert not release_part(host, 7, "nic2")
    assert executor.release(host, 7) and _driver(host, BASE) == "ixgbe"


def test_a_failing_part_is_undone_and_the_rest_kept(host: HostRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    executor.prepare(host, 7, [_bind(BASE)], scopes=["base"])
    SimulatedDriverCore(fail_on=f"{ADDED}->vfio-pci").install(monkeypatch)
    with pytest.raises(HostError, match="simulated failure"):
        add_part(host, 7, "nic2", [_bind(ADDED)])
    assert (_driver(host, BASE), _driver(host, ADDED)) == ("vfio-pci", "ixgbe")
    assert ownership.held_devices(host) == {BASE: 7}
    assert [step.scope for step in Journal.load(host, 7).steps] == ["base"]  # type: ignore[union-attr]


def test_a_part_held_by_another_vm_is_refused(host: HostRoot) -> None:
    executor.prepare(host, 8, [_bind(ADDED)])
    executor.prepare(host, 7, [_bind(BASE)])
    with pytest.raises(HostError, match="held by VM 8"):
        add_part(host, 7, "nic2", [_bind(ADDED)])
    assert ownership.held_devices(host) == {ADDED: 8, BASE: 7}


def test_the_last_part_released_removes_the_journal(host: HostRoot) -> None:
    add_part(host, 7, "nic2", [_bind(ADDED)])
    assert release_part(host, 7, "nic2")
    assert Journal.load(host, 7) is None and ownership.held_devices(host) == {}


def test_a_journal_left_mid_transaction_is_refused(host: HostRoot) -> None:
    journal = Journal(host, 7)
    journal.save()
    with pytest.raises(HostError, match="run 'aifactory repair' first"):
        add_part(host, 7, "nic2", [_bind(ADDED)])
