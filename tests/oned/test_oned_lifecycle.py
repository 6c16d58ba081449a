"""Every VM lifecycle path of ``aifactory_core.vmm_actions.EVENTS`` that one host can take, through
the real VMM driver: a real oned 7.0.2, a ``qemu``-type node that is this machine over SSH
(``qemunode``), the suite installed by ``install.sh --sync``, real ``onevm`` calls, QEMU/TCG
domains under libvirt (VCPU=1, MEMORY=64 MiB, no disk: SeaBIOS finds nothing to boot, which is all
a lifecycle needs).

For each row the test asserts:

* the state oned reaches;
* the driver steps oned ran, in order, as the VM's log records them ("Successfully execute
  virtualization/network driver operation: X"), against the row's steps in the table;
* for a wrapped action, that OpenNebula's original ran with the argv the table gives (built from
  its parameters: ``deploy '<deployment file>' '<host>' <vmid> <host>``, ``save '<deploy id>'
  '<checkpoint file>' '<host>' <vmid> <host>``, ...): the originals in the node's remotes are
  preceded by a shim that appends the argv it was run with to a trace file, then execs the original;
* what the suite holds on the node: while the VM runs, its device journal and the ownership record
  of its device; after every exit path (and in every state where the domain is gone) no journal,
  no ownership record and no network journal at all.

The device: no PCI function can be passed through on this machine, so a stand-in device plugin
(``tests/oned/standin``, registered through the ``aifactory.plugins`` entry-point group in the host
environment) makes every deploy and restore claim ``0000:00:06.0`` of the node's host root (a copy
of the bundled H100 capture, with that function already on vfio-pci) through the built-in
``pci_driver`` action, as the vfio plugin claims a passthrough function: the journal, the ownership
record and every release path are the suite's own; the sysfs moves are the no-ops the kernel makes
for a function found on vfio-pci. The guest-initiated poweroff is ``virsh destroy`` of ``one-N``
(the SeaBIOS guest does not answer ACPI); the soft shutdowns end by upstream's own ``FORCE_DESTROY``
after ``SHUTDOWN_TIMEOUT`` (set to a few seconds in the session's ``kvmrc``).

The rows that move a VM between hosts run against a second ``qemu``-type host on the same machine
(``qemunode.qemu_node(own_host=True)``: its sshd, libvirtd and virtlogd in a mount namespace of
their own, where libvirt's directories are private, and a libvirtd ``host_uuid`` of its own; the
VM directories are shared, as on shared storage: the system datastore gets ``TM_MAD=shared`` for
these rows): cold migration, ``migrate --poweroff``/``--poweroff-hard``, live migration
(source and destination rows), and host failure and recovery (the second host's sshd stopped and
its monitoring agent ended until oned marks it ERROR and the VM UNKNOWN, then started again). After
each move the suite's records are checked on both hosts: empty on the host the VM left, held (or,
for a live migration, not held: the destination row's gap) on the host it went to. resume from
STOPPED/UNDEPLOYED runs on the same host (the template pins the VM to the first node), and a
resched that moves the VM is the migrate rows (oned has no other host to choose here).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from qemunode import ERROR, Node, add_host, destroy_domains, host_state, qemu_node, remove_host
from realone import REPO, Installed, RealOne, _stop_pid_file, note

from aifactory_core import vmm_actions
from aifactory_core.samples import extract_sample

pytestmark = pytest.mark.realone
NODE = "aifactory-vmnode"
STANDIN = "0000:00:06.0"  # the capture's H100, the stand-in device every VM claims
IOMMU_GROUP = "13"
BRIDGE = "aifmx0"  # the bridge the dummy-driver network names (made here, down, no address)
SHUTDOWN_TIMEOUT_S = 2
MONITOR_VM_S = 30  # oned's vm/monitor probe period (monitord.conf PROBES_PERIOD, upstream's default)
RECONCILE_CYCLES = 3
WRAPPED = tuple(name for name, action in vmm_actions.ACTIONS.items() if action.wrapped)
NODE2 = "aifactory-vmnode2"  # the second host: the same machine in a mount namespace of its own
NOT_RUN: dict[str, str] = {}
"""Rows of the table this module does not run, and why (none: every row runs here)."""
STATE = Path("var") / "lib" / "one" / "aifactory"  # the suite's state directory, in a host root
OP_LINE = re.compile(r"\[VMM\]\[I\]: (?:(Successfully execute|Failed to execute) (?:network|virtualization) driver "
                     r"operation: (\w+)\.|VM hotplug (resize) (successful|failed))")
"""How the VM's log names a driver step: a step of an action's list, or ``resize``, which the driver
runs alone and reports in a line of its own."""


def _row(name: str) -> vmm_actions.LifecycleEvent:
    return next(event for event in vmm_actions.EVENTS if event.event == name)


def _ops(steps: tuple[vmm_actions.Step, ...]) -> list[str]:
    return [step.action[4:] if step.action.startswith("vnm ") else step.action for step in steps]


def expected_ops(name: str, *, skip_where: str | None = None) -> list[str]:
    """The driver operations of a row in the table, in order, as the VM's log names them."""
    return _ops(tuple(step for step in _row(name).steps if step.where != skip_where))


# --- the node -------------------------------------------------------------------------------------


