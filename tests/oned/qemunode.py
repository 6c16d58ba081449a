"""A ``qemu``-type OpenNebula host that is this machine, reached over SSH (real-oned tier).

oned's own drivers reach the node as oneadmin at ``<name>`` (a private ``sshd`` on 127.0.0.1 with
oneadmin's key only, named in oneadmin's ssh config); the sshd sets the given environment for every
session (``SetEnv``: the suite's host root, NVML replay, ...), so the probes and driver actions
oned runs there see it. libvirtd answers oneadmin on ``qemu:///system`` (started here with the
recipe's socket settings unless one already does), and upstream's ``qemu-kvm-one`` emulator wrapper
exists. Each node is a context manager: several may run at once, each with its own name and port.

A node made with ``own_host=True`` is a second host on the same machine: its sshd, libvirtd and
virtlogd run in a mount namespace of their own (:func:`own_mounts`) where libvirt's runtime, state,
cache and log directories are empty tmpfs, and its libvirtd has a ``host_uuid`` of its own. Every
command oned runs there over SSH (driver actions, probes) sees that host's libvirt and domains, so a
VM can be migrated between two such hosts, cold or live (QEMU's migration stream goes over the
shared network stack to the machine's hostname). The rest of the file system is the machine's:
the remotes (``/var/tmp/one``: oned copies the same files to every host) and the VM directories
(the hosts share them, as hosts on shared storage do: give the system datastore ``TM_MAD=shared``).
The suite's state directory is per host already: each node's environment names a host root of its
own.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import needs
from realone import RealOne, _stop_pid_file

HOST_REMOTES = Path("/var/tmp/one")  # where oned's drivers copy the remotes on a host
MONITORED, ERROR = 2, 3


@dataclass
class Node:
    name: str
    top: Path
    port: int
    env: dict[str, str]
    enter: tuple[str, ...] = ()
    """The argv prefix that runs a command in the node's mount namespace (empty: the machine's)."""
    sshd: tuple[str, ...] = ()
    server: subprocess.Popen[bytes] | None = None

    def virsh(self, one: RealOne, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``virsh -c qemu:///system ARGS`` as oneadmin on this node."""
        return virsh(one, self.enter, *args, timeout=timeout)

    def ssh_down(self) -> None:
        """Stop the node's sshd: oned's drivers and probes cannot reach it (sessions already open,
        such as a monitoring agent, go on)."""
        if self.server is not None:
            self.server.terminate()
            self.server.wait(timeout=10)
            self.server = None

    def ssh_up(self) -> None:
        """Start the node's sshd again (same port, keys and environment)."""
        if self.server is None:
            self.server = subprocess.Popen(list(self.sshd), stderr=subprocess.DEVNULL)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _mark(name: str) -> str:
    return f"# {name}: aifactory's real-oned tests"


def _add_ssh_block(ssh_config: Path, block: str, user: pwd.struct_passwd) -> None:
    ssh_config.parent.mkdir(mode=0o700, exist_ok=True)
    os.chown(ssh_config.parent, user.pw_uid, user.pw_gid)
    previous = ssh_config.read_text() if ssh_config.exists() else ""
    ssh_config.write_text(block + "\n" + previous)
    os.chown(ssh_config, user.pw_uid, user.pw_gid)


def _remove_ssh_block(ssh_config: Path, name: str) -> None:
    """Take out this node's block (from its mark to the blank line after it), leaving the rest."""
    if not ssh_config.exists():
        return
    lines = ssh_config.read_text().split("\n")
    if _mark(name) not in lines:
        return
    start = lines.index(_mark(name))
    end = lines.index("", start) if "" in lines[start:] else len(lines)
    kept = lines[:start] + lines[end + 1:]
    if any(kept):
        ssh_config.write_text("\n".join(kept))
    else:
        ssh_config.unlink()


LIBVIRT_HOST_DIRS = (Path("/run/libvirt"), Path("/var/lib/libvirt"), Path("/var/cache/libvirt"),
                     Path("/var/log/libvirt"))
"""What one libvirtd keeps per host: sockets and running domains, QEMU's state, caches, logs."""


@contextmanager
def own_mounts() -> Iterator[tuple[str, ...]]:
    """A mount namespace where each of :data:`LIBVIRT_HOST_DIRS` is an empty tmpfs (private
    propagation: nothing mounted there shows outside); the ``nsenter`` argv prefix that runs a
    command in it. The namespace lives while a process in it does: a holder process here, the
    daemons started in it after."""
    unshare = needs.tool("unshare", hint="util-linux")
    nsenter = needs.tool("nsenter", hint="util-linux")
    holder = subprocess.Popen([unshare, "--mount", "--propagation", "private", "--", "sleep", "infinity"])
    try:
        namespace = Path(f"/proc/{holder.pid}/ns/mnt")
        deadline = time.monotonic() + 10
        while os.readlink(namespace) == os.readlink("/proc/self/ns/mnt"):  # until unshare is done
            if time.monotonic() > deadline or holder.poll() is not None:
                raise AssertionError(f"unshare --mount did not make a mount namespace (exit {holder.poll()})")
            time.sleep(0.05)
        enter = (nsenter, f"--mount={namespace}", "--")
        for path in LIBVIRT_HOST_DIRS:
            path.mkdir(parents=True, exist_ok=True)  # the mount point, empty where the machine had none
            subprocess.run([*enter, "mount", "-t", "tmpfs", "-o", "mode=0755", f"aifactory-{path.name}", str(path)],
                           check=True)
        yield enter
    finally:
        holder.kill()
        holder.wait(timeout=10)


