"""The test host booted as an OpenNebula node: sshd and libvirtd in it, reached over SSH on 127.0.0.1.

Unlike :func:`testhost.runner.run` (boot, run one job, power off), :func:`boot` returns once the
node answers and keeps it running until :meth:`Node.stop` (a stop file in the node's share).
The node sees this machine's ``/`` read-only, as the test host does (users, oneadmin, ruby,
libvirt, qemu and this checkout are the same inside), with tmpfs overlays on ``/etc /var /tmp
/root /home`` and, for ``aifactory host-setup``, ``/usr/local``.

Network: QEMU user networking only. The management NIC (virtio) is ``10.0.2.15/24`` with no
default route; slirp's ``10.0.2.2`` is this machine's loopback (OpenNebula's monitoring agent
reports to ``$SSH_CLIENT``, which is that address), and the one forward is bound to 127.0.0.1.
The passthrough candidate is an e1000e (8086:10d3) behind its own PCIe root port with no
backend: ``0000:01:00.0`` in the node, an IOMMU group of its own.

Time-outs are hard and fail loudly with the console's tail: the boot (``boot_timeout_s``), and
whatever the caller waits for through :meth:`Node.ssh`. The kernel runs with
``loglevel=5 softlockup_all_cpu_backtrace=1`` so a lockup leaves backtraces in ``console.log``.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from testhost import initramfs, runner
from testhost.config import GuestConfig, find_kernel_version

READY = "AIFACTORY-NODE-READY"
PASSTHROUGH_ADDRESS = "0000:01:00.0"
PASSTHROUGH_ID = "8086:10d3"
PORT_RANGE = range(22220, 22320)
PORT_LOCKS = Path("/var/tmp")
MUX_PERSIST_S = 3600
HUNG_MARKS = ("soft lockup", "hard LOCKUP", "rcu_sched self-detected stall", "blocked for more than")

NODE_GUEST = GuestConfig(
    cpus=2,
    numa_nodes=1,
    memory_mib=2048,
    devices=(),
    udev="pci",
    boot_timeout_s=240.0,
    session_timeout_s=3600.0,
    extra_append=("loglevel=5", "softlockup_all_cpu_backtrace=1"),
    extra_qemu=(
        "-device", "pcie-root-port,id=rp-pt,bus=pcie.0,chassis=1,slot=0",
        "-device", "e1000e,id=pt0,bus=rp-pt",
    ),
)  # fmt: skip
"""2 vCPUs, one NUMA node, 2 GiB, the vIOMMU, and the e1000e that VMs are given."""


class NodeError(AssertionError):
    """The node did not come up or stopped answering; the message ends with its console tail."""


def _port_lock() -> tuple[int, int]:
    """A free 127.0.0.1 port and the flock that keeps other sessions on this machine off it."""
    for port in PORT_RANGE:
        fd = os.open(PORT_LOCKS / f"aifactory-testnode-{port}.lock",
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                os.close(fd)
                continue
        return port, fd
    raise NodeError(f"no free port in {PORT_RANGE.start}-{PORT_RANGE.stop - 1} for the node's ssh forward")


NODE_SCRIPT = r"""#!/bin/bash
# The node's job: runs as root after the test host's init; powers off when it returns.
set -u
OUT={out}
say() {{ echo "node: $*"; }}
mkdir -p /run/ovl/usr-local/u /run/ovl/usr-local/w /run/sshd
mount -t overlay overlay -o lowerdir=/usr/local,upperdir=/run/ovl/usr-local/u,workdir=/run/ovl/usr-local/w /usr/local \
    || say "cannot overlay /usr/local"