def _host_root(top: Path) -> Path:
    """A copy of the bundled capture with the stand-in device on vfio-pci in IOMMU group
    ``IOMMU_GROUP``, and the machine's own ``/var/tmp`` (the VM directories) in it."""
    root = top / "host-root"
    shutil.copytree(extract_sample("h100-sxm5-vm"), root, symlinks=True)
    device = (root / "sys" / "bus" / "pci" / "devices" / STANDIN).resolve()
    assert device.is_relative_to(root), device
    drivers = root / "sys" / "bus" / "pci" / "drivers"
    (drivers / "vfio-pci").mkdir()
    before = os.readlink(device / "driver")  # ../../../bus/pci/drivers/nvidia
    (device / "driver").unlink()
    (device / "driver").symlink_to(os.path.join(os.path.dirname(before), "vfio-pci"))
    group = root / "sys" / "kernel" / "iommu_groups" / IOMMU_GROUP
    (group / "devices").mkdir(parents=True)
    (device / "iommu_group").symlink_to(group)
    (group / "devices" / STANDIN).symlink_to(device)
    (root / "dev" / "vfio").mkdir(parents=True)
    (root / "dev" / "vfio" / IOMMU_GROUP).touch()
    (root / "var").mkdir(exist_ok=True)
    (root / "var" / "tmp").symlink_to("/var/tmp")
    (root / "run").symlink_to("/run")  # libvirt's state: which domains run (the reconciliation reads it)
    assert (root / "sys" / "bus" / "pci" / "devices" / STANDIN / "driver").resolve().name == "vfio-pci"
    return root


SHIM = """#!/bin/sh
# test shim: the argv the suite's wrapper ran OpenNebula's original with, then the original itself
{ printf '%s' "$(basename "$0" .one)"; for arg in "$@"; do printf '\\t%s' "$arg"; done; printf '\\n'; } \
    >> "$AIFACTORY_TEST_TRACE"
exec "$0.upstream" "$@"
"""


@dataclass
class RemotesEdit:
    """What the test changed in the session's remotes, undone afterwards."""

    restore: list[tuple[Path, bytes | None]] = field(default_factory=list)
    moved: list[tuple[Path, Path]] = field(default_factory=list)
    made: list[Path] = field(default_factory=list)

    def mkdir(self, path: Path) -> None:
        path.mkdir()
        self.made.append(path)

    def write(self, path: Path, text: str, mode: int = 0o644) -> None:
        self.restore.append((path, path.read_bytes() if path.exists() else None))
        stat = path.parent.stat()
        path.write_text(text)
        path.chmod(mode)
        shutil.chown(path, stat.st_uid, stat.st_gid)

    def move(self, source: Path, target: Path) -> None:
        source.rename(target)
        self.moved.append((source, target))

    def undo(self) -> None:
        for path, before in reversed(self.restore):
            if before is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(before)
        for source, target in reversed(self.moved):
            target.rename(source)
        for path in reversed(self.made):
            shutil.rmtree(path, ignore_errors=True)


def _edit_remotes(one: RealOne, edit: RemotesEdit) -> None:
    remotes = one.location / "var" / "remotes"
    kvmrc = remotes / "etc" / "vmm" / "kvm" / "kvmrc"
    text, made = re.subn(r"^export SHUTDOWN_TIMEOUT=\d+$", f"export SHUTDOWN_TIMEOUT={SHUTDOWN_TIMEOUT_S}",
                         kvmrc.read_text(), flags=re.MULTILINE)
    assert made == 1 and "export FORCE_DESTROY=yes" in text, "upstream's kvmrc changed shape"
    edit.write(kvmrc, text)
    for name in WRAPPED:
        original = remotes / "vmm" / "kvm" / f"{name}.one"
        assert original.is_file(), f"install.sh left no original {original}"
        edit.move(original, original.with_name(f"{name}.one.upstream"))
        edit.write(original, SHIM, 0o755)
    site = next((remotes / "aifactory" / "venv" / "lib").glob("python3*/site-packages"))
    source = REPO / "tests" / "oned" / "standin" / "aifactory_test_standin.py"
    edit.write(site / source.name, source.read_text())
    info = site / "aifactory_test_standin-1.0.dist-info"
    edit.mkdir(info)
    edit.write(info / "METADATA", "Metadata-Version: 2.1\nName: aifactory-test-standin\nVersion: 1.0\n")
    edit.write(info / "entry_points.txt", "[aifactory.plugins]\nstandin = aifactory_test_standin\n")


# --- the VM ---------------------------------------------------------------------------------------


def _records(state_dir: Path) -> list[str]:
    """Every journal, ownership record and network journal the suite keeps in ``state_dir``."""
    found = []
    for directory in ("vms", "owners", "vnm/vms", "vnm/owners"):
        path = state_dir / directory
        if path.is_dir():
            found += [f"{directory}/{entry.name}" for entry in path.iterdir() if not entry.name.startswith(".")]
    return sorted(found)


@dataclass
class Place:
    """One of the hosts a VM can be on: its name in oned, node, host id and host root."""

    name: str
    node: Node
    host: int
    host_root: Path

    def records(self) -> list[str]:
        return _records(self.host_root / STATE)

    def vm_directory(self, one: RealOne, vm: int) -> str:
        """What the VM's directory in the system datastore holds on this host (for a failure's message)."""
        listed = subprocess.run([*self.node.enter, "ls", "-la", f"{one.location}/var/datastores/0/{vm}"],
                                capture_output=True, text=True, check=False)
        return f"{self.name}: {listed.stdout}{listed.stderr}"

    def domain_active(self, one: RealOne, vm: int) -> bool:
        listed = self.node.virsh(one, "list", "--name")
        assert listed.returncode == 0, f"virsh list on {self.name}: {listed.stdout}{listed.stderr}"
        return f"one-{vm}" in listed.stdout.split()