@contextmanager
def qemu_node(one: RealOne, name: str, env: dict[str, str], aliases: tuple[str, ...] = (),
              own_host: bool = False) -> Iterator[Node]:
    """The sshd and libvirtd for node ``name``; ``env`` is set for every SSH session on it.
    ``aliases``: other names oneadmin reaches the same sshd by (the frontend's own hostname, which
    the transfer driver's ``mv`` reaches over SSH when a VM directory goes back to the frontend).
    ``own_host``: the node is a host of its own on this machine (see the module's docstring)."""
    with own_mounts() if own_host else _machine_mounts() as enter:
        with _node(one, name, env, aliases, enter) as node:
            yield node


@contextmanager
def _machine_mounts() -> Iterator[tuple[str, ...]]:
    yield ()


@contextmanager
def _node(one: RealOne, name: str, env: dict[str, str], aliases: tuple[str, ...],
          enter: tuple[str, ...]) -> Iterator[Node]:
    sshd = needs.tool("/usr/sbin/sshd", hint="openssh-server")
    needs.tool("ssh-keygen", hint="openssh-client")
    remotes_before = HOST_REMOTES.exists()
    top = one.top / name
    top.mkdir()
    key = top / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (top / "authorized_keys").write_text((top / "id_ed25519.pub").read_text())
    host_key = top / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    port = _free_port()
    config = top / "sshd_config"
    set_env = " ".join(f"{key}={value}" for key, value in env.items())
    config.write_text(f"""ListenAddress 127.0.0.1
Port {port}
HostKey {host_key}
PidFile {top}/sshd.pid
AuthorizedKeysFile {top}/authorized_keys
AllowUsers oneadmin
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
{f"SetEnv {set_env}" if set_env else ""}
Subsystem sftp internal-sftp
""")
    user = pwd.getpwnam("oneadmin")
    if subprocess.run(["passwd", "-S", "oneadmin"], capture_output=True, text=True).stdout.split()[1:2] == ["L"]:
        subprocess.run(["usermod", "-p", "*", "oneadmin"], check=True)  # sshd refuses a locked account
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(top)], check=True)
    for private in (key, host_key):
        private.chmod(0o600)
    for root_only in (host_key, config):  # what root's sshd reads stays root's
        os.chown(root_only, 0, 0)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    node = Node(name, top, port, env, enter, (*enter, sshd, "-D", "-e", "-f", str(config)))
    node.ssh_up()
    ssh_config = Path(user.pw_dir) / ".ssh" / "config"
    names = " ".join((name, *aliases))
    _add_ssh_block(ssh_config, f"{_mark(name)}\nHost {names}\n  HostName 127.0.0.1\n  Port {port}\n"
                               f"  IdentityFile {key}\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
                               "  LogLevel ERROR\n", user)
    daemons: list[Path] = []
    try:
        daemons = libvirt_for_oneadmin(one, top, enter)
        deadline = time.monotonic() + 30
        while True:
            probe = one.run("ssh", name, "env", check=False, timeout=30)
            if probe.returncode == 0 and all(f"{key}={value}" in probe.stdout.splitlines()
                                             for key, value in env.items()):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"ssh {name} as oneadmin: {probe.returncode} {probe.stdout}{probe.stderr}")
            time.sleep(0.5)
        yield node
    finally:
        _remove_ssh_block(ssh_config, name)
        node.ssh_down()
        if daemons:  # QEMU outlives libvirtd: the domains of the libvirtd started here go with it
            destroy_domains(one, enter)
        _stop(daemons)
        if not remotes_before:  # this machine's own remotes, if it had any, stay
            shutil.rmtree(HOST_REMOTES, ignore_errors=True)


