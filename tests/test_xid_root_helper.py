"""XIDs past ``kernel.dmesg_restrict=1``: the root helper's ``xid-log`` reads this machine's real
``/dev/kmsg`` and prints XID codes only; the probe, unprivileged, gets them through ``sudo -n`` with
the sudoers rule ``drivers/sudoers/aifactory`` grants (installed here in a private mount namespace
over ``/etc/sudoers.d``, as ``host-setup`` installs it on a host), and says why when it cannot."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import needs
import pytest

from aifactory_core.errors import UsageError
from aifactory_core.probes.xid import helper_report
from aifactory_core.roothelper import parse

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(sys.executable).with_name("aifactory-root-helper")  # run by root through sudo
PROBE_PYTHON = "/usr/bin/python3"  # the probe side runs as nobody: Debian's interpreter, the checkout's code


@pytest.mark.parametrize("sequence", ["-1", "0", "123456", "9" * 19])
def test_xid_log_takes_a_sequence(sequence: str) -> None:
    assert parse(["xid-log", sequence]) == ("xid-log", str(int(sequence)), "")


@pytest.mark.parametrize("argv", [["xid-log"], ["xid-log", "-2"], ["xid-log", "1e3"], ["xid-log", " 1"],
                                  ["xid-log", "9" * 20], ["xid-log", "1", "2"], ["xid-log", "/dev/kmsg"]])
def test_xid_log_refuses_anything_else(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse(argv)


def _kmsg_readable() -> bool:
    try:
        os.close(os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK))
    except OSError:
        return False
    return True


def test_helper_report_from_the_real_kernel_log() -> None:
    if not _kmsg_readable():
        needs.unavailable("/dev/kmsg not readable here (run as root)")
    text = helper_report(-1)
    first, *rest = text.splitlines()
    assert first.startswith("NEWEST ") and int(first[7:]) >= 0  # every record since boot was read
    assert all(line.startswith("XID ") and len(line.split()) == 3 for line in rest)
    again = helper_report(int(first[7:]))  # nothing newer than the newest (or only new records)
    assert int(again.splitlines()[0][7:]) >= int(first[7:])


def _probe_as_nobody(sudoers: Path | None, state: Path) -> str:
    """The XID source the probe reports, run as ``nobody`` on the live host (``state``: its state dir)."""
    code = ("from aifactory_core.probes.xid import read_new_xids; from aifactory_core.probes.sysfs import Root; "
            f"print(read_new_xids(Root('/', {str(state)!r}))[1])")
    run = ["runuser", "-u", "nobody", "--", "env", "-i", f"PATH={os.environ['PATH']}", f"PYTHONPATH={REPO}",
           f"AIFACTORY_ROOT_HELPER={HELPER}", PROBE_PYTHON, "-c", code]
    if sudoers is not None:  # the grant in a private mount namespace: this machine's sudoers stay
        run = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f'mount --bind {sudoers} /etc/sudoers.d && exec "$@"', "sh", *run]
    done = subprocess.run(run, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_an_unprivileged_probe_reads_xids_only_through_the_granted_helper(tmp_path: Path) -> None:
    needs.root("runs the probe as nobody and installs a sudoers rule in a private mount namespace")
    for tool in ("sudo", "runuser", "unshare", "visudo"):
        needs.tool(tool, hint="sudo util-linux")
    if Path("/proc/sys/kernel/dmesg_restrict").read_text().strip() != "1":
        pytest.skip("kernel.dmesg_restrict is 0 here: every user reads the kernel log")
    if not Path(PROBE_PYTHON).exists():
        needs.unavailable(f"{PROBE_PYTHON} missing (the interpreter hosts' probe environments are made from)")
    import pwd
    import tempfile

    nobody = pwd.getpwnam("nobody")
    state = Path(tempfile.mkdtemp(prefix="aifactory-xid-"))  # pytest's own directories are root's, 0700
    os.chown(state, nobody.pw_uid, nobody.pw_gid)
    try:
        _check_helper_grant(state, tmp_path)
    finally:
        shutil.rmtree(state)


def _check_helper_grant(state: Path, tmp_path: Path) -> None:
    denied = _probe_as_nobody(None, state)
    assert denied.startswith("unavailable: /dev/kmsg Operation not permitted; root helper: ")
    sudoers = tmp_path / "sudoers.d"
    sudoers.mkdir()
    shutil.copy(Path("/etc/sudoers.d/README") if Path("/etc/sudoers.d/README").exists() else os.devnull,
                sudoers / "README")
    rule = (REPO / "drivers/sudoers/aifactory").read_text().replace(
        "/usr/local/lib/aifactory/venv/bin/aifactory-root-helper", str(HELPER)).replace("oneadmin ALL", "nobody ALL")
    (sudoers / "aifactory").write_text(rule)
    (sudoers / "aifactory").chmod(0o440)
    assert subprocess.run(["visudo", "-cf", str(sudoers / "aifactory")], capture_output=True).returncode == 0
    assert _probe_as_nobody(sudoers, state) == "kmsg (root helper)"
    sequence = (state / "probes" / "xid-seq").read_text().split()
    assert int(sequence[0]) >= 0  # the helper's NEWEST kept: the next run reads only newer records