@dataclass
class Matrix:
    one: RealOne
    node: Node
    host: int
    host_root: Path
    trace: Path
    template: int
    network: int
    vm: int = -1
    created: list[int] = field(default_factory=list)
    others: dict[str, Place] = field(default_factory=dict)
    """The other hosts a VM can move to, by name (the second node, once its fixture runs)."""

    @property
    def state_dir(self) -> Path:
        return self.host_root / STATE

    @property
    def place(self) -> Place:
        return Place(NODE, self.node, self.host, self.host_root)

    def records(self) -> list[str]:
        """Every journal, ownership record and network journal the suite keeps on the node."""
        return _records(self.state_dir)

    def held(self, vm: int) -> list[str]:
        return [f"owners/{STANDIN}", f"vms/{vm}.json"]

    def vm_log(self, vm: int) -> str:
        path = self.one.location / "var" / "vms" / str(vm) / "vm.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def state(self, vm: int) -> str:
        import pyone

        info = self.one.client().vm.info(vm)
        state = pyone.VM_STATE(int(info.STATE)).name
        return pyone.LCM_STATE(int(info.LCM_STATE)).name if state == "ACTIVE" else state

    def wait(self, vm: int, target: str, timeout_s: float = 180) -> float:
        """Wait for ``target`` (an LCM state for an ACTIVE VM, else the VM state); seconds waited."""
        t0 = time.monotonic()
        state = ""
        while time.monotonic() - t0 < timeout_s:
            state = self.state(vm)
            if state == target:
                return time.monotonic() - t0
            if "FAILURE" in state or state in ("FAILED", "UNKNOWN") or (state == "DONE" and target != "DONE"):
                break
            time.sleep(0.5)
        log = "\n".join(self.vm_log(vm).splitlines()[-25:])
        raise AssertionError(f"VM {vm}: {state}, not {target}, after {time.monotonic() - t0:.0f} s\n{log}")

    def host_of(self, vm: int) -> str:
        """The host oned has the VM on (its newest history record)."""
        history = self.one.client().vm.info(vm).HISTORY_RECORDS.HISTORY
        return str((history[-1] if isinstance(history, list) else history).HOSTNAME)

    def place_of(self, vm: int) -> Place:
        host = self.host_of(vm)
        return self.others[host] if host in self.others else self.place

    def onevm(self, *argv: str) -> None:
        self.one.run("onevm", *argv, timeout=120)

    def domain_active(self, vm: int) -> bool:
        return self.place.domain_active(self.one, vm)

    def create(self) -> int:
        vm = int(self.one.client().template.instantiate(self.template, "", False, "", False))
        self.created.append(vm)
        self.vm = vm
        # oned holds every new VM (VM_SUBMIT_ON_HOLD); admission, test_oned_hooks' subject, is not
        # this module's: the VM is released here (a refusal for want of a policy changes nothing).
        self.one.run("onevm", "release", str(vm), check=False)
        return vm


@dataclass
class Mark:
    """Where the VM's log and the trace were before a row: what the row adds comes after."""

    log: int
    trace: int
    deploy_id: str = ""
    """The domain's id in oned (the UUID deploy printed) when the row began."""


def _mark(matrix: Matrix, vm: int) -> Mark:
    trace = matrix.trace.read_text() if matrix.trace.exists() else ""
    deploy_id = str(matrix.one.client().vm.info(vm).DEPLOY_ID or "") if vm >= 0 else ""
    return Mark(len(matrix.vm_log(vm)), len(trace), deploy_id)


def _ops_since(matrix: Matrix, vm: int, mark: Mark) -> list[str]:
    operations = []
    for step_outcome, step, alone, alone_outcome in OP_LINE.findall(matrix.vm_log(vm)[mark.log:]):
        succeeded = step_outcome.startswith("Successfully") if step else alone_outcome == "successful"
        operations.append((step or alone) if succeeded else f"FAILED {step or alone}")
    return operations


def _trace_since(matrix: Matrix, mark: Mark) -> list[list[str]]:
    text = matrix.trace.read_text()[mark.trace:] if matrix.trace.exists() else ""
    return [line.split("\t") for line in text.splitlines()]


def _argv(matrix: Matrix, vm: int, action: str, deploy_id: str, host: str = NODE,
          dest_host: str = "") -> list[str | re.Pattern[str]]:
    """The argv the table gives ``action`` for this VM on ``host`` (a pattern where a value is
    numbered by oned: the deployment file)."""
    directory = f"{matrix.one.location}/var/datastores/0/{vm}"
    values: dict[str, str | re.Pattern[str]] = {
        vmm_actions.DEPLOY_ID: deploy_id, vmm_actions.HOST: host, vmm_actions.VM_ID: str(vm),
        vmm_actions.DEST_HOST: dest_host,
        vmm_actions.CHECKPOINT_FILE: f"{directory}/checkpoint",
        vmm_actions.DEPLOYMENT_FILE: re.compile(re.escape(f"{directory}/deployment.") + r"\d+")}
    return [values[parameter] for parameter in vmm_actions.ACTIONS[action].argv]


