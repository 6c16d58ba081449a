"""The suite's IM probes through oned's real monitoring: a ``qemu``-type host over SSH.

The host is this machine, reached by oned's own drivers over SSH at ``aifactory-node`` (a private
``sshd`` on 127.0.0.1, oneadmin's key only). ``install.sh --sync`` puts the suite into the
session's remotes and runs the real ``onehost sync``; oned's ``one_im_ssh`` copies the remotes to
``/var/tmp/one`` and starts ``monitord-client``, which runs every host/system probe and sends the
result to monitord. The probes read the bundled H100 capture as their host root, with its NVML
recording (the node's sshd sets ``AIFACTORY_HOST_ROOT`` and ``AIFACTORY_NVML_REPLAY`` for the
session): the flow from probe to oned's host template is what is under test.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import needs
import pytest
from realone import REPO, SYSTEM_PROBES_PERIOD, Installed, RealOne, note

from aifactory_core.samples import extract_sample

pytestmark = pytest.mark.realone
NODE = "aifactory-node"
SSH_CONFIG_MARK = f"# {NODE}: aifactory's real-oned tests"
SAMPLES = REPO / "aifactory_core" / "samples"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def node(real_one: RealOne, suite_installed: Installed) -> Iterator[Path]:
    """A private sshd for oneadmin on 127.0.0.1, named ``aifactory-node`` in oneadmin's ssh config."""
    sshd = needs.tool("/usr/sbin/sshd", hint="openssh-server")
    needs.tool("ssh-keygen", hint="openssh-client")
    remotes_before = Path("/var/tmp/one").exists()
    top = real_one.top / "node"
    top.mkdir()
    host_root = top / "host-root"  # a copy oneadmin can read (the suite's sample cache is root's)
    shutil.copytree(extract_sample("h100-sxm5-vm"), host_root, symlinks=True)
    replay = top / "nvml.json"
    shutil.copy(SAMPLES / "h100-sxm5-vm.nvml.json", replay)
    key = top / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (top / "authorized_keys").write_text((top / "id_ed25519.pub").read_text())
    host_key = top / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    port = _free_port()
    config = top / "sshd_config"
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
SetEnv AIFACTORY_HOST_ROOT={host_root} AIFACTORY_NVML_REPLAY={replay}
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
    server = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True)
    ssh_dir = Path(user.pw_dir) / ".ssh"
    ssh_config = ssh_dir / "config"
    previous = ssh_config.read_text() if ssh_config.exists() else None
    block = (f"{SSH_CONFIG_MARK}\nHost {NODE}\n  HostName 127.0.0.1\n  Port {port}\n  IdentityFile {key}\n"
             "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(ssh_dir, user.pw_uid, user.pw_gid)
    ssh_config.write_text(block + "\n" + (previous or ""))
    os.chown(ssh_config, user.pw_uid, user.pw_gid)
    daemons: list[Path] = []
    try:
        daemons = _libvirt_for_oneadmin(real_one, top)
        probe = real_one.run("ssh", NODE, "echo", "$AIFACTORY_HOST_ROOT", check=False, timeout=30)
        if probe.stdout.strip() != str(host_root):
            raise AssertionError(f"ssh {NODE} as oneadmin: {probe.returncode} {probe.stdout}{probe.stderr}")
        yield host_root
    finally:
        if previous is None:
            ssh_config.unlink(missing_ok=True)
        else:
            ssh_config.write_text(previous)
        server.terminate()
        server.wait(timeout=10)
        _stop(daemons)
        if not remotes_before:  # this machine's own remotes, if it had any, stay
            subprocess.run(["pkill", "-u", "oneadmin", "-f", "/var/tmp/one/im/"], check=False)
            shutil.rmtree("/var/tmp/one", ignore_errors=True)


def _libvirt_for_oneadmin(one: RealOne, top: Path) -> list[Path]:
    """libvirtd answering oneadmin on qemu:///system, as upstream's probes and drivers need (started
    here with the recipe's socket settings unless one already answers); its pid files, to stop it."""
    if one.run("virsh", "-c", "qemu:///system", "version", check=False, timeout=30).returncode == 0:
        return []
    for tool in ("libvirtd", "virtlogd"):
        needs.tool(f"/usr/sbin/{tool}", hint="libvirt-daemon-system")
    if not Path("/usr/bin/qemu-kvm-one").exists():  # upstream's emulator wrapper, made by its generator
        subprocess.run([str(one.location / "bin" / "qemu-kvm-one-gen")], check=True, capture_output=True)
    conf = top / "libvirtd.conf"
    conf.write_text('unix_sock_group = "libvirt"\nunix_sock_rw_perms = "0770"\nunix_sock_ro_perms = "0777"\n'
                    'auth_unix_rw = "none"\nauth_unix_ro = "none"\n')
    pids = [top / "virtlogd.pid", top / "libvirtd.pid"]
    subprocess.run(["/usr/sbin/virtlogd", "-d", "-p", str(pids[0])], check=True)
    subprocess.run(["/usr/sbin/libvirtd", "-d", "-f", str(conf), "-p", str(pids[1])], check=True)
    deadline = time.monotonic() + 60
    while one.run("virsh", "-c", "qemu:///system", "version", check=False, timeout=30).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError("libvirtd did not answer oneadmin within 60 s")
        time.sleep(1)
    return pids


def _stop(pid_files: list[Path]) -> None:
    import signal

    for pid_file in reversed(pid_files):
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def _host_template(one: RealOne, host: int) -> dict[str, str]:
    import xmlrpc.client

    from lxml import etree

    ok, answer, *_ = xmlrpc.client.ServerProxy(one.endpoint).one.host.info(f"oneadmin:{one.password}", host, False)
    assert ok, answer
    root = etree.fromstring(answer.encode())
    values = {child.tag: (child.text or "") for child in root.find("TEMPLATE") if len(child) == 0}
    values["STATE"] = root.findtext("STATE") or ""
    for vector in root.find("TEMPLATE"):
        for child in vector:
            values.setdefault(f"{vector.tag}/{child.tag}", child.text or "")
    return values


def test_host_probes_reach_the_host_template_through_real_monitoring(
        real_one: RealOne, suite_installed: Installed, node: Path) -> None:
    synced = suite_installed.install_sh("--sync")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    probe_dir = real_one.location / "var" / "remotes" / "im" / "qemu-probes.d" / "host" / "system"
    assert (probe_dir / "aifactory-gpu").is_file()

    client = real_one.client()
    t0 = time.monotonic()
    host = client.host.allocate(NODE, "qemu", "qemu", -1)
    deadline = t0 + 300 + 2 * SYSTEM_PROBES_PERIOD
    template: dict[str, str] = {}
    while time.monotonic() < deadline:
        template = _host_template(real_one, host)
        if template["STATE"] == "3":  # ERROR
            raise AssertionError(f"host {NODE} in ERROR: {template.get('ERROR', '')}\n"
                                 + real_one.log_tail("monitor.log"))
        if "AIF_GPU_COUNT" in template:
            break
        time.sleep(2)
    else:
        raise AssertionError(f"no AIF_GPU in {NODE}'s template after {time.monotonic() - t0:.0f} s: "
                             f"{sorted(template)}\n{real_one.log_tail('monitor.log')}")
    assert template["STATE"] == "2"  # MONITORED
    assert (template["AIF_PROBE/STATUS"], template["AIF_NVML/STATUS"]) == ("OK", "replay")
    assert template["AIF_GPU_COUNT"] == "1"
    assert template["AIF_GPU/BUS_ID"] == "0000:00:06.0"
    assert template["AIF_GPU/MODEL"] == "NVIDIA H100 80GB HBM3"
    assert template["AIF_GPU/HEALTH"] == "OK"
    assert template["IM_MAD"] == "qemu"
    note(f"probes: {NODE} created -> AIF_* in its template after {time.monotonic() - t0:.0f} s")
