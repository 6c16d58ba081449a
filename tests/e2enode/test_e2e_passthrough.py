"""End to end: a real oned deploys tenants' VMs with a passed-through device onto the real-kernel
test host booted as an OpenNebula node, with the suite installed the way an operator does it.

The node (``testhost.node``) is the QEMU/TCG test host with sshd and libvirtd, reached by oned's
own drivers over SSH on 127.0.0.1; its e1000e (8086:10d3, ``0000:01:00.0``) stands in for a GPU.
The frontend is ``realone``'s oned with the suite installed by ``install.sh`` (``suite_installed``);
``[frontend] pci_filter`` and ``install.sh --sync`` put the device into the ``qemu`` hosts'
``pci.conf``; ``aifactory host-setup`` runs as root in the node. Tenants come from the shipped
``examples/policy.toml``, adapted to the stand-in device and applied by ``aifactory tenant apply``.
The template asks for the device as an operator pins one, ``PCI = [SHORT_ADDRESS = "01:00.0"]``:
the frontend's admission identifies it from the devices oned's hosts list at that address
(``policy.admission.address_lookup``) and the host gate again from the node's sysfs.

Four deploys cover the sequences (the tests below, in order): a first tenant's VM runs while a
second tenant's VM is refused a host, is powered off hard and terminated; the second tenant's VM
then gets the device, is undeployed, resumed and terminated; a third VM's domain is destroyed in
the node and the VM terminated. The device must be back on its driver, reset, with no journal or
ownership record, after each of them.

One node and one oned serve the module; each phase has a hard time-out that fails with the node's
console tail, and a phase that finds the node hung (a kernel lockup, QEMU gone) is tried once more
on a freshly booted node. Phase timings go to the session's summary (``realone.note``); the VM's
oned log, the node's hostdev XML and the device's driver link are written to
``/var/tmp/aifactory-e2enode-report.txt``.

Runs on the test machine (not inside the test host): marked ``realone`` and ``e2enode``, not
``realkernel`` (tests/testhost/README.md).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import time
import tomllib
import xmlrpc.client
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import needs
import pytest
from realone import REPO, Installed, RealOne, edit_config, note
from testhost import node as testnode
from testhost import runner

pytestmark = [pytest.mark.realone, pytest.mark.e2enode]

DEVICE = testnode.PASSTHROUGH_ADDRESS
SHORT = DEVICE[5:]
VENDOR, DEVICE_ID = testnode.PASSTHROUGH_ID.split(":")
SYSFS = f"/sys/bus/pci/devices/{DEVICE}"
STATE_DIR = "/var/lib/one/aifactory"
ROOT_CLI = "/usr/local/lib/aifactory/venv/bin/aifactory"
REPORT = Path("/var/tmp/aifactory-e2enode-report.txt")
SSH_MARK = "# aifactory end-to-end node"
MONITOR_TIMEOUT_S = 420.0  # the qemu IM MAD's start time-out is 300 s (realone.configure)
DEPLOY_TIMEOUT_S = 300.0
END_TIMEOUT_S = 240.0
HOST_SETUP_TIMEOUT_S = 300.0
PROBE_CYCLES = 6  # how many VM probe periods the suite has to give a device back after the guest stops it
NODE_SYSTEM_PROBES_PERIOD = 600  # upstream's SYSTEM_HOST
NODE_SYNC_STATE_PERIOD = 180  # upstream's SYNC_STATE_VM
# A stopped domain is POWEROFF after 3 missing state reports (probe_db.rb), each a Ruby run in the node.
MISSING_TIMEOUT_S = 300.0

# oned's VM states: (STATE, LCM_STATE)
RUNNING = (3, 3)
POWEROFF = 8
UNDEPLOYED = 9
DONE = 6
FAILED_LCM = {36: "BOOT_FAILURE", 39: "PROLOG_FAILURE", 40: "EPILOG_FAILURE", 16: "UNKNOWN",
              44: "BOOT_UNDEPLOY_FAILURE", 46: "BOOT_STOPPED_FAILURE", 47: "PROLOG_RESUME_FAILURE",
              49: "PROLOG_UNDEPLOY_FAILURE"}


class NodeHung(AssertionError):
    """The node stopped answering in a phase (kernel lockup, QEMU gone): the phase may be retried."""


# -- the tenants: the shipped example policy, adapted to the stand-in device ----------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def adapted_policy(template: int) -> tuple[str, list[str]]:
    """``examples/policy.toml`` with its tenants kept (names, caps, prices) but on this frontend:
    the default cluster, the stand-in device as each tenant's device, no networks, the test's
    template, no users or ids that exist only on the example's OpenNebula. Returns the text and
    the tenants' group names."""
    example = tomllib.loads((REPO / "examples" / "policy.toml").read_text())
    lines = ["# examples/policy.toml adapted to the end-to-end node's stand-in device", "[opennebula]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in example["opennebula"].items()]
    groups = []
    for name, tenant in example["tenant"].items():
        groups.append(tenant["group"])
        lines += ["", f"[tenant.{name}]"]
        kept = {"group": tenant["group"], "vdc": tenant["vdc"], "clusters": [0], "max_gpus": tenant["max_gpus"],
                "networks": [], "templates": [template], "price_per_gpu_hour": tenant["price_per_gpu_hour"]}
        lines += [f"{key} = {_toml_value(value)}" for key, value in kept.items()]
        lines += ["", f"[[tenant.{name}.devices]]", 'name = "e1000e-stand-in"', f'vendor = "{VENDOR}"',
                  f'device = "{DEVICE_ID}"', 'class = "0200"', "clusters = [0]"]
    return "\n".join(lines) + "\n", groups


# -- the session's pieces -------------------------------------------------------------------------


@dataclass
class EndToEnd:
    one: RealOne
    installed: Installed
    top: Path
    oneadmin_key: Path
    node: testnode.Node | None = None
    host: int = -1
    name: str = ""
    template: int = -1
    users: dict[str, tuple[str, str]] = field(default_factory=dict)  # tenant -> (user, password)
    retried: bool = False
    running: int | None = None  # a VM left RUNNING with the device by one phase for the next
    report: list[str] = field(default_factory=list)
    policy_text: str = ""

    # oned ------------------------------------------------------------------------------------

    def xml(self, method: str, *args: Any) -> Any:
        from lxml import etree

        ok, answer, *_ = getattr(xmlrpc.client.ServerProxy(self.one.endpoint), method)(
            f"oneadmin:{self.one.password}", *args)
        assert ok, answer
        return etree.fromstring(answer.encode())

    def vm_state(self, vm: int) -> tuple[int, int]:
        root = self.xml("one.vm.info", vm, False)
        return int(root.findtext("STATE")), int(root.findtext("LCM_STATE"))

    def vm_log(self, vm: int, lines: int = 60) -> str:
        path = self.one.location / "var" / "vms" / str(vm) / "vm.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no {path})"

    # the node --------------------------------------------------------------------------------

    @property
    def n(self) -> testnode.Node:
        assert self.node is not None
        return self.node

    def in_node(self, command: str, timeout: float = 120, check: bool = True, stdin: str | None = None) -> str:
        try:
            return self.n.ssh(command, timeout=timeout, check=check, stdin=stdin).stdout
        except testnode.NodeError as error:
            if self.n.looks_hung():
                raise NodeHung(str(error)) from None
            raise

    def wait(self, what: str, condition: Callable[[], bool], timeout: float, vm: int | None = None,
             every: float = 1.0, explain: Callable[[], str] | None = None) -> float:
        """Poll ``condition`` until true; fail loudly (VM log, node console) after ``timeout``."""
        t0 = time.monotonic()
        while True:
            if vm is not None:
                state, lcm = self.vm_state(vm)
                if state == 3 and lcm in FAILED_LCM:
                    raise AssertionError(f"VM {vm} in {FAILED_LCM[lcm]} while waiting for {what}\n"
                                         f"--- VM log ---\n{self.vm_log(vm)}\n--- node console ---\n"
                                         + self.n.console_tail(40))
            if condition():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                message = (f"timed out after {timeout:.0f} s waiting for {what}"
                           + (f"\n--- VM {vm} log ---\n{self.vm_log(vm)}" if vm is not None else "")
                           + (f"\n{_explained(explain)}" if explain is not None else "")
                           + f"\nnode console log: {self.n.console_log}\n--- node console tail ---\n"
                           + self.n.console_tail())
                if self.n.looks_hung():
                    raise NodeHung(message)
                raise AssertionError(message)
            time.sleep(every)

    def recorded(self, prefix: str) -> bool:
        return any(entry.startswith(f"===== {prefix}") for entry in self.report)

    def record(self, title: str, text: str) -> None:
        self.report.append(f"===== {title} =====\n{text.rstrip()}\n")
        REPORT.write_text("\n".join(self.report))


def _explained(explain: Callable[[], str]) -> str:
    try:
        return explain()
    except Exception as error:  # noqa: BLE001 - the time-out is the failure, this only explains it
        return f"(could not explain: {error})"


def _host_explained(e2e: EndToEnd) -> str:
    values = _host_values(e2e)
    shown = {key: value for key, value in values.items() if key in ("STATE", "ERROR", "PCI") or key.startswith("AIF_")}
    agent = e2e.in_node("ls /var/tmp/one 2>&1 | head; ps -eo pid,etime,args | grep -E 'monitord|probe' | "
                        "grep -v grep | cut -c1-160; ls -l /tmp/one-monitord-* 2>&1", timeout=60, check=False)
    return (f"--- host {e2e.name} ---\n{shown}\n{e2e.one.log_tail('monitor.log', 40)}\n"
            f"--- the node's monitoring agent ---\n{agent}")


def _ssh_config(one: RealOne, name: str, port: int, key: Path, sockets: Path) -> None:
    """oneadmin's ssh config names the node (oned's drivers run ``ssh <host>``). Connections are
    shared: OpenNebula's packaged frontend does it with its ``ssh`` wrapper (``lib/sh/override/ssh``,
    first in oned's PATH there, not in this self-contained install), which adds
    ``ControlMaster=auto`` to every command that sets no ControlMaster itself; here the node's entry
    in the ssh config says it. The master outlives the module's idle gaps (upstream's 70 s needs its
    socket cleaner against a race at expiry) and ends with the node's connection."""
    user = pwd.getpwnam("oneadmin")
    ssh_dir = Path(user.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(ssh_dir, user.pw_uid, user.pw_gid)
    sockets.mkdir(mode=0o700, exist_ok=True)
    os.chown(sockets, user.pw_uid, user.pw_gid)
    config = ssh_dir / "config"
    text = _without_block(config.read_text() if config.exists() else "")
    block = (f"{SSH_MARK}\nHost {name}\n  HostName 127.0.0.1\n  Port {port}\n  IdentityFile {key}\n"
             "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
             "  ConnectTimeout 60\n  ServerAliveInterval 30\n"
             f"  ControlMaster auto\n  ControlPersist 60m\n  ControlPath {sockets}/%r@%h:%p\n")
    config.write_text(block + f"{SSH_MARK} end\n" + text)
    os.chown(config, user.pw_uid, user.pw_gid)
    config.chmod(0o600)


def _drop_ssh_block(config: Path) -> None:
    if config.exists():
        config.write_text(_without_block(config.read_text()))


def _without_block(text: str) -> str:
    return re.sub(rf"{re.escape(SSH_MARK)}\n.*?{re.escape(SSH_MARK)} end\n", "", text, flags=re.DOTALL)


def _host_values(e2e: EndToEnd) -> dict[str, Any]:
    root = e2e.xml("one.host.info", e2e.host, False)
    template = root.find("TEMPLATE")
    values: dict[str, Any] = {child.tag: child.text or "" for child in template if len(child) == 0}
    for vector in template:
        for child in vector:
            values.setdefault(f"{vector.tag}/{child.tag}", child.text or "")
    values["STATE"] = int(root.findtext("STATE"))
    values["PCI"] = [{child.tag: child.text or "" for child in pci}
                     for pci in root.iterfind("HOST_SHARE/PCI_DEVICES/PCI")]
    return values


def start_node(e2e: EndToEnd, attempt: int) -> Future[testnode.Node]:
    """Boot the node in the background (the frontend is set up meanwhile)."""
    pub = (e2e.oneadmin_key.with_suffix(".pub")).read_text()
    return ThreadPoolExecutor(1).submit(testnode.boot, e2e.top / f"node{attempt}", f"e2enode{attempt}",
                                        {"oneadmin": pub})


def bring_up_node(e2e: EndToEnd, attempt: int, booting: Future[testnode.Node]) -> None:
    """Once the node is booted: register it with oned, wait for the suite's attributes and the
    device in its PCI list, run host-setup in it and give it the host's policy configuration."""
    t0 = time.monotonic()
    e2e.node = booting.result()
    name = e2e.node.name
    e2e.name = name
    note(f"e2e: node {name} booted (sshd + libvirtd answering) in {e2e.n.boot_s:.1f} s")
    _ssh_config(e2e.one, name, e2e.n.port, e2e.oneadmin_key, e2e.top / "ssh-socks")
    probe = e2e.one.run("ssh", name, "hostname", check=False, timeout=120)
    assert probe.stdout.strip() == name, f"oneadmin cannot ssh to the node: {probe.stdout}{probe.stderr}"

    t1 = time.monotonic()
    e2e.host = e2e.one.client().host.allocate(name, "qemu", "qemu", -1)
    # The operator's host-setup needs the synced tree, which oned's first monitoring copies to the
    # node before it starts the monitoring agent: it runs while the first probes do.
    setting_up = ThreadPoolExecutor(1).submit(_host_setup, e2e)

    forced = False

    def monitored() -> bool:
        nonlocal forced
        values = _host_values(e2e)
        if values["STATE"] == 3:
            raise AssertionError(f"host {name} in ERROR: {values.get('ERROR', '')}\n"
                                 + e2e.one.log_tail("monitor.log"))
        ready = "AIF_GPU_COUNT" in values and any(pci.get("SHORT_ADDRESS") == SHORT for pci in values["PCI"])
        if values["STATE"] == 2 and not ready and not forced:
            # MONITORED from a first round without them: the next round is NODE_SYSTEM_PROBES_PERIOD away.
            forced = True
            e2e.one.run("onehost", "forceupdate", str(e2e.host), timeout=60)
        return values["STATE"] == 2 and ready

    e2e.wait(f"host {name} MONITORED with AIF_* and {SHORT} in its PCI list", monitored, MONITOR_TIMEOUT_S,
             every=2.0, explain=lambda: _host_explained(e2e))
    values = _host_values(e2e)
    pci = next(pci for pci in values["PCI"] if pci.get("SHORT_ADDRESS") == SHORT)
    assert (pci["VENDOR"], pci["DEVICE"]) == (VENDOR, DEVICE_ID)
    assert values["AIF_GPU_COUNT"] == "0"
    assert values["AIF_PROBE/STATUS"] == "OK", values
    note(f"e2e: onehost create -> MONITORED with AIF_* and {SHORT} ({VENDOR}:{DEVICE_ID}) in the PCI list: "
         f"{time.monotonic() - t1:.1f} s")
    e2e.record("host template: AIF_* and PCI", "\n".join(
        [f"{key} = {value}" for key, value in sorted(values.items()) if key.startswith("AIF_")]
        + [f"PCI {pci}"]))
    # oned pins the VM's vCPUs only on a host whose PIN_POLICY says so.
    e2e.one.client().host.update(e2e.host, 'PIN_POLICY = "PINNED"', 1)
    setup, took = setting_up.result(timeout=HOST_SETUP_TIMEOUT_S)
    note(f"e2e: aifactory host-setup as root in the node (once the remotes were there, beside the first "
         f"probes): {took:.1f} s, done {time.monotonic() - t1:.1f} s after onehost create")
    e2e.record("host-setup in the node", setup)
    note(f"e2e: node ready for VMs {time.monotonic() - t0 + e2e.n.boot_s:.1f} s after its boot started")


def _host_setup(e2e: EndToEnd) -> tuple[str, float]:
    """Once oned's first monitoring has copied the remotes and started its agent in the node:
    ``aifactory host-setup`` as root from the synced tree, and the host's policy configuration.
    Returns host-setup's output and the seconds it all took."""
    e2e.wait("oned's monitoring agent running in the node (the remotes copied)",
             lambda: e2e.in_node("pgrep -u oneadmin -f monitord-client >/dev/null && echo up || true",
                                 timeout=60).strip() == "up",
             MONITOR_TIMEOUT_S, every=3.0)
    t0 = time.monotonic()
    setup = e2e.in_node("/var/tmp/one/aifactory/venv/bin/aifactory host-setup", timeout=HOST_SETUP_TIMEOUT_S)
    e2e.n.ssh("install -d -m 0755 /etc/one && cat > /etc/one/aifactory-policy.toml && chmod 0644 "
              "/etc/one/aifactory-policy.toml", stdin=e2e.policy_text, timeout=60)
    e2e.n.ssh("cat > /etc/one/aifactory.conf && chgrp oneadmin /etc/one/aifactory.conf && chmod 0640 "
              "/etc/one/aifactory.conf", stdin='[plugin.policy]\nfile = "/etc/one/aifactory-policy.toml"\n'
              "cluster_id = 0\n", timeout=60)
    return setup, time.monotonic() - t0


def drop_node(e2e: EndToEnd) -> None:
    """Take the node out of oned and stop it (its VMs are deleted first)."""
    client = e2e.one.client()
    if e2e.host >= 0:
        for vm in client.vmpool.info(-2, -1, -1, -1).VM:
            client.vm.recover(vm.ID, 3)  # delete
        try:
            client.host.delete(e2e.host)
        except Exception:  # noqa: BLE001 - a host with VMs still leaving is removed when they are gone
            pass
        e2e.host = -1
    e2e.running = None
    if e2e.node is not None:
        e2e.node.stop()


@pytest.fixture(scope="module")
def e2e(real_one: RealOne, suite_installed: Installed) -> Iterator[EndToEnd]:
    for tool in ("ssh", "ssh-keygen", "/usr/sbin/sshd", "/usr/sbin/libvirtd", "/usr/sbin/virtlogd"):
        needs.tool(tool, hint="openssh-server, libvirt-daemon-system")
    missing = runner.missing_prerequisites(testnode.NODE_GUEST)
    if missing:
        needs.unavailable("test host unavailable: " + "; ".join(missing))
    if not Path("/usr/bin/qemu-kvm-one").exists():  # upstream's emulator link; the node's /usr is this one's
        subprocess.run([str(real_one.location / "bin" / "qemu-kvm-one-gen")], check=True, capture_output=True)
    t0 = time.monotonic()
    top = real_one.top / "e2e"
    top.mkdir()
    top.chmod(0o755)
    key = top / "oneadmin_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    user = pwd.getpwnam("oneadmin")
    for path in (key, key.with_suffix(".pub")):
        os.chown(path, user.pw_uid, user.pw_gid)
    if subprocess.run(["passwd", "-S", "oneadmin"], capture_output=True, text=True).stdout.split()[1:2] == ["L"]:
        subprocess.run(["usermod", "-p", "*", "oneadmin"], check=True)  # sshd refuses a locked account
    e2e = EndToEnd(real_one, suite_installed, top, key)
    REPORT.write_text("")
    client = real_one.client()
    etc = real_one.location / "etc"
    # What the module changes on the frontend, restored at its end whatever happens.
    kept = {path: path.read_text() for path in (etc / "aifactory.conf", etc / "monitord.conf",
                                                etc / "schedulers" / "rank.conf")}
    before = _pool_ids(e2e)
    ssh_config = Path(user.pw_dir) / ".ssh" / "config"
    system_tm = client.datastore.info(0).TM_MAD
    booting: Future[testnode.Node] | None = None
    try:
        # The node runs its host-system probes (Ruby and the suite's, under TCG: tens of seconds of
        # its CPU a round) and its full VM state report at upstream's periods, not at the test
        # frontend's, which would keep the node's CPUs busy with monitoring throughout. The
        # scheduler logs why it discards a host (DDEBUG). oned reads monitord.conf at start: it is
        # restarted before the node boots (a boot beside oned's start can time its drivers' start out).
        monitord = etc / "monitord.conf"
        edit_config(monitord, r"^(\s*SYSTEM_HOST\s*=\s*)\d+", rf"\g<1>{NODE_SYSTEM_PROBES_PERIOD}")
        edit_config(monitord, r"^(\s*SYNC_STATE_VM\s*=\s*)\d+", rf"\g<1>{NODE_SYNC_STATE_PERIOD}")
        edit_config(etc / "schedulers" / "rank.conf", r"^(\s*DEBUG_LEVEL\s*=\s*)\d+", r"\g<1>4")
        note(f"e2e: oned restarted with SYSTEM_HOST = {NODE_SYSTEM_PROBES_PERIOD}, SYNC_STATE_VM = "
             f"{NODE_SYNC_STATE_PERIOD}: API ready in {real_one.restart():.1f} s")
        booting = start_node(e2e, 1)
        # The operator's frontend configuration: the stand-in device into the hosts' PCI lists, and the
        # tenant policy the admission hook reads.
        e2e.template = client.template.allocate(
            f'NAME="e2e-nic" VCPU="1" CPU="1" MEMORY="64" '
            f'PCI=[ SHORT_ADDRESS="{SHORT}" ] '
            'TOPOLOGY=[ PIN_POLICY="CORE", SOCKETS="1", CORES="1", THREADS="1" ]')
        policy_text, groups = adapted_policy(e2e.template)
        e2e.policy_text = policy_text
        policy = top / "policy.toml"
        policy.write_text(policy_text)
        os.chown(policy, user.pw_uid, user.pw_gid)
        apply = subprocess.run([str(suite_installed.prefix / "venv" / "bin" / "aifactory"), "tenant", "apply",
                                str(policy), "--endpoint", real_one.endpoint, "--session",
                                f"oneadmin:{real_one.password}"],
                               capture_output=True, text=True, timeout=180, check=False)
        assert apply.returncode == 0, apply.stdout + apply.stderr
        pool = {group.NAME: group.ID for group in client.grouppool.info().GROUP}
        for index, group in enumerate(groups):
            name, password = f"e2e-user{index}", f"pw-{index}-{os.getpid()}"
            uid = client.user.allocate(name, password, "core", [])
            client.user.chgrp(uid, pool[group])
            e2e.users[group] = (name, password)
        config = etc / "aifactory.conf"
        unpoliced = re.sub(r"^\[plugin\.policy\]\n(?:(?!\[).*\n?)*", "", kept[config], flags=re.MULTILINE)
        config.write_text(unpoliced + f'\n[frontend]\npci_filter = ["{VENDOR}:{DEVICE_ID}"]\n\n'
                          f'[plugin.policy]\nfile = "{policy}"\n')
        # oned's default system datastore moves a VM's directory back to the frontend over SSH on
        # undeploy (TM local), which this frontend does not serve; the node keeps it instead, as with
        # a system datastore shared between frontend and hosts (TM shared).
        client.datastore.update(0, 'TM_MAD = "shared"', 1)
        synced = suite_installed.install_sh("--sync", "--no-venv")
        assert synced.returncode == 0, synced.stdout + synced.stderr
        qemu_pci = (real_one.location / "var" / "remotes" / "etc" / "im" / "qemu-probes.d" / "pci.conf").read_text()
        assert f"- '{VENDOR}:{DEVICE_ID}'" in qemu_pci
        note(f"e2e: frontend set up (template, tenants from examples/policy.toml, install.sh --sync with "
             f"[frontend] pci_filter): {time.monotonic() - t0:.1f} s")
        bring_up_node(e2e, 1, booting)
        yield e2e
    finally:
        problems: list[str] = []

        def undo(what: str, step: Callable[[], object]) -> None:
            try:
                step()
            except Exception as error:  # noqa: BLE001 - every other step is still undone
                problems.append(f"{what}: {error}")

        if e2e.node is None and booting is not None:  # the frontend's setup failed: stop the node all the same
            undo("the node's boot", lambda: setattr(e2e, "node", booting.result()))
        undo("the node and its host", lambda: drop_node(e2e))
        for path, text in kept.items():
            undo(f"restore {path}", lambda path=path, text=text: path.write_text(text))
        undo("oneadmin's ssh config", lambda: _drop_ssh_block(ssh_config))
        undo("system datastore TM", lambda: real_one.client().datastore.update(0, f'TM_MAD = "{system_tm}"', 1))
        undo("users, template, tenants", lambda: _remove_created(e2e, before))
        # The remotes back to the frontend configuration (its PCI filter); oned back to its periods.
        undo("install.sh", lambda: _checked(suite_installed.install_sh("--no-venv")))
        undo("oned restart", real_one.restart)
        note(f"e2e: module total {time.monotonic() - t0:.1f} s; report in {REPORT}")
        assert not problems, "the end-to-end module could not undo everything: " + "; ".join(problems)


POOLS = {"user": ("one.userpool.info", (), "USER"), "template": ("one.templatepool.info", (-2, -1, -1), "VMTEMPLATE"),
         "vdc": ("one.vdcpool.info", (), "VDC"), "group": ("one.grouppool.info", (), "GROUP"),
         "acl": ("one.acl.info", (), "ACL")}
"""What the module creates in oned (template, users, the tenants' groups, VDCs and ACL rules), in the
order it is removed."""


def _pool_ids(e2e: EndToEnd) -> dict[str, set[int]]:
    return {kind: {int(item.findtext("ID")) for item in e2e.xml(method, *args).iterfind(tag)}
            for kind, (method, args, tag) in POOLS.items()}


def _remove_created(e2e: EndToEnd, before: dict[str, set[int]]) -> None:
    """Delete what the module added to oned's pools, so the modules after it find the frontend as
    the session left it."""
    failed = []
    for kind, new in ((kind, ids - before[kind]) for kind, ids in _pool_ids(e2e).items()):
        method = "one.acl.delrule" if kind == "acl" else f"one.{kind}.delete"
        for oid in sorted(new):
            ok, answer, *_ = getattr(xmlrpc.client.ServerProxy(e2e.one.endpoint), method)(
                f"oneadmin:{e2e.one.password}", oid)
            if not ok and kind != "acl":  # a group's own ACL rules go with it
                failed.append(f"{method} {oid}: {answer}")
    assert not failed, "; ".join(failed)


def _checked(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr


def _end_vms(e2e: EndToEnd) -> None:
    """End every VM a failed phase left (a VM holding the device would starve the next phases)."""
    client = e2e.one.client()
    for vm in client.vmpool.info(-2, -1, -1, -1).VM:
        try:
            client.vm.action("terminate-hard", vm.ID)
        except Exception:  # noqa: BLE001 - a VM in a state terminate refuses is deleted instead
            client.vm.recover(vm.ID, 3)
    deadline = time.monotonic() + END_TIMEOUT_S
    while client.vmpool.info(-2, -1, -1, -1).VM and time.monotonic() < deadline:
        time.sleep(2)


def attempt(e2e: EndToEnd, phase: str, run: Callable[[], None]) -> None:
    """Run one phase; on a hung node, once per module, boot a fresh node and run the phase again.
    Whatever fails, the phase's VMs are ended before the next phase."""
    try:
        _attempt(e2e, phase, run)
    except BaseException:
        _end_vms(e2e)
        raise


def _attempt(e2e: EndToEnd, phase: str, run: Callable[[], None]) -> None:
    t0 = time.monotonic()
    try:
        run()
    except NodeHung as hung:
        if e2e.retried:
            raise
        e2e.retried = True
        note(f"e2e: {phase}: the node hung after {time.monotonic() - t0:.0f} s; console kept at "
             f"{e2e.n.console_log}; retrying on a fresh node\n{str(hung)[-3000:]}")
        drop_node(e2e)
        bring_up_node(e2e, 2, start_node(e2e, 2))
        t0 = time.monotonic()
        run()
    note(f"e2e: {phase}: {time.monotonic() - t0:.1f} s")


# -- what the node shows --------------------------------------------------------------------------


SNAPSHOT = f"""set -u
echo "driver $(readlink {SYSFS}/driver || echo none)"
for d in {SYSFS}/iommu_group/devices/*; do echo "group $(basename $d) $(basename "$(readlink $d/driver)")"; done
echo "owner $(cat {STATE_DIR}/owners/{DEVICE} 2>/dev/null || echo none)"
RESETS={STATE_DIR}/resets/{DEVICE}
echo "resets $(cat $RESETS 2>/dev/null | wc -l) $(tail -n 1 $RESETS 2>/dev/null)"
echo "domains $(virsh -c qemu:///system list --all --name | tr '\\n' ' ')"
echo "journal $(cat {STATE_DIR}/vms/$1.json 2>/dev/null | tr -d '\\n' || true)"
"""


@dataclass(frozen=True)
class Snapshot:
    """What the node shows about the device and VM ``vm``, from one ssh call."""

    driver: str
    group: dict[str, str]
    owner: str
    resets: int
    last_reset: str
    domains: list[str]
    journal: dict[str, Any]

    @property
    def given_back(self) -> bool:
        return (self.driver.endswith("/e1000e") and set(self.group.values()) == {"e1000e"}
                and self.owner == "none" and not self.journal)


def snapshot(e2e: EndToEnd, vm: int) -> Snapshot:
    out = e2e.in_node(f"bash -s {vm}", stdin=SNAPSHOT)
    fields: dict[str, str] = {}
    group: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        if key == "group":
            address, _, driver = value.partition(" ")
            group[address] = driver
        else:
            fields[key] = value.strip()
    count, _, last = fields.get("resets", "0").partition(" ")
    journal = json.loads(fields["journal"]) if fields.get("journal") else {}
    return Snapshot(fields.get("driver", ""), group, fields.get("owner", ""), int(count or 0), last.strip(),
                    fields.get("domains", "").split(), journal)


def hostdevs(dumpxml: str) -> list[Any]:
    from lxml import etree

    return etree.fromstring(dumpxml.encode()).findall("devices/hostdev")


def vcpu_pins(dumpxml: str) -> dict[int, set[int]]:
    from lxml import etree

    from aifactory_core.cpulist import parse_cpulist

    root = etree.fromstring(dumpxml.encode())
    return {int(pin.get("vcpu")): set(parse_cpulist(pin.get("cpuset"), "cpuset"))
            for pin in root.iterfind("cputune/vcpupin")}


def check_running(e2e: EndToEnd, vm: int, label: str) -> Snapshot:
    """Step 3: the device and its group on vfio-pci through the suite's journal, the hostdev
    managed='no', the domain running, the vCPUs pinned as ``aifactory plan`` says."""
    domain = f"one-{vm}"
    vm_dir = f"{e2e.one.location}/var/datastores/0/{vm}"
    # oned says RUNNING once the driver's deploy returned; libvirt may still show the domain
    # paused for a moment under TCG (seen once): wait for it, bounded.
    states: list[str] = []

    def domain_running() -> bool:
        states.append(e2e.in_node(f"virsh -c qemu:///system domstate {domain}", check=False).strip())
        return states[-1] == "running"

    e2e.wait(f"domain {domain} running in the node", domain_running, 120, vm, every=2.0,
             explain=lambda: f"domain states seen: {states}")
    out = e2e.in_node(f"virsh -c qemu:///system domstate {domain}; echo '<<>>'; "
                      f"virsh -c qemu:///system dumpxml {domain}; echo '<<>>'; "
                      f"{ROOT_CLI} plan --vm {vm_dir}/vm.xml --deployment {vm_dir}/deployment.0 --json")
    domstate, dumpxml, plan_json = out.split("<<>>\n")
    assert domstate.strip() == "running", domstate
    devs = hostdevs(dumpxml)
    assert len(devs) == 1, dumpxml
    address = devs[0].find("source/address")
    assert (devs[0].get("managed"), address.get("bus"), address.get("slot")) == ("no", "0x01", "0x00"), dumpxml
    state = snapshot(e2e, vm)
    assert state.driver.endswith("/vfio-pci") and set(state.group.values()) == {"vfio-pci"}, state
    assert state.owner == str(vm), state
    assert state.journal.get("phase") == "prepared", state
    assert any(step["kind"] == "pci_driver" and step["target"] == DEVICE and step["value"] == "vfio-pci"
               and step["undo_value"] == "e1000e" for step in state.journal["steps"]), state.journal
    plan = json.loads(plan_json)
    from aifactory_core.cpulist import parse_cpulist

    planned = {vcpu: set(parse_cpulist(cpus, "pcpus")) for cell in plan["placement"]["cells"]
               for vcpu, cpus in zip(cell["vcpus"], cell["pcpus"], strict=True)}
    pins = vcpu_pins(dumpxml)
    assert pins and pins == planned, (pins, plan["placement"])
    if not e2e.recorded("while running"):
        hostdev_xml = dumpxml[dumpxml.find("<hostdev"):dumpxml.find("</hostdev>") + len("</hostdev>")]
        cputune = dumpxml[dumpxml.find("<cputune>"):dumpxml.find("</cputune>") + len("</cputune>")]
        e2e.record(f"while running ({label}, VM {vm}): virsh dumpxml {domain} hostdev and cputune",
                   f"{hostdev_xml}\n{cputune}")
        e2e.record(f"while running ({label}, VM {vm}): readlink {SYSFS}/driver", state.driver)
        e2e.record(f"while running ({label}, VM {vm}): its IOMMU group", str(state.group))
        e2e.record(f"while running ({label}, VM {vm}): journal {STATE_DIR}/vms/{vm}.json",
                   json.dumps(state.journal, indent=1))
        e2e.record(f"while running ({label}, VM {vm}): aifactory plan placement",
                   json.dumps(plan["placement"], indent=1))
    return state


def check_given_back(e2e: EndToEnd, vm: int, label: str, before: Snapshot, timeout: float = 90,
                     reset_again: bool = True) -> Snapshot:
    """Step 4: the device back on e1000e, no journal or ownership record of the VM left, no
    domain; reset once more since ``before`` (the suite's reset record), or, where it was given
    back already (``reset_again=False``: a terminate from POWEROFF), not touched since."""
    seen: list[Snapshot] = []

    def back() -> bool:
        seen.append(snapshot(e2e, vm))
        return seen[-1].given_back

    e2e.wait(f"{DEVICE} back on e1000e with no journal or owner of VM {vm} ({label})", back, timeout,
             explain=lambda: str(seen[-1] if seen else "no snapshot"))
    state = seen[-1]
    assert state.domains == [], state
    if reset_again:
        assert state.resets > before.resets and state.last_reset.split()[1:2] == ["OK"], (before, state)
    else:
        assert (state.resets, state.last_reset) == (before.resets, before.last_reset), (before, state)
    if not e2e.recorded("after end"):
        e2e.record(f"after end ({label}, VM {vm}): readlink {SYSFS}/driver", state.driver)
        e2e.record(f"after end ({label}, VM {vm}): IOMMU group, owner, journal, last reset record",
                   f"group {state.group}\nowner {state.owner}\njournal {state.journal or 'none'}\n"
                   f"reset record {state.resets}: {state.last_reset}\ndomains: {state.domains or 'none'}")
        e2e.record(f"after end ({label}, VM {vm}): the VM's oned log ({e2e.one.location}/var/vms/{vm}/vm.log)",
                   e2e.vm_log(vm, 200))
    return state


REFUSED = "Host {host} discarded for VM {vm}. Unavailable PCI device."
"""The rank scheduler's reason at DDEBUG (``HostXML::test_capacity``): CPU, memory and NUMA fit, the
PCI device does not (its SCHED_MESSAGE, "Not enough capacity", names no reason)."""


def scheduler_log(e2e: EndToEnd) -> str:
    """The last scheduling round's log: the scheduler writes ``rank_sched.log`` anew each round."""
    try:
        return (e2e.one.location / "var" / "rank_sched.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_refused(e2e: EndToEnd, vm: int, holder: int, previous: str, seen: set[tuple[int, int]]) -> str:
    """Wait for a scheduling round after ``previous`` (the log then) that refuses ``vm`` the node
    for want of its PCI device; ``vm`` must never become ACTIVE meanwhile. Returns that round's log."""
    line = REFUSED.format(host=e2e.host, vm=vm)
    rounds: list[str] = []

    def refused() -> bool:
        info = e2e.xml("one.vm.info", vm, False)
        seen.add((int(info.findtext("STATE")), int(info.findtext("LCM_STATE"))))
        assert all(state != 3 for state, _ in seen), \
            f"VM {vm} became ACTIVE while VM {holder} holds {DEVICE}: {sorted(seen)}"
        text = scheduler_log(e2e)
        if text != previous and (not rounds or rounds[-1] != text):
            rounds.append(text)
        return bool(rounds) and line in rounds[-1]

    e2e.wait(f"the scheduler to refuse VM {vm} the node for want of {SHORT}", refused, 180, every=2.0,
             explain=lambda: e2e.one.log_tail("rank_sched.log", 30))
    return rounds[-1]


def instantiate(e2e: EndToEnd, tenant: str, name: str) -> int:
    user, password = e2e.users[tenant]
    vm: int = e2e.one.client(f"{user}:{password}").template.instantiate(e2e.template, name, False, "", False)
    return vm


def deploy(e2e: EndToEnd, tenant: str, name: str) -> int:
    vm = instantiate(e2e, tenant, name)
    e2e.wait(f"VM {vm} RUNNING", lambda: e2e.vm_state(vm) == RUNNING, DEPLOY_TIMEOUT_S, vm)
    return vm


def action(e2e: EndToEnd, vm: int, verb: str) -> None:
    e2e.one.client().vm.action(verb, vm)


def wait_state(e2e: EndToEnd, vm: int, state: int, what: str, timeout: float = END_TIMEOUT_S) -> None:
    e2e.wait(f"VM {vm} {what}", lambda: e2e.vm_state(vm)[0] == state, timeout, vm)


# -- the tests (in order: the first leaves its second VM running for the second) -----------------


def test_second_tenant_waits_while_held_and_poweroff_hard_then_terminate_gives_the_device_back(
        e2e: EndToEnd) -> None:
    first_tenant, second_tenant = list(e2e.users)

    def run() -> None:
        t0 = time.monotonic()
        vm = deploy(e2e, first_tenant, "e2e-first")
        note(f"e2e: instantiate as {e2e.users[first_tenant][0]} ({first_tenant}) -> RUNNING: "
             f"{time.monotonic() - t0:.1f} s")
        held = check_running(e2e, vm, "first tenant")
        # Step 5: the other tenant's VM for the same device waits, never given while VM A holds it
        # (running, then powered off: oned keeps a powered-off VM's devices reserved).
        t1 = time.monotonic()
        other = instantiate(e2e, second_tenant, "e2e-second")
        seen: set[tuple[int, int]] = set()
        wait_refused(e2e, other, vm, "", seen)
        assert snapshot(e2e, vm).owner == str(vm)
        info = e2e.xml("one.vm.info", other, False)
        e2e.record(f"second tenant's VM {other} ({second_tenant}) while VM {vm} holds {SHORT}",
                   f"states seen (STATE, LCM_STATE): {sorted(seen)}\n"
                   f"AIFACTORY_ADMISSION = {info.findtext('USER_TEMPLATE/AIFACTORY_ADMISSION')}\n"
                   f"SCHED_MESSAGE = {info.findtext('USER_TEMPLATE/SCHED_MESSAGE')}\n"
                   f"rank_sched.log: {REFUSED.format(host=e2e.host, vm=other)}")
        note(f"e2e: {second_tenant}'s VM {other} refused a host while VM {vm} runs with the device "
             f"({time.monotonic() - t1:.1f} s, states {sorted(seen)})")
        t2 = time.monotonic()
        action(e2e, vm, "poweroff-hard")
        wait_state(e2e, vm, POWEROFF, "POWEROFF")
        back = check_given_back(e2e, vm, "poweroff --hard", held)
        # oned keeps a powered-off VM's devices reserved: B, made to be scheduled again now (a
        # release places a VM at once; otherwise only every SCHED_RETRY_TIME), is refused again.
        before_release = scheduler_log(e2e)
        action(e2e, other, "hold")
        action(e2e, other, "release")
        wait_refused(e2e, other, vm, before_release, seen)
        note(f"e2e: poweroff --hard -> POWEROFF, device back on e1000e, {second_tenant}'s VM refused again: "
             f"{time.monotonic() - t2:.1f} s")
        # B is held while A's terminate is checked (else the scheduler could start B meanwhile),
        # then released: the second tenant gets the device once nobody holds it.
        action(e2e, other, "hold")
        t3 = time.monotonic()
        action(e2e, vm, "terminate-hard")
        wait_state(e2e, vm, DONE, "DONE after poweroff")
        check_given_back(e2e, vm, "poweroff --hard + terminate", back, reset_again=False)
        note(f"e2e: terminate from POWEROFF -> DONE, device still back: {time.monotonic() - t3:.1f} s")
        t4 = time.monotonic()
        action(e2e, other, "release")
        e2e.wait(f"VM {other} RUNNING once the device is free", lambda: e2e.vm_state(other) == RUNNING,
                 DEPLOY_TIMEOUT_S, other)
        check_running(e2e, other, "second tenant, once free")
        e2e.running = other
        note(f"e2e: {second_tenant}'s VM {other} released -> RUNNING with the device: {time.monotonic() - t4:.1f} s")

    attempt(e2e, "first tenant's VM, second tenant waits, poweroff --hard, terminate, second tenant runs", run)


def test_undeploy_resume_terminate_gives_the_device_back(e2e: EndToEnd) -> None:
    def run() -> None:
        vm, e2e.running = e2e.running, None
        if vm is None or e2e.vm_state(vm) != RUNNING:  # the previous phase failed or the node was replaced
            _end_vms(e2e)
            vm = deploy(e2e, list(e2e.users)[1], "e2e-undeploy")
        held = check_running(e2e, vm, "undeploy")
        t0 = time.monotonic()
        action(e2e, vm, "undeploy-hard")
        wait_state(e2e, vm, UNDEPLOYED, "UNDEPLOYED")
        check_given_back(e2e, vm, "undeploy --hard", held)
        note(f"e2e: undeploy --hard -> UNDEPLOYED, device back: {time.monotonic() - t0:.1f} s")
        t1 = time.monotonic()
        action(e2e, vm, "resume")
        e2e.wait(f"VM {vm} RUNNING again", lambda: e2e.vm_state(vm) == RUNNING, DEPLOY_TIMEOUT_S, vm)
        held = check_running(e2e, vm, "resume")
        note(f"e2e: resume -> RUNNING with the device: {time.monotonic() - t1:.1f} s")
        t2 = time.monotonic()
        action(e2e, vm, "terminate-hard")
        wait_state(e2e, vm, DONE, "DONE after resume")
        check_given_back(e2e, vm, "undeploy + resume + terminate", held)
        note(f"e2e: terminate from RUNNING -> DONE, device back: {time.monotonic() - t2:.1f} s")

    attempt(e2e, "undeploy --hard, resume, terminate", run)


def test_a_domain_stopped_in_the_node_gives_the_device_back(e2e: EndToEnd) -> None:
    """The guest ends without oned asking (here ``virsh destroy`` in the node, as a guest's own
    poweroff would): oned sees POWEROFF from its monitoring, the device must come back within a
    few probe cycles and stay back through ``terminate``."""
    def run() -> None:
        if e2e.running is not None:  # handed over by the first phase, never taken by the second
            e2e.running = None
            _end_vms(e2e)
        vm = deploy(e2e, list(e2e.users)[0], "e2e-guest-off")
        held = check_running(e2e, vm, "stopped in the node")
        t0 = time.monotonic()
        e2e.in_node(f"virsh -c qemu:///system destroy one-{vm}")
        wait_state(e2e, vm, POWEROFF, "POWEROFF seen by oned's monitoring", MISSING_TIMEOUT_S)
        period = _vm_probe_period(e2e)
        back = check_given_back(e2e, vm, "domain stopped in the node", held, timeout=PROBE_CYCLES * period)
        note(f"e2e: domain destroyed in the node -> POWEROFF, device back: {time.monotonic() - t0:.1f} s")
        t1 = time.monotonic()
        action(e2e, vm, "terminate-hard")
        wait_state(e2e, vm, DONE, "DONE after the guest's poweroff")
        check_given_back(e2e, vm, "domain stopped in the node + terminate", back, reset_again=False)
        note(f"e2e: terminate from POWEROFF -> DONE, device still back: {time.monotonic() - t1:.1f} s")

    attempt(e2e, "deploy, domain stopped in the node, terminate", run)


def _vm_probe_period(e2e: EndToEnd) -> float:
    """The period of the ``vm/monitor`` probe, which starts the suite's reconciliation when a VM
    with records has no domain (``aifactory_core.probes.reconcile_trigger``)."""
    text = (e2e.one.location / "etc" / "monitord.conf").read_text()
    found = re.findall(r"^\s*MONITOR_VM\s*=\s*(\d+)", text, re.MULTILINE)
    return float(found[0]) if found else 30.0