def _check_row(matrix: Matrix, vm: int, mark: Mark, operations: list[str], what: str,
               hosts: dict[str, tuple[str, str]] | None = None) -> None:
    """The driver steps since ``mark`` are ``operations`` (waited for: oned logs a step when the
    driver reports it), and every wrapped one ran the original with the table's argv. ``hosts``: for
    an action run on another host than the first node, that host (and the migration's destination)."""
    deadline = time.monotonic() + 120
    while len(ran := _ops_since(matrix, vm, mark)) < len(operations) and time.monotonic() < deadline:
        if any(operation.startswith("FAILED") for operation in ran):
            break
        time.sleep(0.5)
    assert ran == operations, f"{what}: driver steps {ran}, the table says {operations}"
    traced = _trace_since(matrix, mark)
    wrapped = [operation for operation in operations if operation in WRAPPED]
    assert [line[0] for line in traced] == wrapped, f"{what}: originals run {traced}, expected {wrapped}"
    for line in traced:
        expected = _argv(matrix, vm, line[0], mark.deploy_id, *(hosts or {}).get(line[0], (NODE, "")))
        assert len(line[1:]) == len(expected), f"{what}: {line}"
        for got, want in zip(line[1:], expected, strict=True):
            got = os.path.normpath(got) if got.startswith("/") else got  # oned writes "var//datastores"
            assert (want.fullmatch(got) if isinstance(want, re.Pattern) else got == want), \
                f"{what}: {line[0]} ran with {line[1:]}, the table's argv is {expected}"


def _check_recover_delete(matrix: Matrix, vm: int, mark: Mark, operations: list[str]) -> None:
    """recover --delete: oned's cleanup action runs the table's steps while the VM is already on
    its way to DONE, and oned 7.0.2 wrote none of them into the VM's log (seen in a real run: the
    log had no driver step after the command). What ran is read from the originals' trace instead:
    every wrapped step of the row, with the table's argv."""
    wrapped = [operation for operation in operations if operation in WRAPPED]
    deadline = time.monotonic() + 120
    while len(_trace_since(matrix, mark)) < len(wrapped) and time.monotonic() < deadline:
        time.sleep(0.5)
    traced = _trace_since(matrix, mark)
    assert [line[0] for line in traced] == wrapped, f"recover --delete: originals run {traced}, expected {wrapped}"
    for line in traced:
        expected = _argv(matrix, vm, line[0], mark.deploy_id)
        assert len(line[1:]) == len(expected), f"recover --delete: {line}"
        for got, want in zip(line[1:], expected, strict=True):
            assert (want.fullmatch(got) if isinstance(want, re.Pattern) else got == want), \
                f"recover --delete: {line[0]} ran with {line[1:]}, the table's argv is {expected}"
    logged = _ops_since(matrix, vm, mark)
    assert logged in ([], operations), f"recover --delete: the VM's log has driver steps {logged}"


def _timed(name: str, t0: float) -> None:
    note(f"lifecycle matrix: {name}: {time.monotonic() - t0:.1f} s")


@pytest.fixture(scope="module")
def matrix(real_one: RealOne, suite_installed: Installed) -> Iterator[Matrix]:
    t0 = time.monotonic()
    synced = suite_installed.install_sh("--sync")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    edit = RemotesEdit()
    top = real_one.top / "vmnode-data"
    top.mkdir()
    host_root = _host_root(top)
    trace = top / "originals.trace"
    subprocess.run(["chown", "-R", "oneadmin:oneadmin", str(top)], check=True)
    subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
    host = -1
    try:
        _edit_remotes(real_one, edit)
        # AIFACTORY_RECONCILE=on: the vm/monitor probe reconciles over this host root too (by itself
        # only on the live host), as the machine's libvirt is the node's.
        env = {"AIFACTORY_HOST_ROOT": str(host_root), "AIFACTORY_TEST_STANDIN_DEVICE": STANDIN,
               "AIFACTORY_TEST_TRACE": str(trace), "AIFACTORY_RECONCILE": "on"}
        with qemu_node(real_one, NODE, env, aliases=(socket.gethostname(),)) as node:
            # A domain left by an earlier session would collide with this oned's VM ids (one-0, ...).
            stale = destroy_domains(real_one)
            if stale:
                note(f"lifecycle matrix: destroyed domains an earlier session left running: {', '.join(stale)}")
            host = add_host(real_one, node)
            _timed(f"install.sh --sync, node {NODE} MONITORED", t0)
            client = real_one.client()
            template = client.template.allocate(
                f'NAME="aif-matrix" VCPU="1" VCPU_MAX="2" HOT_RESIZE=[CPU_HOT_ADD_ENABLED="YES"] CPU="0.1" '
                f'MEMORY="64" OS=[ARCH="x86_64"] '
                f'SCHED_REQUIREMENTS="ID=\\"{host}\\""')
            network = client.vn.allocate(f'NAME="aif-matrix-net" VN_MAD="dummy" BRIDGE="{BRIDGE}" '
                                         'AR=[TYPE="ETHER", SIZE="4"]', -1)
            matrix = Matrix(real_one, node, host, host_root, trace, template, network)
            try:
                yield matrix
            finally:
                for vm in matrix.created:
                    if matrix.state(vm) != "DONE":
                        real_one.run("onevm", "recover", "--delete", str(vm), check=False)
                for vm in matrix.created:
                    deadline = time.monotonic() + 60
                    while matrix.state(vm) != "DONE" and time.monotonic() < deadline:
                        time.sleep(1)
                left = destroy_domains(real_one)
                if left:
                    note(f"lifecycle matrix: domains still running after every VM was DONE: {', '.join(left)}")
                client.vn.delete(network)
                client.template.delete(template, False)
                remove_host(real_one, host)
    finally:
        edit.undo()
        subprocess.run(["ip", "link", "del", BRIDGE], check=False)


def _running(matrix: Matrix) -> int:
    """The journey VM, RUNNING (created, or resumed from wherever an earlier row left it)."""
    vm = matrix.vm
    state = matrix.state(vm) if vm >= 0 else "DONE"
    if state in ("DONE", "FAILED") or "FAILURE" in state:
        vm = matrix.create()
    elif state in ("POWEROFF", "SUSPENDED", "STOPPED", "UNDEPLOYED"):
        matrix.onevm("resume", str(vm))
    matrix.wait(vm, "RUNNING")
    assert matrix.place_of(vm).records() == matrix.held(vm), \
        "the running VM's device is not held as the suite holds it"
    return vm