chmod 1777 /tmp
: > /etc/resolv.conf
: > /root/.bashrc  # the machine's may start pyenv & co., seconds per ssh command under TCG
hostname {name}
echo "127.0.1.1 {name}" >> /etc/hosts  # sudo looks its host up
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd  # upstream's driver scripts use bash process substitution
modprobe virtio_net
modprobe vfio-pci || say "modprobe vfio-pci failed"
nic=""
for dev in /sys/class/net/*; do
    [ "$(basename "$(readlink -f "$dev/device/driver" 2>/dev/null)")" = virtio_net ] && nic=$(basename "$dev")
done
[ -n "$nic" ] || {{ say "no virtio NIC"; exit 1; }}
ip link set "$nic" up
ip addr add 10.0.2.15/24 dev "$nic"
/usr/sbin/sshd -f "$OUT/sshd_config" -E "$OUT/sshd.log" || {{ say "sshd did not start"; exit 1; }}
/usr/sbin/virtlogd -d
/usr/sbin/libvirtd -d -f "$OUT/libvirtd.conf" >> "$OUT/libvirtd.log" 2>&1
for _ in $(seq 240); do
    virsh -c qemu:///system version > /dev/null 2>&1 && break
    sleep 1
done
virsh -c qemu:///system version > /dev/null 2>&1 || {{ say "libvirtd does not answer"; exit 1; }}
echo "{ready} uptime=$(cut -d' ' -f1 /proc/uptime)"
while [ ! -e "$OUT/stop" ]; do sleep 1; done
say "stop file seen, powering off"
"""

SSHD_CONFIG = """ListenAddress 0.0.0.0
Port 22
HostKey {out}/ssh_host_ed25519_key
PidFile /run/sshd.pid
AuthorizedKeysFile {out}/authorized_keys.%u
AllowUsers oneadmin root
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
Subsystem sftp internal-sftp
"""

LIBVIRTD_CONF = """unix_sock_group = "libvirt"
unix_sock_rw_perms = "0770"
unix_sock_ro_perms = "0777"
auth_unix_rw = "none"
auth_unix_ro = "none"
"""


@dataclass
class Node:
    """A running node: ``port`` forwards to its sshd; ``out`` is its share (console.log in it)."""

    name: str
    out: Path
    port: int
    key: Path
    proc: subprocess.Popen[bytes]
    console: runner._Console
    lock_fd: int
    boot_s: float = 0.0
    _stopped: bool = field(default=False)

    @property
    def console_log(self) -> Path:
        return self.out / "console.log"

    def console_tail(self, lines: int = 80) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.replace("\r\n", "\n").rstrip().splitlines()[-lines:])

    def failure(self, what: str) -> NodeError:
        """A loud failure naming ``what``, the console log and its tail."""
        return NodeError(f"{what}\nnode console log: {self.console_log}\n--- node console tail ---\n"
                         + self.console_tail())

    def looks_hung(self) -> bool:
        """The kernel reported a lockup or stall, or QEMU is gone."""
        if self.proc.poll() is not None:
            return True
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return False
        return any(mark in text for mark in HUNG_MARKS)

    def ssh_argv(self, user: str, command: str) -> list[str]:
        """One connection per user, kept open between calls (a new one costs seconds of the node's
        emulated CPU); :meth:`stop` ends it, as does the node's end or ``MUX_PERSIST_S`` idle."""
        return ["ssh", "-i", str(self.key), "-p", str(self.port), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=30", "-o", "ControlMaster=auto", "-o", f"ControlPath={self.out}/mux-%r",
                "-o", f"ControlPersist={MUX_PERSIST_S}", "-o", "ServerAliveInterval=30",
                f"{user}@127.0.0.1", command]

    def ssh(self, command: str, *, user: str = "root", timeout: float = 120, check: bool = True,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """``command`` (a shell line) in the node as ``user``; a time-out or failure fails loudly."""
        if self.proc.poll() is not None:
            raise self.failure(f"the node is gone (qemu exit {self.proc.returncode}) before: {command}")
        try:
            result = subprocess.run(self.ssh_argv(user, command), input=stdin, capture_output=True, text=True,
                                    timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise self.failure(f"node: {command!r} as {user} did not finish within {timeout:.0f} s") from None
        if check and result.returncode != 0:
            raise AssertionError(f"node: {command!r} as {user} exited {result.returncode}: "
                                 f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        return result

    def stop(self, timeout: float = 90) -> None:
        """Touch the stop file, wait for the power-off, kill QEMU past ``timeout``; frees the port."""
        if self._stopped:
            return
        self._stopped = True
        for socket_path in self.out.glob("mux-*"):  # the shared connections ssh_argv opened
            subprocess.run(["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "127.0.0.1"],
                           capture_output=True, timeout=30, check=False)
        try:
            (self.out / "stop").touch()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        finally:
            os.close(self.lock_fd)


def prepare_share(out: Path, name: str, authorized: dict[str, str]) -> Path:
    """The node's share: its script, sshd and libvirtd configuration, host key, and per-user
    authorized keys (``authorized`` maps user -> public key line). Returns the root key's path."""
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o755)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(out / "ssh_host_ed25519_key")],
                   check=True)
    key = out / "root_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    keys = {"root": (out / "root_ed25519.pub").read_text(), **authorized}
    for user, line in keys.items():
        path = out / f"authorized_keys.{user}"
        path.write_text(line if line.endswith("\n") else line + "\n")
        path.chmod(0o644)
    (out / "sshd_config").write_text(SSHD_CONFIG.format(out=out))
    (out / "libvirtd.conf").write_text(LIBVIRTD_CONF)
    (out / "job.sh").write_text(NODE_SCRIPT.format(out=shlex.quote(str(out)), name=name, ready=READY))
    return key


def boot(out: Path, name: str, authorized: dict[str, str], config: GuestConfig = NODE_GUEST) -> Node:
    """Boot the node, its share in ``out``; returns once sshd and libvirtd answer (or raises
    :class:`NodeError` with the console tail after ``config.boot_timeout_s``)."""
    config = config.with_env_overrides()
    kver = find_kernel_version(config.kernel_version)
    if kver is None:
        raise NodeError("no Debian kernel in /lib/modules (run .ci/install-testhost.sh)")
    key = prepare_share(out, name, authorized)
    port, lock_fd = _port_lock()
    initrd = initramfs.build(kver, out / "initramfs.cpio")
    argv = runner.qemu_argv(config, kver, initrd, out, libvirt=False)
    argv += ["-netdev", f"user,id=mgmt,ipv6=off,hostfwd=tcp:127.0.0.1:{port}-:22",
             "-device", "virtio-net-pci,netdev=mgmt,bus=pcie.0"]
    (out / "qemu.argv").write_text(shlex.join(argv) + "\n")
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    console = runner._Console(proc.stdout, out / "console.log")
    node = Node(name, out, port, key, proc, console, lock_fd)
    try:
        while True:
            if proc.poll() is not None:
                raise node.failure(f"the node stopped while booting (qemu exit {proc.returncode})")
            if time.monotonic() - start > config.boot_timeout_s:
                raise node.failure(f"the node was not ready within {config.boot_timeout_s:.0f} s")
            try:
                text = node.console_log.read_text(errors="replace")
            except OSError:
                text = ""
            if READY in text:
                break
            if runner.FAIL in text:
                raise node.failure("the node's init failed")
            time.sleep(0.5)
        node.boot_s = time.monotonic() - start
        node.ssh("true", timeout=60)
    except BaseException:
        proc.kill()
        proc.wait(timeout=30)
        node._stopped = True
        os.close(lock_fd)
        raise
    return node
