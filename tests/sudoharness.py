"""The root helper as ``oneadmin`` reaches it on a host: the real ``oneadmin`` user (looked up, not
a fixed uid), the real ``sudo``, the suite's own sudoers snippet (``drivers/sudoers/aifactory``)
and the helper at the path that snippet names, with a root-owned ``/etc/one/aifactory.conf``.

Nothing of this machine is changed: each call runs in a private mount namespace where ``/etc`` and
``/usr/local/lib`` are overlays whose upper layers hold the snippet, the config and the helper
(the machine's own files show through unchanged), and where every sysfs file a device change or a
reset writes for the target (``driver_override``, ``reset``, ``remove``, the bound driver's
``unbind``, ``drivers_probe``, ``rescan``, vfio-pci's ``bind`` and ``new_id``) is covered by a bind
mount of an empty regular file. A helper that wrongly acted would write there, not to the kernel:
the guard files are the evidence, and the real device cannot move whatever the helper does.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import needs

REPO = Path(__file__).resolve().parents[1]
SNIPPET = REPO / "drivers" / "sudoers" / "aifactory"
HELPER = "/usr/local/lib/aifactory/venv/bin/aifactory-root-helper"
PCI = Path("/sys/bus/pci")
GUARDED = ("driver_override", "reset", "remove", "reset_method")
GUARDED_BUS = ("drivers_probe", "rescan", "drivers/vfio-pci/bind", "drivers/vfio-pci/new_id")
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def oneadmin() -> pwd.struct_passwd:
    """The ``oneadmin`` account (OpenNebula's packages, or ``.ci/build-opennebula.sh``, make it)."""
    try:
        return pwd.getpwnam("oneadmin")
    except KeyError:
        needs.unavailable("no oneadmin user: run 'sudo bash .ci/build-opennebula.sh'")


def helper_script() -> str:
    """The helper's console script, as the installed environment has it (its interpreter is this
    environment's: sudo runs it as root)."""
    script = Path(sys.executable).with_name("aifactory-root-helper")
    if not script.exists():
        needs.unavailable(f"{script} missing: pip install -e . first")
    return script.read_text()


def guard_targets(address: str) -> list[Path]:
    """The sysfs files a change of ``address`` would write, that exist on this kernel."""
    device = PCI / "devices" / address
    paths = [device / name for name in GUARDED]
    driver = device / "driver"
    if driver.exists():
        paths.append(driver / "unbind")
    paths += [PCI / name for name in GUARDED_BUS]
    return [path for path in paths if path.exists()]


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str
    guards_written: dict[str, str] = field(default_factory=dict)


@dataclass
class SudoStage:
    """Upper layers for ``/etc`` and ``/usr/local/lib`` under ``top`` (root-owned, 0755)."""

    top: Path
    config: str = ""

    def __post_init__(self) -> None:
        needs.root("mount namespaces, overlays and setpriv")
        needs.tools("unshare", "setpriv", "sudo", hint="util-linux, sudo")
        for name in ("etc-upper/sudoers.d", "etc-upper/one", "lib-upper/aifactory/venv/bin", "layers", "guards"):
            (self.top / name).mkdir(parents=True, exist_ok=True)
        snippet = self.top / "etc-upper/sudoers.d/aifactory"
        shutil.copyfile(SNIPPET, snippet)
        snippet.chmod(0o440)
        helper = self.top / "lib-upper" / HELPER.removeprefix("/usr/local/lib/")
        helper.write_text(helper_script())
        helper.chmod(0o755)
        for directory in (self.top / "lib-upper/aifactory", self.top / "lib-upper/aifactory/venv", helper.parent):
            directory.chmod(0o755)
        self.write_config(self.config)
        hosts = self.top / "etc-upper/hosts"  # sudo resolves this machine's name (a test host has no DNS)
        original = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
        hosts.write_text(f"{original.rstrip()}\n127.0.1.1 {socket.gethostname()}\n".lstrip())
        hosts.chmod(0o644)

    def write_config(self, text: str) -> None:
        path = self.top / "etc-upper/one/aifactory.conf"
        path.write_text(text)
        path.chmod(0o644)

    def run(self, argv: list[str], *, guard: list[Path] = (), sudo_options: list[str] = (),  # type: ignore[assignment]
            env: dict[str, str] | None = None, command: str = HELPER, timeout: int = 120) -> Outcome:
        """``sudo -n [sudo_options] command argv...`` as oneadmin, inside the namespace."""
        user = oneadmin()
        guards = self.top / "guards"
        for old in guards.iterdir():
            old.unlink()
        binds = []
        for index, target in enumerate(guard):
            stand_in = guards / str(index)
            stand_in.write_bytes(b"")
            binds.append(f'mount --bind {stand_in} "{target}"')
        layers = f"{self.top}/layers"  # a fresh tmpfs: an overlay's upper layer cannot be on an overlay
        setup = " && ".join([
            f"mount -t tmpfs aif-layers {layers}",
            f"cp -a {self.top}/etc-upper {self.top}/lib-upper {layers}/",
            f"mkdir {layers}/etc-work {layers}/lib-work",
            f"mount -t overlay aif-etc -o lowerdir=/etc,upperdir={layers}/etc-upper,workdir={layers}/etc-work /etc",
            "mount -t overlay aif-lib -o lowerdir=/usr/local/lib,upperdir="
            f"{layers}/lib-upper,workdir={layers}/lib-work /usr/local/lib",
            *binds,
        ])
        environment = [f"PATH={SAFE_PATH}", "HOME=/", "LANG=C",
                       *(f"{key}={value}" for key, value in (env or {}).items())]
        script = f'{setup} && exec "$@"'
        process = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
             "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--",
             "env", "-i", *environment, "sudo", "-n", *sudo_options, command, *argv],
            capture_output=True, text=True, timeout=timeout, check=False, cwd="/")
        written = {str(target): (guards / str(index)).read_text(errors="replace")
                   for index, target in enumerate(guard) if (guards / str(index)).stat().st_size}
        return Outcome(process.returncode, process.stdout, process.stderr, written)


def driver_link(address: str) -> str | None:
    link = PCI / "devices" / address / "driver"
    return os.readlink(link) if link.is_symlink() else None