# --- the rows -------------------------------------------------------------------------------------


def test_deploy_claims_and_runs_the_original_with_upstreams_argv(matrix: Matrix) -> None:
    t0 = time.monotonic()
    assert matrix.records() == []
    mark = Mark(0, _mark(matrix, -1).trace)
    vm = matrix.create()
    waited = matrix.wait(vm, "RUNNING")
    note(f"lifecycle matrix: deploy: instantiate -> RUNNING {waited:.1f} s")
    _check_row(matrix, vm, mark, expected_ops("deploy"), "deploy")
    assert matrix.domain_active(vm)
    assert matrix.records() == matrix.held(vm)
    assert (matrix.state_dir / "owners" / STANDIN).read_text().strip() == str(vm)
    _timed("deploy", t0)


@pytest.mark.parametrize("row", ["reboot", "reset"])
def test_reboot_and_reset_keep_the_device(matrix: Matrix, row: str) -> None:
    t0 = time.monotonic()
    vm = _running(matrix)
    mark = _mark(matrix, vm)
    matrix.onevm("reboot", *(["--hard"] if row == "reset" else []), str(vm))
    deadline = time.monotonic() + 120
    while _ops_since(matrix, vm, mark) != expected_ops(row) and time.monotonic() < deadline:
        time.sleep(0.5)
    matrix.wait(vm, "RUNNING")
    _check_row(matrix, vm, mark, expected_ops(row), row)
    assert matrix.records() == matrix.held(vm)
    _timed(row, t0)


def test_nic_attach_and_detach_leave_no_network_state(matrix: Matrix) -> None:
    t0 = time.monotonic()
    vm = _running(matrix)
    mark = _mark(matrix, vm)
    # A USB NIC: the guest (no OS) would never answer a PCI hot-unplug request; QEMU unplugs USB alone.
    nic = matrix.node.top / "nic.tmpl"
    nic.write_text(f'NIC = [ NETWORK_ID = "{matrix.network}", MODEL = "usb-net" ]\n')
    nic.chmod(0o644)
    matrix.onevm("nic-attach", str(vm), "--file", str(nic))
    matrix.wait(vm, "RUNNING")
    _check_row(matrix, vm, mark, expected_ops("NIC attach (running)"), "NIC attach")
    nics = matrix.one.client().vm.info(vm).TEMPLATE["NIC"]
    nic_id = (nics[0] if isinstance(nics, list) else nics)["NIC_ID"]
    assert matrix.records() == matrix.held(vm)
    mark = _mark(matrix, vm)
    matrix.onevm("nic-detach", str(vm), str(nic_id))
    matrix.wait(vm, "RUNNING")
    _check_row(matrix, vm, mark, expected_ops("NIC detach (running)"), "NIC detach")
    assert matrix.records() == matrix.held(vm)
    _timed("NIC attach + detach", t0)


def test_live_resize_keeps_the_device(matrix: Matrix) -> None:
    t0 = time.monotonic()
    vm = _running(matrix)
    mark = _mark(matrix, vm)
    vcpus = int(matrix.one.client().vm.info(vm).TEMPLATE["VCPU"])
    matrix.onevm("resize", str(vm), "--vcpu", str(3 - vcpus))  # 1 -> 2, or back
    _check_row(matrix, vm, mark, expected_ops("resize (live: VCPU, MEMORY)"), "resize")
    matrix.wait(vm, "RUNNING")
    assert int(matrix.one.client().vm.info(vm).TEMPLATE["VCPU"]) == 3 - vcpus
    assert matrix.records() == matrix.held(vm)
    _timed("resize", t0)


def test_resched_with_no_other_host_runs_nothing(matrix: Matrix) -> None:
    vm = _running(matrix)
    mark = _mark(matrix, vm)
    matrix.onevm("resched", str(vm))
    time.sleep(5)  # five scheduler windows (SCHED_MAX_WND_TIME = 1)
    assert matrix.state(vm) == "RUNNING"
    _check_row(matrix, vm, mark, expected_ops("resched"), "resched")
    matrix.onevm("unresched", str(vm))
    assert matrix.records() == matrix.held(vm)


# Each row: the onevm command, the state it reaches, then the resume row that brings the VM back.
EXITS = [
    ("suspend", ["suspend"], "SUSPENDED", "resume from SUSPENDED"),
    ("stop", ["stop"], "STOPPED", "resume from STOPPED"),
    ("poweroff", ["poweroff"], "POWEROFF", "resume from POWEROFF"),
    ("poweroff --hard", ["poweroff", "--hard"], "POWEROFF", "resume from POWEROFF"),
    ("undeploy", ["undeploy"], "UNDEPLOYED", "resume from UNDEPLOYED"),
    ("undeploy --hard", ["undeploy", "--hard"], "UNDEPLOYED", "resume from UNDEPLOYED"),
]


