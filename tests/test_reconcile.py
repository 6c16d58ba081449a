"""Reconciliation: what a VM without a domain holds is given back; a running VM, or one whose
deploy is in flight, is never touched; the per-VM lock between deploy, release, repair and it.

The host is the generated DGX tree with :class:`simkernel.KernelWriter` answering for the kernel's
driver core, so the real ``pci_driver`` executor, the reset and the health check run; the domains
that run are libvirt's state directory under the host root (``run/libvirt/qemu/one-<id>.pid``) and
its processes (``proc/<pid>/cmdline``), as :mod:`aifactory_core.host.domains` reads them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from simkernel import KernelWriter

from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import executor, ownership
from aifactory_core.lifecycle.executor import ActionExecutor
from aifactory_core.lifecycle.journal import Journal
from aifactory_core.lifecycle.reconcile import NETWORK_GRACE_S, reconcile, retrying_held
from aifactory_core.lifecycle.vmlock import VmBusy, vm_lock
from aifactory_core.model import Action
from aifactory_core.vnm.hook import vnm_host

GPU = "0000:1b:00.0"
GPU2 = "0000:43:00.0"
NIC = "0000:01:00.0"
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.fixture
def host(dgx_root: Path, tmp_path: Path) -> HostRoot:
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", str(dgx_root), str(root)], check=True)
    (root / "run/libvirt/qemu").mkdir(parents=True)  # this host's libvirt, running no domain yet
    return HostRoot(root, tmp_path / "state")


@pytest.fixture
def kernel(host: HostRoot, monkeypatch: pytest.MonkeyPatch) -> KernelWriter:
    """The driver core's stand-in, also for every release that makes its own writer."""
    writer = KernelWriter(host)
    monkeypatch.setattr(executor, "SysfsWriter", lambda: writer)
    return writer


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A network action kind whose undo is recorded (the VF scrub needs netlink: tests/test_vnm_hook.py)."""
    undone: list[str] = []
    monkeypatch.setitem(executor.EXECUTORS, "test_net", ActionExecutor(
        lambda host, action, writer: None, lambda host, action, writer: undone.append(action.target)))
    return undone


def driver(host: HostRoot, address: str) -> str:
    link = host.pci_devices / address / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else ""


def bind(host: HostRoot, vm: int, *addresses: str) -> None:
    actions = [Action("pci_driver", address, "vfio-pci", driver(host, address), f"VM {vm}") for address in addresses]
    executor.prepare(host, vm, actions)


def network_journal(host: HostRoot, vm: int, age_s: float = 3600.0) -> None:
    executor.prepare(vnm_host(host), vm, [Action("test_net", f"enp170s0f0np0/{vm}", "{}", "clean", "VF")])
    path = vnm_host(host).state_dir / "vms" / f"{vm}.json"
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))


def domain_runs(host: HostRoot, vm: int) -> None:
    """libvirt's record of a running domain ``one-<vm>``."""
    directory = host.path("/run/libvirt/qemu")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"one-{vm}.pid").write_text("4242\n")


def qemu_runs(host: HostRoot, pid: int, name: str) -> Path:
    process = host.path(f"/proc/{pid}")
    (process / "fd").mkdir(parents=True)
    (process / "cmdline").write_bytes(b"\0".join([b"/usr/bin/qemu-system-x86_64", b"-name",
                                                   f"guest={name},debug-threads=on".encode(), b""]))
    (process / "comm").write_text("qemu-system-x86\n")
    return process


def test_owner_gone_is_released_sanitised_and_its_network_scrubbed(host: HostRoot, kernel: KernelWriter,
                                                                   network: list[str]) -> None:
    bind(host, 42, GPU)
    network_journal(host, 42)
    assert driver(host, GPU) == "vfio-pci" and ownership.held_devices(host) == {GPU: 42}
    report = reconcile(host)
    assert (report.released, report.running, report.busy, report.problems) == ([42], [], [], [])
    assert driver(host, GPU) == "nvidia"
    assert kernel.resets == [GPU]  # reset and health-checked before it went back
    from aifactory_core.host.sanitize import quarantined, reset_history

    assert [entry[1:3] for entry in reset_history(host, GPU)] == [("OK", "flr")] and quarantined(host) == {}
    assert network == ["enp170s0f0np0/42"]
    assert ownership.held_devices(host) == {}
    assert Journal.load(host, 42) is None and Journal.load(vnm_host(host), 42) is None


