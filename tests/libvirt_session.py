"""A private libvirt for tests: a ``qemu:///session`` daemon of the unprivileged user ``nobody``,
in a directory of its own, so the machine's system libvirt (and other tests' domains) stay out of
it. QEMU runs with TCG (``type='qemu'``). The daemon is stopped and the directory removed on exit.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import needs

Virsh = Callable[..., subprocess.CompletedProcess[str]]


@contextmanager
def session() -> Iterator[tuple[Path, Virsh]]:
    """(a directory ``nobody`` can read, ``virsh(*args)`` against the session daemon)."""
    needs.root("runs a libvirt session daemon as nobody")
    needs.tools("virsh", "libvirtd", "runuser", "qemu-system-x86_64",
                hint="apt-get install libvirt-daemon-system libvirt-clients qemu-system-x86")
    nobody = pwd.getpwnam("nobody")
    work = Path(tempfile.mkdtemp(prefix="aifactory-libvirt.", dir="/var/tmp"))  # pytest's tmp is root's 0700
    work.chmod(0o755)
    home = work / "session"
    home.mkdir(mode=0o700)
    os.chown(home, nobody.pw_uid, nobody.pw_gid)

    def virsh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", "nobody", "--", "env", "-i", f"HOME={home}", f"XDG_RUNTIME_DIR={home}",
                               "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "virsh", "-c", "qemu:///session", *args],
                              capture_output=True, text=True, timeout=120, check=False)

    try:
        yield work, virsh
    finally:
        pid_file = home / "libvirt" / "libvirtd.pid"
        if pid_file.is_file():
            pid = int(pid_file.read_text().strip())
            if Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}").stat().st_uid == nobody.pw_uid:
                os.kill(pid, signal.SIGTERM)
                for _ in range(50):
                    if not Path(f"/proc/{pid}/exe").exists():
                        break
                    time.sleep(0.1)
        shutil.rmtree(work, ignore_errors=True)