@pytest.mark.parametrize(("row", "command", "reached", "resume"), EXITS, ids=[row for row, *_ in EXITS])
def test_leaving_the_host_gives_back_and_resuming_claims_again(
        matrix: Matrix, row: str, command: list[str], reached: str, resume: str) -> None:
    t0 = time.monotonic()
    vm = _running(matrix)
    mark = _mark(matrix, vm)
    matrix.onevm(command[0], *command[1:], str(vm))
    matrix.wait(vm, reached)
    _check_row(matrix, vm, mark, expected_ops(row), row)
    assert not matrix.domain_active(vm)
    assert matrix.records() == [], f"{row}: the suite still holds {matrix.records()}"
    _timed(row, t0)
    t0 = time.monotonic()
    mark = _mark(matrix, vm)
    matrix.onevm("resume", str(vm))
    matrix.wait(vm, "RUNNING")
    _check_row(matrix, vm, mark, expected_ops(resume), resume)
    assert matrix.domain_active(vm)
    assert matrix.records() == matrix.held(vm)
    _timed(f"{resume} (after {row})", t0)


def test_pci_attach_and_detach_in_poweroff_run_nothing_on_the_host(matrix: Matrix) -> None:
    vm = _running(matrix)
    matrix.onevm("poweroff", "--hard", str(vm))
    matrix.wait(vm, "POWEROFF")
    listed = matrix.one.client().host.info(matrix.host).HOST_SHARE.PCI_DEVICES
    pci = (listed.PCI if listed is not None else None) or []
    free = [device for device in pci if int(device.VMID) < 0]
    if not free:
        pytest.skip(f"{NODE} offers no PCI device to attach (its monitoring reports none)")
    address = free[0].SHORT_ADDRESS
    mark = _mark(matrix, vm)
    matrix.onevm("pci-attach", str(vm), "--pci", address)
    try:
        matrix.wait(vm, "POWEROFF")
        assert _ops_since(matrix, vm, mark) == []
    finally:
        pcis = matrix.one.client().vm.info(vm).TEMPLATE.get("PCI")
        for item in pcis if isinstance(pcis, list) else [pcis] if pcis else []:
            matrix.onevm("pci-detach", str(vm), str(item["PCI_ID"]))
    matrix.wait(vm, "POWEROFF")
    _check_row(matrix, vm, mark, expected_ops("NIC or PCI attach/detach in POWEROFF or UNDEPLOYED"), "PCI")
    assert "PCI" not in matrix.one.client().vm.info(vm).TEMPLATE
    assert matrix.records() == []


def test_recover_recreate_gives_back_then_deploys_again(matrix: Matrix) -> None:
    t0 = time.monotonic()
    vm = _running(matrix)
    mark = _mark(matrix, vm)
    matrix.onevm("recover", "--recreate", str(vm))
    matrix.wait(vm, "RUNNING")
    row = "recover --recreate (delete-recreate), recover --delete"
    _check_row(matrix, vm, mark, expected_ops(row, skip_where="the migration's other host") + expected_ops("deploy"),
               "recover --recreate")
    assert matrix.records() == matrix.held(vm)
    _timed("recover --recreate", t0)


def test_guest_initiated_poweroff_then_terminate_leak_nothing(matrix: Matrix) -> None:
    t0 = time.monotonic()
    vm = _running(matrix)
    mark = _mark(matrix, vm)
    matrix.one.run("virsh", "-c", "qemu:///system", "destroy", f"one-{vm}", timeout=60)
    waited = matrix.wait(vm, "POWEROFF", timeout_s=120)
    note(f"lifecycle matrix: guest-initiated poweroff: POWEROFF found by monitoring after {waited:.1f} s")
    _check_row(matrix, vm, mark, expected_ops("guest-initiated poweroff"), "guest-initiated poweroff")
    bound = RECONCILE_CYCLES * MONITOR_VM_S + 15
    deadline = time.monotonic() + bound
    while matrix.records() and time.monotonic() < deadline:
        time.sleep(1)
    assert matrix.records() == [], (f"guest-initiated poweroff: after {bound} s ({RECONCILE_CYCLES} monitoring "
                                    f"cycles) the suite still holds {matrix.records()} for VM {vm}, whose domain "
                                    "is gone")
    note(f"lifecycle matrix: guest-initiated poweroff: records given back {time.monotonic() - t0:.1f} s after "
         "the domain went")
    mark = _mark(matrix, vm)
    matrix.onevm("terminate", str(vm))
    matrix.wait(vm, "DONE")
    _check_row(matrix, vm, mark, [], "terminate from POWEROFF")
    assert matrix.records() == []
    _timed("guest-initiated poweroff + terminate", t0)


@pytest.mark.parametrize(("row", "command"), [
    ("terminate", ["terminate"]),
    ("terminate --hard", ["terminate", "--hard"]),
    ("recover --recreate (delete-recreate), recover --delete", ["recover", "--delete"]),
], ids=["terminate", "terminate-hard", "recover-delete"])
def test_ending_a_running_vm_gives_everything_back(matrix: Matrix, row: str, command: list[str]) -> None:
    t0 = time.monotonic()
    vm = _running(matrix)
    mark = _mark(matrix, vm)
    matrix.onevm(command[0], *command[1:], str(vm))
    matrix.wait(vm, "DONE")
    operations = expected_ops(row, skip_where="the migration's other host")
    if command[0] == "recover":
        _check_recover_delete(matrix, vm, mark, operations)
        # oned puts the VM in DONE without waiting for its cleanup action: the original cancel and
        # the suite's release after it may still be running.
        deadline = time.monotonic() + 120
        while (matrix.domain_active(vm) or matrix.records()) and time.monotonic() < deadline:
            time.sleep(0.5)
    else:
        _check_row(matrix, vm, mark, operations, " ".join(command))
    assert not matrix.domain_active(vm)
    assert matrix.records() == []
    _timed(" ".join(command), t0)


# --- the rows that move the VM to another host -----------------------------------------------------


