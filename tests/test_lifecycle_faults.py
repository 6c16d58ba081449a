"""Faults a review reproduced against the transaction engine, each a test that failed on the code
before the fix: a damaged journal stopped the whole repair; a stale ``prepared`` journal let a
redeploy of the same VM skip the claim and the quarantine check; a full disk during a prepare left
the owner record and a ``preparing`` journal behind (a real small tmpfs, in a private mount
namespace)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import needs
import pytest
from simkernel import SimulatedDriverCore

from aifactory_core.errors import HostError
from aifactory_core.host.inventory import HostInventory
from aifactory_core.host.sanitize import quarantine
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import executor, ownership
from aifactory_core.lifecycle.journal import Journal
from aifactory_core.lifecycle.repair import repair
from aifactory_core.model import Action

GPU = "0000:1b:00.0"
GPU2 = "0000:43:00.0"
MGMT = ("0000:01:00.0", "0000:01:00.1")
MAX_JOURNAL_BYTES = 1 << 20  # the journal size limit (aifactory_core.lifecycle.journal)
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def host(tmp_path: Path) -> HostRoot:
    from hostroots import generate_host

    root = generate_host("dgx-h100", tmp_path / "root")
    return HostRoot(root, tmp_path / "state")


def _driver(host: HostRoot, address: str) -> str | None:
    return HostInventory(host).pci[address].driver


def _actions(host: HostRoot, *addresses: str) -> list[Action]:
    return [Action("pci_driver", address, "vfio-pci", _driver(host, address) or "", "test") for address in addresses]


# ---- a damaged journal among good ones ------------------------------------------------------------


def _truncated(path: Path) -> None:
    path.write_text(path.read_text()[:40])


def _empty_list(path: Path) -> None:
    path.write_text("[]\n")


def _step_without_kind(path: Path) -> None:
    document = json.loads(path.read_text())
    del document["steps"][0]["kind"]
    path.write_text(json.dumps(document))


def _oversized(path: Path) -> None:
    document = json.loads(path.read_text())
    document["padding"] = "x" * MAX_JOURNAL_BYTES
    path.write_text(json.dumps(document))


def _a_link(path: Path) -> None:
    target = path.with_name("elsewhere")
    path.rename(target)
    path.symlink_to(target)


def _not_utf8(path: Path) -> None:
    path.write_bytes(b"\xff\xfe{}")


DAMAGE = [
    pytest.param(_truncated, "Expecting", id="truncated"),
    pytest.param(_empty_list, "not a JSON object", id="empty-list"),
    pytest.param(_step_without_kind, "'kind'", id="step-without-kind"),
    pytest.param(_oversized, f"larger than {MAX_JOURNAL_BYTES} bytes", id="oversized"),
    pytest.param(_a_link, "is a link: not following it", id="a-link"),
    pytest.param(_not_utf8, "utf-8", id="not-utf8"),
]


@pytest.mark.parametrize(("damage", "named"), DAMAGE)
def test_a_damaged_journal_is_set_aside_and_the_others_are_repaired(host: HostRoot,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   damage: Callable[[Path], None],
                                                                   named: str) -> None:
    """Old code: ``all_journals`` raised on VM 8's journal and the repair stopped; VM 7 and VM 9
    kept their devices."""
    SimulatedDriverCore().install(monkeypatch)
    executor.prepare(host, 7, _actions(host, *MGMT))
    executor.prepare(host, 8, _actions(host, GPU))
    executor.prepare(host, 9, _actions(host, GPU2))
    damage(host.state_dir / "vms" / "8.json")
    report = repair(host, boot=True)
    assert report.released == [7, 9], report
    assert len(report.problems) == 1 and report.problems[0].startswith("VM 8: journal "), report.problems
    assert named in report.problems[0] and "set aside as 8.json.damaged-" in report.problems[0], report.problems
    assert [_driver(host, address) for address in (*MGMT, GPU2)] == ["ixgbe", "ixgbe", "nvidia"]
    assert ownership.held_devices(host) == {GPU: 8}  # no one can tell what VM 8's journal held: kept
    assert _driver(host, GPU) == "vfio-pci"
    aside = [name for name in os.listdir(host.state_dir / "vms") if name.startswith("8.json.damaged-")]
    assert len(aside) == 1 and not (host.state_dir / "vms" / "8.json").exists()
    again = repair(host, boot=True)  # the set-aside journal still explains VM 8's device
    assert again.problems == [] and again.orphans_dropped == [] and ownership.held_devices(host) == {GPU: 8}


def test_the_host_probe_names_a_set_aside_journal(host: HostRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    from aifactory_core.probes import host_system
    from aifactory_core.probes.sysfs import Root

    SimulatedDriverCore().install(monkeypatch)
    executor.prepare(host, 8, _actions(host, GPU))
    _empty_list(host.state_dir / "vms" / "8.json")
    repair(host, boot=True)
    output = host_system.probe(Root(str(host.root), str(host.state_dir)), replay=None, budget_s=1.0)
    problems = [line for line in output.splitlines() if "PROBLEMS" in line]
    assert any("journal vms/8.json.damaged-" in line and "set aside" in line for line in problems), output[:2000]


# ---- a stale prepared journal ---------------------------------------------------------------------


def test_a_stale_prepared_journal_does_not_hand_out_a_quarantined_gpu(host: HostRoot,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """VM 7's journal says ``prepared`` (GPU). Its redeploy asks for GPU2, quarantined since: the old
    code returned the stale journal, never claiming GPU2 nor checking its quarantine."""
    SimulatedDriverCore().install(monkeypatch)
    executor.prepare(host, 7, _actions(host, GPU))
    quarantine(host, GPU2, "reset failed: link down")
    with pytest.raises(HostError, match=f"device {GPU2} is quarantined"):
        executor.prepare(host, 7, _actions(host, GPU2))
    assert ownership.held_devices(host) == {}
    assert _driver(host, GPU2) == "nvidia" and _driver(host, GPU) == "nvidia"
    assert Journal.load(host, 7) is None


def test_a_prepared_journal_for_the_same_devices_is_claimed_again(host: HostRoot,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The same request retried: the claims are made again, so a quarantine since then refuses it."""
    SimulatedDriverCore().install(monkeypatch)
    first = executor.prepare(host, 7, _actions(host, GPU))
    again = executor.prepare(host, 7, [Action("pci_driver", GPU, "vfio-pci", "nvidia", "retry")])
    assert [step.to_json() for step in again.steps] == [step.to_json() for step in first.steps]
    quarantine(host, GPU, "reset failed")
    with pytest.raises(HostError, match="quarantined"):
        executor.prepare(host, 7, [Action("pci_driver", GPU, "vfio-pci", "nvidia", "retry")])