def test_a_running_domain_keeps_everything(host: HostRoot, kernel: KernelWriter, network: list[str]) -> None:
    bind(host, 42, GPU)
    network_journal(host, 42)
    bind(host, 43, GPU2)
    domain_runs(host, 42)
    qemu_runs(host, 900, "one-43")  # libvirt lost track of it; its QEMU still runs
    report = reconcile(host)
    assert (report.released, sorted(report.running), report.problems) == ([], [42, 43], [])
    assert driver(host, GPU) == driver(host, GPU2) == "vfio-pci" and kernel.resets == [] and network == []
    assert ownership.held_devices(host) == {GPU: 42, GPU2: 43}


def test_a_vm_whose_action_holds_its_lock_is_left_alone(host: HostRoot, kernel: KernelWriter) -> None:
    """A deploy holds the VM's lock from its claim until the domain runs: no domain yet, but busy."""
    bind(host, 42, GPU)
    taken, done = threading.Event(), threading.Event()

    def deploy_in_flight() -> None:
        with vm_lock(host, 42):
            taken.set()
            done.wait(30)

    worker = threading.Thread(target=deploy_in_flight)
    worker.start()
    try:
        assert taken.wait(30)
        report = reconcile(host)
        assert (report.released, report.busy) == ([], [42])
        assert driver(host, GPU) == "vfio-pci" and ownership.held_devices(host) == {GPU: 42}
    finally:
        done.set()
        worker.join()
    assert reconcile(host).released == [42] and driver(host, GPU) == "nvidia"


def test_a_young_network_journal_without_a_device_journal_is_a_deploy_starting(
        host: HostRoot, kernel: KernelWriter, network: list[str]) -> None:
    """VNM pre made it in its own process just before deploy: not yet a VM that is gone."""
    network_journal(host, 44, age_s=1)
    report = reconcile(host)
    assert (report.released, report.busy, network) == ([], [44], [])
    network_journal(host, 45, age_s=NETWORK_GRACE_S + 5)
    assert reconcile(host, [45]).released == [45] and network == ["enp170s0f0np0/45"]


def test_damaged_records_stop_nothing_else(host: HostRoot, kernel: KernelWriter) -> None:
    bind(host, 42, GPU)
    bind(host, 41, GPU2)
    (host.state_dir / "vms" / "41.json").write_text("[]\n")  # damaged: what it held stays held
    ownership.claim(host, NIC, 43)  # an owner record no journal explains
    (host.state_dir / "owners" / "not-an-address").write_text("44\n")
    (host.state_dir / "vms" / "x.json").write_text("{}\n")
    report = reconcile(host)
    assert sorted(report.released) == [42, 43]
    assert len(report.problems) == 1 and report.problems[0].startswith("VM 41: journal") and "damaged" in \
        report.problems[0]
    assert driver(host, GPU) == "nvidia" and driver(host, GPU2) == "vfio-pci"
    assert ownership.held_devices(host) == {GPU2: 41}


def test_nothing_is_released_when_the_domains_cannot_be_read(host: HostRoot, kernel: KernelWriter) -> None:
    bind(host, 42, GPU)

    def unknown(_host: HostRoot) -> set[int]:
        from aifactory_core.host.domains import DomainsUnknown

        raise DomainsUnknown("libvirt is down")

    report = reconcile(host, running=unknown)
    assert report.released == [] and report.problems == ["nothing released: libvirt is down"]
    assert driver(host, GPU) == "vfio-pci"