@pytest.fixture(scope="module")
def second(matrix: Matrix) -> Iterator[Place]:
    """The second host: this machine again, in a mount namespace of its own (its own libvirtd,
    domains and VM directories), with a host root of its own; the journey VM may move to it."""
    t0 = time.monotonic()
    top = matrix.one.top / "vmnode2-data"
    top.mkdir()
    host_root = _host_root(top)
    subprocess.run(["chown", "-R", "oneadmin:oneadmin", str(top)], check=True)
    env = {**matrix.node.env, "AIFACTORY_HOST_ROOT": str(host_root)}
    # The two hosts see one file system: the system datastore is shared storage for them (its
    # transfer driver then moves nothing, and the live migration copies no VM directory).
    client = matrix.one.client()
    transfer = str(client.datastore.info(0).TM_MAD)
    client.datastore.update(0, 'TM_MAD="shared"', 1)
    with qemu_node(matrix.one, NODE2, env, own_host=True) as node:
        host = add_host(matrix.one, node)
        place = Place(NODE2, node, host, host_root)
        matrix.others[NODE2] = place
        _timed(f"second node {NODE2} MONITORED", t0)
        try:
            yield place
        finally:
            node.ssh_up()  # a failed host-failure row may have left it down
            for vm in matrix.created:  # end them while this host's libvirtd runs (the matrix ends the rest)
                if matrix.state(vm) != "DONE":
                    matrix.one.run("onevm", "recover", "--delete", str(vm), check=False)
            for vm in matrix.created:
                deadline = time.monotonic() + 60
                while matrix.state(vm) != "DONE" and time.monotonic() < deadline:
                    time.sleep(1)
            del matrix.others[NODE2]
            remove_host(matrix.one, host)
            client.datastore.update(0, f'TM_MAD="{transfer}"', 1)


