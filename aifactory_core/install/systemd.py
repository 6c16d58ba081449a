"""``systemctl`` for the installers: whether systemd manages this machine, and checked calls.

``systemctl`` is looked up on ``PATH``; systemd is taken to be running when ``/run/systemd/system``
is a directory (``sd_booted()``'s test). A staged tree (``DESTDIR``) is never the running system.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import partial
from pathlib import Path

from aifactory_core.install import layout
from aifactory_core.install.stage import InstallError, Transaction

BOOTED_MARKER = Path("/run/systemd/system")


def running(target: layout.Layout) -> bool:
    """True when ``target`` is this machine and systemd manages it (units can be started)."""
    return not target.staged and BOOTED_MARKER.is_dir() and shutil.which("systemctl") is not None


def systemctl(*argv: str) -> subprocess.CompletedProcess[str]:
    command = shutil.which("systemctl") or "/bin/systemctl"
    return subprocess.run([command, *argv], capture_output=True, text=True, check=False, timeout=120)


def checked(*argv: str) -> None:
    """``systemctl ARGV``; its failure is an :class:`InstallError` carrying systemctl's own words."""
    result = systemctl(*argv)
    if result.returncode != 0:
        said = " ".join((result.stderr or result.stdout).split()) or f"exit status {result.returncode}"
        raise InstallError(f"systemctl {' '.join(argv)}: {said}")


def quiet(*argv: str) -> None:
    """An undo or a follow-up: tried, its failure left to the next run."""
    systemctl(*argv)


def succeeds(*argv: str) -> bool:
    """A query (``is-enabled``, ``is-active``): True when it exits 0."""
    return systemctl(*argv).returncode == 0


def reload_step(tx: Transaction) -> None:
    """``systemctl daemon-reload`` as a step of ``tx`` after a unit file changed. Its undo is put
    first, so a rollback reloads systemd last, once the unit file has been put back as it was."""
    tx.step("systemctl daemon-reload", partial(checked, "daemon-reload"))
    if not tx.dry_run:
        tx.undo.insert(0, ("systemctl daemon-reload", partial(quiet, "daemon-reload")))