def test_a_prepared_journal_for_other_devices_is_given_back_first(host: HostRoot,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    SimulatedDriverCore().install(monkeypatch)
    executor.prepare(host, 7, _actions(host, GPU))
    journal = executor.prepare(host, 7, _actions(host, GPU2))
    assert [step.action.target for step in journal.steps] == [GPU2]
    assert ownership.held_devices(host) == {GPU2: 7}
    assert _driver(host, GPU) == "nvidia" and _driver(host, GPU2) == "vfio-pci"


# ---- a full disk during a prepare -----------------------------------------------------------------

FULL_DISK = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import pytest
from simkernel import SimulatedDriverCore
from aifactory_core.errors import AifactoryError
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import executor, ownership
from aifactory_core.model import Action

host = HostRoot(Path(sys.argv[1]), Path(sys.argv[2]))
SimulatedDriverCore().install(pytest.MonkeyPatch())


def fill(host, action, writer):
    # another process fills the file system while the prepare runs
    with open(host.state_dir / "filler", "wb") as stream:
        try:
            while True:
                stream.write(b"x" * 4096)
                stream.flush()
        except OSError:
            pass


executor.register_executor("fill_disk", fill, lambda *_: None)
actions = [Action("pci_driver", address, "vfio-pci", "ixgbe", "t") for address in sys.argv[4:6]]
actions.append(Action("fill_disk", "state", "full", None, "t"))
try:
    executor.prepare(host, 7, actions)
    error = None
except AifactoryError as caught:
    error = caught.message
except OSError as caught:
    error = f"OSError {caught}"
entries = sorted(str(path.relative_to(host.state_dir)) for path in host.state_dir.rglob("*") if path.is_file())
print(json.dumps({"error": error, "held": ownership.held_devices(host), "files": entries}))
"""


def test_rollback_completes_when_the_disk_fills_during_a_prepare(host: HostRoot) -> None:
    """Old code: the rollback's first journal write failed (ENOSPC) and stopped it; the owner
    records and the ``preparing`` journal stayed, the NICs on vfio-pci."""
    needs.root("mounts a small tmpfs in a private mount namespace")
    unshare = needs.tool("unshare", hint="util-linux")
    host.state_dir.mkdir()
    script = 'mount -t tmpfs -o size=256k,mode=0755 aifactory-full "$1" && shift && exec "$@"'
    result = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                             str(host.state_dir), sys.executable, "-c", FULL_DISK, str(host.root), str(host.state_dir),
                             str(TESTS), *MGMT], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["error"] is not None and "No space left on device" in outcome["error"], outcome
    assert "OSError" not in outcome["error"] and "rollback also failed" not in outcome["error"], outcome
    assert outcome["held"] == {}, outcome
    left = [name for name in outcome["files"] if not name.startswith("locks/")]  # lock files stay, by design
    assert left == ["filler"], outcome  # no journal, owner record or temporary file left
    assert [_driver(host, address) for address in MGMT] == ["ixgbe", "ixgbe"]