def test_a_domain_started_while_the_lock_was_free_is_seen_under_it(host: HostRoot, kernel: KernelWriter) -> None:
    """The domains are read again under the VM's lock: a deploy that finished in between counts."""
    bind(host, 42, GPU)
    reads: list[int] = []

    def running(_host: HostRoot) -> set[int]:
        reads.append(1)
        return set() if len(reads) == 1 else {42}

    report = reconcile(host, running=running)
    assert (report.released, report.running, len(reads)) == ([], [42], 2)
    assert driver(host, GPU) == "vfio-pci"


def test_a_claim_held_by_a_gone_vm_is_reconciled_then_made(host: HostRoot, kernel: KernelWriter) -> None:
    bind(host, 42, GPU)

    def deploy_43() -> None:  # plans afresh on each try, as the deploy wrapper does
        bind(host, 43, GPU)

    domain_runs(host, 42)
    with pytest.raises(ownership.DeviceHeld, match=f"device {GPU} held by VM 42"):
        retrying_held(host, deploy_43)
    assert ownership.held_devices(host) == {GPU: 42}
    (host.path("/run/libvirt/qemu") / "one-42.pid").unlink()
    retrying_held(host, deploy_43)
    assert ownership.held_devices(host) == {GPU: 43} and kernel.resets == [GPU]
    executor.release(host, 43)
    assert driver(host, GPU) == "nvidia"  # the second plan saw the device back on its own driver


def test_vm_lock_is_reentrant_for_its_thread_and_excludes_others(host: HostRoot) -> None:
    with vm_lock(host, 7), vm_lock(host, 7):
        outcome: list[object] = []
        thread = threading.Thread(target=lambda: outcome.append(_try_lock(host, 7)))
        thread.start()
        thread.join()
        assert outcome == ["busy"]
    assert _try_lock(host, 7) == "taken"
    assert oct((host.state_dir / "locks" / "vm-7.lock").stat().st_mode & 0o777) == "0o600"


def _try_lock(host: HostRoot, vm: int) -> str:
    try:
        with vm_lock(host, vm, timeout_s=0):
            return "taken"
    except VmBusy:
        return "busy"


DEPLOY = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from simkernel import KernelWriter
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import executor
from aifactory_core.lifecycle.vmlock import vm_lock
from aifactory_core.model import Action
host = HostRoot(Path(sys.argv[1]), Path(sys.argv[2]))
writer = KernelWriter(host)
for round in range(int(sys.argv[4])):
    with vm_lock(host, 42):  # the deploy wrapper: claim ... original deploy returned
        executor.prepare(host, 42, [Action("pci_driver", "0000:1b:00.0", "vfio-pci", "nvidia", "VM 42")], writer)
        time.sleep(0.02)  # the original deploy starting the domain
        qemu = Path(sys.argv[1], "run/libvirt/qemu")
        qemu.mkdir(parents=True, exist_ok=True)
        (qemu / "one-42.pid").write_text("1\\n")
    time.sleep(0.01)  # the VM runs
    with vm_lock(host, 42):  # shutdown: the original, then the release
        (qemu / "one-42.pid").unlink()
        executor.release(host, 42, writer)