def virsh(one: RealOne, enter: tuple[str, ...], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``virsh -c qemu:///system ARGS`` as oneadmin, in the mount namespace ``enter`` leads into."""
    if not enter:
        return one.run("virsh", "-c", "qemu:///system", *args, check=False, timeout=timeout)
    return subprocess.run([*enter, "runuser", "-u", "oneadmin", "--", "virsh", "-c", "qemu:///system", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def libvirt_for_oneadmin(one: RealOne, top: Path, enter: tuple[str, ...] = ()) -> list[Path]:
    """libvirtd answering oneadmin on qemu:///system, as upstream's probes and drivers need (started
    here with the recipe's socket settings unless one already answers); its pid files, to stop it.
    In a namespace of its own (``enter``), the libvirtd started there has a ``host_uuid`` of its own:
    libvirt refuses to migrate a domain to a host with the source's UUID ("the same host")."""
    if not Path("/usr/bin/qemu-kvm-one").exists():  # upstream's emulator wrapper, made by its generator
        subprocess.run([str(one.location / "bin" / "qemu-kvm-one-gen")], check=True, capture_output=True)
    if virsh(one, enter, "version", timeout=30).returncode == 0:
        return []
    for tool in ("libvirtd", "virtlogd"):
        needs.tool(f"/usr/sbin/{tool}", hint="libvirt-daemon-system")
    conf = top / "libvirtd.conf"
    conf.write_text('unix_sock_group = "libvirt"\nunix_sock_rw_perms = "0770"\nunix_sock_ro_perms = "0777"\n'
                    'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
                    + (f'host_uuid = "{uuid.uuid4()}"\n' if enter else ""))
    pids = [top / "virtlogd.pid", top / "libvirtd.pid"]
    subprocess.run([*enter, "/usr/sbin/virtlogd", "-d", "-p", str(pids[0])], check=True)
    subprocess.run([*enter, "/usr/sbin/libvirtd", "-d", "-f", str(conf), "-p", str(pids[1])], check=True)
    deadline = time.monotonic() + 60
    while virsh(one, enter, "version", timeout=30).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError("libvirtd did not answer oneadmin within 60 s")
        time.sleep(1)
    return pids


def destroy_domains(one: RealOne, enter: tuple[str, ...] = ()) -> list[str]:
    """Destroy every OpenNebula domain (``one-<id>``) libvirt runs (in the mount namespace ``enter``
    leads into); their names."""
    listed = virsh(one, enter, "list", "--name")
    names = [name for name in listed.stdout.split() if name.startswith("one-")]
    for name in names:
        virsh(one, enter, "destroy", name)
    return names


def _stop(pid_files: list[Path]) -> None:
    for pid_file in reversed(pid_files):
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def host_state(one: RealOne, host: int) -> tuple[int, str]:
    """The host's state and its ERROR message, if any."""
    info = one.client().host.info(host)
    template = info.TEMPLATE if isinstance(info.TEMPLATE, dict) else {}
    return int(info.STATE), str(template.get("ERROR", ""))


def add_host(one: RealOne, node: Node, timeout_s: float = 420) -> int:
    """Register ``node`` as a qemu host (the remotes are copied to it as oned starts monitoring it)
    and wait until it is MONITORED; its id."""
    host = one.client().host.allocate(node.name, "qemu", "qemu", -1)
    deadline = time.monotonic() + timeout_s
    while True:
        state, error = host_state(one, host)
        if state == MONITORED:
            return int(host)
        if state == ERROR:
            raise AssertionError(f"host {node.name} in ERROR: {error}\n{one.log_tail('monitor.log')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"host {node.name} not MONITORED after {timeout_s:.0f} s (state {state})\n"
                                 + one.log_tail("monitor.log"))
        time.sleep(1)


def remove_host(one: RealOne, host: int) -> None:
    """Delete the host from oned (a host left behind would fail later ``onehost sync`` runs once its
    sshd is gone) and end the monitoring agent oned started on it (its pid file names it)."""
    one.run("onehost", "delete", str(host), check=False, timeout=60)
    _stop_pid_file(Path(f"/tmp/one-monitord-{host}.pid"))


def wait_for(condition: Callable[[], object], what: str, timeout: float,
             detail: Callable[[], str] = lambda: "") -> object:
    """``condition()``'s first true value, polled every second; an AssertionError naming ``what``
    (and ``detail()``) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{detail()}")
        time.sleep(1)


def onehost_show_section(lines: list[str], header: str) -> list[str]:
    """``onehost show``'s section under ``header`` (its table, up to the blank line after it); empty
    when the output has no such section."""
    begin = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    if begin is None:
        return []
    section = [lines[begin]]
    for line in lines[begin + 1:]:
        if not line.strip() and len(section) > 2:
            break
        if line.strip():
            section.append(line)
    return section


def host_xml(one: RealOne, host: int) -> Any:
    """The host's document as ``one.host.info`` returns it (parsed hardened), template vectors and
    oned's PCI share included (pyone's dict view keeps one vector of a kind)."""
    import xmlrpc.client

    from aifactory_core.one.xmlsafe import parse_xml

    ok, answer, *_ = xmlrpc.client.ServerProxy(one.endpoint).one.host.info(f"oneadmin:{one.password}", host, False)
    assert ok, answer
    return parse_xml(answer.encode())


def pci_share(one: RealOne, host: int) -> dict[str, int]:
    """oned's PCI share of the host: ADDRESS -> VMID (-1 free)."""
    return {pci.findtext("ADDRESS") or "": int(pci.findtext("VMID") or "-1")
            for pci in host_xml(one, host).iterfind("HOST_SHARE/PCI_DEVICES/PCI")}