def _watch(matrix: Matrix, vm: int, done: Callable[[str], bool], timeout_s: float = 240) -> list[str]:
    """The VM's states, as seen every 0.3 s (a short one may pass unseen), until ``done(state)``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = matrix.state(vm)
        if not seen or seen[-1] != state:
            seen.append(state)
        if done(state):
            return seen
        if "FAILURE" in state or state in ("FAILED", "DONE"):
            break
        time.sleep(0.3)
    log = "\n".join(matrix.vm_log(vm).splitlines()[-25:])
    raise AssertionError(f"VM {vm}: states {seen}, still waiting after {timeout_s:.0f} s\n{log}")


def _moved(matrix: Matrix, vm: int, target: Place, mark: Mark, operations: int) -> list[str]:
    """Wait until oned has the VM RUNNING on ``target`` after the move's ``operations`` driver steps
    since ``mark`` (oned names the new host as the move begins, while the VM is still RUNNING on the
    old one); the states seen."""
    return _watch(matrix, vm, lambda state: state == "RUNNING" and matrix.host_of(vm) == target.name
                  and len(_ops_since(matrix, vm, mark)) >= operations)


def _on(matrix: Matrix, second: Place, name: str) -> tuple[int, Place, Place]:
    """The journey VM RUNNING on host ``name`` (moved there cold if it is on the other one), that
    host and the other."""
    vm = _running(matrix)
    here, there = (matrix.place, second) if name == NODE else (second, matrix.place)
    if matrix.host_of(vm) != here.name:
        mark = _mark(matrix, vm)
        matrix.onevm("migrate", "--poff-hard", str(vm), str(here.host))
        _moved(matrix, vm, here, mark, len(expected_ops("migrate --poweroff / --poweroff-hard")))
    assert here.records() == matrix.held(vm)
    return vm, here, there


MOVES = [  # the row, onevm migrate's option (7.0.2's CLI spells them --poff, --poff-hard), the host the VM starts on
    ("migrate (cold)", [], NODE),
    ("migrate --poweroff / --poweroff-hard", ["--poff-hard"], NODE2),
    ("migrate --poweroff / --poweroff-hard", ["--poff"], NODE),
]


@pytest.mark.parametrize(("row", "options", "start"), MOVES, ids=["cold", "poweroff-hard", "poweroff"])
def test_moving_to_another_host_gives_back_on_the_old_and_claims_on_the_new(
        matrix: Matrix, second: Place, row: str, options: list[str], start: str) -> None:
    t0 = time.monotonic()
    vm, old, new = _on(matrix, second, start)
    mark = _mark(matrix, vm)
    before = old.vm_directory(matrix.one, vm)
    matrix.onevm("migrate", *options, str(vm), str(new.host))
    operations = expected_ops(row)
    if options == ["--poff-hard"]:  # the row's shutdown is cancel with --poweroff-hard
        operations = ["cancel" if operation == "shutdown" else operation for operation in operations]
    hosts = {action: (old.name, "") for action in ("save", "shutdown", "cancel")}
    hosts |= {action: (new.name, "") for action in ("restore", "deploy")}
    try:
        seen = _moved(matrix, vm, new, mark, len(operations))
    except AssertionError as failed:
        moves = [line for line in (matrix.one.location / "var" / "oned.log").read_text(errors="replace").splitlines()
                 if "mv" in line or "TrM" in line or "TransferManager" in line][-30:]
        after = f"{old.vm_directory(matrix.one, vm)}\n{new.vm_directory(matrix.one, vm)}"
        raise AssertionError(f"{failed}\nbefore: {before}\nafter: {after}\n" + "\n".join(moves)) from None
    note(f"lifecycle matrix: migrate {' '.join(options)} {old.name} -> {new.name}: states seen {seen}")
    _check_row(matrix, vm, mark, operations, f"migrate {' '.join(options)}", hosts)
    for line in _trace_since(matrix, mark):
        note(f"lifecycle matrix: migrate {' '.join(options)}: original ran: {' '.join(line)}")
    assert not old.domain_active(matrix.one, vm) and new.domain_active(matrix.one, vm)
    assert old.records() == [], f"{row}: {old.name}, which the VM left, still holds {old.records()}"
    assert new.records() == matrix.held(vm), f"{row}: {new.name} holds {new.records()}"
    _timed(f"migrate {' '.join(options) or '(cold)'} {old.name} -> {new.name}", t0)


def test_host_failure_keeps_the_claims_and_recovery_finds_the_vm_running(matrix: Matrix, second: Place) -> None:
    t0 = time.monotonic()
    vm, failing, _other = _on(matrix, second, NODE2)
    # The host stops answering: no SSH, its monitoring agent gone; forceupdate makes monitord try it
    # now rather than after MONITORING_INTERVAL_HOST.
    failing.node.ssh_down()
    _stop_pid_file(Path(f"/tmp/one-monitord-{failing.host}.pid"))
    matrix.one.run("onehost", "forceupdate", str(failing.host), timeout=60)
    deadline = time.monotonic() + 120
    while (state := host_state(matrix.one, failing.host))[0] != ERROR:
        assert time.monotonic() < deadline, f"{failing.name} not in ERROR after 120 s: {state}"
        time.sleep(0.5)
    seen = _watch(matrix, vm, lambda state: state == "UNKNOWN", timeout_s=120)
    note(f"lifecycle matrix: host failure: {failing.name} ERROR ({state[1]!r}), VM states seen {seen}")
    _timed("host failure", t0)
    # The row: nothing until the host answers again; the claims stay on the failed host (the domain
    # still runs there).
    assert failing.domain_active(matrix.one, vm)
    assert failing.records() == matrix.held(vm), f"host failure: {failing.name} holds {failing.records()}"

    t0 = time.monotonic()
    mark = _mark(matrix, vm)
    failing.node.ssh_up()
    matrix.one.run("onehost", "forceupdate", str(failing.host), timeout=60)
    seen = _watch(matrix, vm, lambda state: state == "RUNNING", timeout_s=300)
    note(f"lifecycle matrix: host recovery: {failing.name} {host_state(matrix.one, failing.host)[0]} "
         f"(2 = MONITORED), VM states seen {seen}")
    _check_row(matrix, vm, mark, expected_ops("host recovery"), "host recovery")
    # Back without a reboot: the reconciliation keeps a running VM's claims.
    reconciled = matrix.one.run("ssh", failing.name, "/var/tmp/one/aifactory/venv/bin/python3", "-m",
                                "aifactory_core.cli", "repair", "--reconcile", timeout=120)
    note(f"lifecycle matrix: host recovery: 'aifactory repair --reconcile' on {failing.name}: "
         + " | ".join(reconciled.stdout.splitlines()))
    assert f"running: {vm}" in reconciled.stdout.splitlines(), reconciled.stdout
    assert failing.records() == matrix.held(vm), f"host recovery: {failing.name} holds {failing.records()}"
    _timed("host recovery", t0)


LIVE_SOURCE, LIVE_DESTINATION = "migrate --live (source)", "migrate --live (destination)"


def test_live_migration_gives_back_on_the_source_and_claims_nothing_on_the_destination(
        matrix: Matrix, second: Place) -> None:
    t0 = time.monotonic()
    vm, source, destination = _on(matrix, second, NODE2)
    mark = _mark(matrix, vm)
    matrix.onevm("migrate", "--live", str(vm), str(destination.host))
    seen = _moved(matrix, vm, destination, mark, len(expected_ops(LIVE_SOURCE) + expected_ops(LIVE_DESTINATION)))
    note(f"lifecycle matrix: migrate --live {source.name} -> {destination.name}: states seen {seen}")
    # One driver action runs both rows: VNM pre on the destination, migrate and VNM clean on the
    # source, VNM post on the destination (upstream's one_vmm_exec.rb, migrate's steps).
    pre, post = expected_ops(LIVE_DESTINATION)
    _check_row(matrix, vm, mark, [pre, *expected_ops(LIVE_SOURCE), post], "migrate --live",
               {"migrate": (source.name, destination.name)})
    for line in _trace_since(matrix, mark):
        note(f"lifecycle matrix: migrate --live: original ran: {' '.join(line)}")
    assert not source.domain_active(matrix.one, vm) and destination.domain_active(matrix.one, vm)
    assert source.records() == [], f"live migration: the source still holds {source.records()}"
    # The destination row's gap, as the table states it: the domain arrives unclaimed.
    assert destination.records() == [], f"live migration: the destination holds {destination.records()}"
    _timed(f"migrate --live {source.name} -> {destination.name}", t0)


def test_every_row_of_the_table_is_run_here_or_named_as_not_run() -> None:
    covered = {"deploy", "reboot", "reset", "NIC attach (running)", "NIC detach (running)", "resched",
               "resize (live: VCPU, MEMORY)",
               "guest-initiated poweroff", "terminate", "terminate --hard",
               "recover --recreate (delete-recreate), recover --delete",
               "NIC or PCI attach/detach in POWEROFF or UNDEPLOYED",
               *(row for row, *_ in EXITS), *(resume for *_, resume in EXITS),
               *(row for row, *_ in MOVES), LIVE_SOURCE, LIVE_DESTINATION, "host failure", "host recovery"}
    assert covered.isdisjoint(NOT_RUN)
    assert covered | set(NOT_RUN) == {event.event for event in vmm_actions.EVENTS}