print("deploys done", flush=True)
"""


def test_reconciling_while_a_vm_is_deployed_and_shut_down_over_and_over_never_releases_it(
        host: HostRoot, kernel: KernelWriter) -> None:
    """The race: a deploy process claims before its domain exists; reconciliations in two threads
    of this process run all the while. None may ever give back what the deploy holds: every
    release is the deploy process's own shutdown."""
    rounds = 25
    deploy = subprocess.Popen([sys.executable, "-c", DEPLOY, str(host.root), str(host.state_dir), str(TESTS),
                               str(rounds)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    released: list[int] = []
    problems: list[str] = []

    def reconcile_until_done() -> None:
        while deploy.poll() is None:
            report = reconcile(host)
            released.extend(report.released)
            problems.extend(report.problems)

    threads = [threading.Thread(target=reconcile_until_done) for _ in range(2)]
    for thread in threads:
        thread.start()
    out, _ = deploy.communicate(timeout=300)
    for thread in threads:
        thread.join()
    assert deploy.returncode == 0 and out.strip() == "deploys done"
    assert released == [] and problems == []
    assert kernel.resets == []  # this process's writer: it never reset the device
    assert driver(host, GPU) == "nvidia" and ownership.held_devices(host) == {}


def test_repair_reconcile_command_and_its_report(host: HostRoot, kernel: KernelWriter) -> None:
    """``aifactory repair --reconcile`` as a process: an owner record of a VM without a domain is
    dropped, a running VM's kept; the report names both."""
    from hostroots import run_cli

    ownership.claim(host, GPU, 42)
    ownership.claim(host, GPU2, 43)
    domain_runs(host, 43)
    result = run_cli("--host-root", str(host.root), "repair", "--reconcile",
                     env={"AIFACTORY_STATE_DIR": str(host.state_dir)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["released (no domain): 42", "running: 43", "busy (left alone): none"]
    assert ownership.held_devices(host) == {GPU2: 43}
    both = run_cli("--host-root", str(host.root), "repair", "--reconcile", "--boot",
                   env={"AIFACTORY_STATE_DIR": str(host.state_dir)})
    assert both.returncode != 0 and len(both.stderr.splitlines()) == 1 and "exclude each other" in both.stderr


PROBE = REPO / "drivers/im/kvm-probes.d/vm/monitor/aifactory-gpu"


def _probe(host: HostRoot, switch: str = "on") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AIFACTORY_HOST_ROOT": str(host.root), "AIFACTORY_STATE_DIR": str(host.state_dir),
           "AIFACTORY_RECONCILE": switch}
    return subprocess.run([sys.executable, "-S", str(PROBE), "kvm", "0", "host"], env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)


def test_the_vm_monitor_probe_starts_the_reconciliation_only_when_a_vm_has_no_domain(host: HostRoot) -> None:
    stamp = host.state_dir / "probes" / "reconcile.stamp"
    result = _probe(host)  # no records: the common host
    assert result.returncode == 0 and result.stderr == "" and not stamp.exists()
    ownership.claim(host, GPU, 42)
    ownership.claim(host, GPU2, 43)
    domain_runs(host, 42)
    domain_runs(host, 43)
    result = _probe(host)  # every recorded VM runs
    assert result.returncode == 0 and result.stderr == "" and not stamp.exists()
    assert [line.split(",")[0] for line in result.stdout.splitlines()] == ['VM = [ ID="42"', 'VM = [ ID="43"']
    (host.path("/run/libvirt/qemu") / "one-42.pid").unlink()
    for switch in ("", "off"):  # over a host root other than /, only when asked
        result = _probe(host, switch)
        assert result.returncode == 0 and result.stderr == "" and not stamp.exists()
    result = _probe(host)
    assert result.returncode == 0 and result.stderr == "" and stamp.exists()
    deadline = time.monotonic() + 60
    while ownership.held_devices(host) != {GPU2: 43} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ownership.held_devices(host) == {GPU2: 43}
    log = host.state_dir / "probes" / "reconcile.log"
    deadline = time.monotonic() + 30
    while "busy" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = log.read_text().splitlines()
    assert "released (no domain): 42" in lines and "running: 43" in lines, lines
    assert "aifactory: WARNING: VM 42 has no domain on this host: its devices and network were given back" in lines
    ownership.claim(host, GPU, 44)  # gone too, but within the minimum interval: not started again
    assert _probe(host).returncode == 0
    time.sleep(1)
    assert ownership.held_devices(host) == {GPU: 44, GPU2: 43}


def test_domains_read_from_libvirt_state_and_processes(host: HostRoot) -> None:
    from aifactory_core.host.domains import running_vms, vm_of_domain

    assert running_vms(host) == set()
    domain_runs(host, 5)
    (host.path("/run/libvirt/qemu") / "one-6.xml").write_text("<domstatus/>")
    (host.path("/run/libvirt/qemu") / "other-7.pid").write_text("1\n")
    qemu_runs(host, 300, "one-8")
    qemu_runs(host, 301, "one-x9")
    assert running_vms(host) == {5, 6, 8}
    assert [vm_of_domain(name) for name in ("one-12", "one-", "one-1a", "one-١٢", "two-3")] == [12, None, None,
                                                                                                None, None]


def test_the_release_is_the_journaled_one(host: HostRoot, kernel: KernelWriter,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A release the reconciliation starts is shutdown's: the journal says releasing before any undo."""
    bind(host, 42, GPU)
    seen: list[str] = []
    original = executor.rollback

    def spy(host_: HostRoot, journal: Journal, writer: object = None) -> list[str]:
        seen.append(json.loads(journal.path.read_text())["phase"])
        return original(host_, journal, writer)  # type: ignore[arg-type]

    monkeypatch.setattr(executor, "rollback", spy)
    assert reconcile(host).released == [42]
    assert seen == ["releasing"]


def test_vm_lock_refuses_a_vm_id_that_is_not_one(host: HostRoot) -> None:
    from aifactory_core.errors import UsageError

    with pytest.raises(UsageError), vm_lock(host, -1):
        pass
    assert not (host.state_dir / "locks").exists()


def test_devices_an_administrator_took_by_hand_are_left(host: HostRoot, kernel: KernelWriter) -> None:
    """'aifactory device bind' without --vm holds for the administrator, who has no domain."""
    from aifactory_core.lifecycle.ownership import ADMIN_VM
    from aifactory_core.probes import reconcile_trigger
    from aifactory_core.probes.sysfs import Root

    assert reconcile_trigger.ADMIN_VM == ADMIN_VM
    bind(host, ADMIN_VM, GPU)
    report = reconcile(host)
    assert (report.released, report.running, report.busy, report.problems) == ([], [], [], [])
    assert driver(host, GPU) == "vfio-pci" and ownership.held_devices(host) == {GPU: ADMIN_VM}
    root = Root(str(host.root), str(host.state_dir))
    assert not reconcile_trigger.due(root, ownership.held_devices(host))


def test_the_network_hook_locks_only_a_vm_with_something_of_the_suites(host: HostRoot, network: list[str]) -> None:
    """Most VMs have no PCI NIC: their VNM hooks take no lock and leave no file; a VM with a network
    journal is locked (its clean runs under the lock reconciliation respects)."""
    import base64

    from aifactory_core.config import Config
    from aifactory_core.vnm import hook

    document = base64.b64encode(b"<VM><ID>42</ID><UID>5</UID><GID>100</GID><TEMPLATE/></VM>")
    locks = host.state_dir / "locks"
    for phase in ("pre", "post", "clean"):
        hook.run(phase, document, host, Config())
    assert not (locks / "vm-42.lock").exists()
    network_journal(host, 42)
    seen: list[str] = []
    original = hook._run_locked

    def spy(*args: object) -> str:
        seen.append("locked" if _held_elsewhere(host, 42) else "free")
        return original(*args)  # type: ignore[arg-type]

    import aifactory_core.vnm.hook as module

    module._run_locked = spy  # type: ignore[assignment]
    try:
        assert hook.run("clean", document, host, Config()) == "VM 42: network released"
    finally:
        module._run_locked = original  # type: ignore[assignment]
    assert seen == ["locked"] and network == ["enp170s0f0np0/42"]


def _held_elsewhere(host: HostRoot, vm: int) -> bool:
    """Whether another thread finds VM ``vm``'s lock taken."""
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(_try_lock(host, vm)))
    thread.start()
    thread.join()
    return outcome == ["busy"]


def test_what_a_set_aside_journal_held_stays_held(host: HostRoot, kernel: KernelWriter) -> None:
    """The repair sets a damaged journal aside and leaves what it held to an administrator; its VM
    has no domain, but reconciliation must not disown the device unreset (a next tenant's VM would
    get it as the last one left it)."""
    from aifactory_core.lifecycle.journal import set_aside

    bind(host, 41, GPU2)
    (host.state_dir / "vms" / "41.json").write_text("[]\n")  # damaged
    set_aside(host, 41)
    report = reconcile(host)
    assert report.released == [] and len(report.problems) == 1 and "set aside" in report.problems[0]
    assert driver(host, GPU2) == "vfio-pci" and ownership.held_devices(host) == {GPU2: 41}
    assert kernel.resets == []
