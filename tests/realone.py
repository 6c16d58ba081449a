"""A real OpenNebula frontend for tests (marker ``realone``): upstream's oned, hook manager,
monitord and scheduler, built from the source tarball by ``.ci/build-opennebula.sh``.

Each test session gets a fresh self-contained installation (``ONE_LOCATION`` mode) in a directory
of its own under ``/var/tmp``: ``bin``, ``lib``, ``share`` and ``include`` link to the cached build,
``etc`` and ``var`` are copies, so a session starts on an empty sqlite database with pristine
remotes, and what the suite installs into them is gone with the session. oned runs as the real
``oneadmin`` user; the dummy IM/VMM drivers are enabled, the scheduler window is 1 s, the
host-system probes run every ``SYSTEM_PROBES_PERIOD`` seconds and the hosts' full VM state
report every ``SYNC_STATE_VM_PERIOD`` seconds (upstream 180: a host back from ERROR reports
its VMs with it; the cost, a VM missing from such a report is POWEROFF at once, where the state
probe waits for three misses, is the same as upstream's, six times as often). Stopping ends
oned, the hook manager and the monitoring agents this session's hosts started.

Fixture: ``real_one`` (session scope). A missing build or prerequisite skips the tier on a
developer's machine and fails it under ``CI=true`` (``needs.unavailable``).
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import needs
import pytest

CACHE = Path(os.environ.get("AIFACTORY_ONE_CACHE", "/var/cache/aifactory-opennebula"))
VERSION = "7.0.2"
READY_BUDGET_S = 15.0  # what a fresh oned must stay under (tests/oned/test_oned_smoke.py)
READY_TIMEOUT_S = 60.0  # past this the tier cannot run at all
SYSTEM_PROBES_PERIOD = 10
SYNC_STATE_VM_PERIOD = 30
REPO = Path(__file__).resolve().parents[1]


def built_location() -> Path:
    """The cached ONE_LOCATION that ``.ci/build-opennebula.sh`` installed."""
    override = os.environ.get("AIFACTORY_ONE_LOCATION")
    pointer = CACHE / f"release-{VERSION}.location"
    if override:
        location = Path(override)
    elif pointer.is_file():
        location = Path(pointer.read_text().strip())
    else:
        needs.unavailable(f"OpenNebula {VERSION} is not built: run 'sudo bash .ci/build-opennebula.sh'")
    if not (location / "bin" / "oned").is_file():
        needs.unavailable(f"{location}/bin/oned is missing: run 'sudo bash .ci/build-opennebula.sh' again")
    return location


def edit_config(path: Path, pattern: str, replacement: str | Callable[[re.Match[str]], str], count: int = 1) -> None:
    text = path.read_text()
    changed, made = re.subn(pattern, replacement, text, count=count, flags=re.MULTILINE)
    if made != count:
        raise AssertionError(f"{path.name}: expected {count} match(es) of {pattern!r}, found {made}: "
                             "upstream's configuration changed shape")
    path.write_text(changed)


def configure(etc: Path) -> None:
    """Test settings on top of upstream's shipped configuration (each edit must match once)."""
    oned = etc / "oned.conf"
    edit_config(oned, r"^#VM_MAD = \[ NAME=\"dummy\"(.*)\n#  TYPE=\"xml\" \]",
                r'VM_MAD = [ NAME="dummy"\1\n  TYPE="xml" ]')
    edit_config(oned, r"^SCHED_MAX_WND_TIME\s*=\s*\d+", "SCHED_MAX_WND_TIME   = 1")
    # The generic GPU quota, as docs/tenant-policy.md tells the operator to configure it.
    edit_config(oned, r'^#QUOTA_VM_ATTRIBUTE = "VCPU"', 'QUOTA_VM_ATTRIBUTE = "GPU"')
    edit_config(oned, r"^MONITORING_INTERVAL_MARKET\s*=\s*\d+", "MONITORING_INTERVAL_MARKET    = 86400")
    edit_config(oned, r"^MONITORING_INTERVAL_DATASTORE\s*=\s*\d+", "MONITORING_INTERVAL_DATASTORE = 5")
    # Upstream's self-contained install keeps the hook manager's base path at /var/lib/one: point it
    # into this installation, as its operator would.
    # (a directory other than the installer's fallback, so a misread setting shows in the tests).
    edit_config(etc / "onehem-server.conf", r"^:hook_base_path: '/var/lib/one/remotes/hooks'",
          f":hook_base_path: '{etc.parent}/var/remotes/hooks-site'  # this installation's hooks")
    # Hold every new VM until the admission hook releases it (docs/tenant-policy.md).
    edit_config(oned, r'^#VM_SUBMIT_ON_HOLD = "NO"', 'VM_SUBMIT_ON_HOLD = "YES"')
    monitord = etc / "monitord.conf"
    edit_config(monitord, r"^# (IM_MAD = \[)\n# (    NAME\s*= \"dummy\",)\n((?:# .*\n)+?)# \]",
          lambda match: f"{match[1]}\n{match[2]}\n" + re.sub(r"^# ", "", match[3], flags=re.MULTILINE) + "]")
    edit_config(monitord, r"^(\s*SYSTEM_HOST\s*=\s*)\d+", rf"\g<1>{SYSTEM_PROBES_PERIOD}")
    edit_config(monitord, r"^(\s*SYNC_STATE_VM\s*=\s*)\d+", rf"\g<1>{SYNC_STATE_VM_PERIOD}")
    # The first run of the probes over SSH is slow on a loaded 2-core machine: upstream's 90 s
    # start time-out fails the host there.
    edit_config(monitord, r"-w 90 (kvm|qemu)\"", r'-w 300 \1"', count=2)


def _oneadmin() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("oneadmin")
    except KeyError:
        needs.unavailable("no oneadmin user: run 'sudo bash .ci/build-opennebula.sh'")


class RealOne:
    """A running oned in ``location``; ``endpoint`` is its XML-RPC URL, ``password`` oneadmin's."""

    def __init__(self, built: Path) -> None:
        self.built = built
        self.user = _oneadmin()
        self.top = Path(tempfile.mkdtemp(prefix="aifactory-realone.", dir="/var/tmp"))
        self.top.chmod(0o755)
        self.location = self.top / "one"
        self.location.mkdir()
        for name in ("bin", "lib", "share", "include"):
            if (built / name).exists():
                (self.location / name).symlink_to(built / name)
        for name in ("etc", "var"):
            subprocess.run(["cp", "-a", str(built / name), str(self.location / name)], check=True)
        configure(self.location / "etc")
        self.password = secrets.token_hex(12)
        self.auth = self.top / "one_auth"
        self.auth.write_text(f"oneadmin:{self.password}\n")
        self.port = 2633
        self.endpoint = f"http://127.0.0.1:{self.port}/RPC2"
        (self.location / "var" / "remotes" / "hooks-site").mkdir()
        # oneadmin owns the installation (as upstream's install.sh -d makes it), not ``top``: root
        # runs the suite's environments under ``top`` in these tests.
        for path in (self.location, self.auth):
            subprocess.run(["chown", "-R", f"{self.user.pw_uid}:{self.user.pw_gid}", str(path)], check=True)
        self.auth.chmod(0o600)
        self.started_s = 0.0

    @property
    def env(self) -> dict[str, str]:
        """The environment OpenNebula's commands run in, as oneadmin."""
        return {"PATH": f"{self.location}/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": self.user.pw_dir,
                "USER": "oneadmin", "LOGNAME": "oneadmin", "ONE_LOCATION": str(self.location),
                "ONE_AUTH": str(self.auth), "ONE_XMLRPC": self.endpoint, "LANG": "C.UTF-8"}

    def run(self, *argv: str, check: bool = True, timeout: float = 120, user: str = "oneadmin",
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``argv`` as ``user`` (default oneadmin) with OpenNebula's environment."""
        environment = {**self.env, **(env or {})}
        command = ["runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in environment.items()), *argv]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}: {result.stdout}{result.stderr}")
        return result

    def start(self) -> None:
        import socket

        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                raise AssertionError(f"something already listens on 127.0.0.1:{self.port}: another oned? "
                                     "(one real oned per machine at a time: its ports are upstream's defaults)")
        for pid_file in Path("/tmp").glob("one-monitord-*.pid"):
            _stop_pid_file(pid_file)
        if (self.location / "var" / "one.db").exists():
            raise AssertionError(f"{self.built}/var holds a database: the cached build is not pristine; rebuild it")
        t0 = time.monotonic()
        result = self.run("one", "start", check=False, timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"one start failed ({result.returncode}): {result.stdout}{result.stderr}\n"
                                 + self.log_tail())
        deadline = t0 + READY_TIMEOUT_S
        while True:
            try:
                self.client().user.info(0)
                break
            except Exception as error:  # the API is not up yet: connection refused, then "not ready"
                if time.monotonic() > deadline:
                    raise AssertionError(f"oned's API did not answer within {READY_TIMEOUT_S} s: {error}\n"
                                         + self.log_tail()) from None
                time.sleep(0.2)
        self.started_s = time.monotonic() - t0

    def restart(self) -> float:
        """``one stop`` then ``one start`` on the same database (oned reads oned.conf at start
        only); returns the seconds until the API answered again."""
        import socket

        self.run("one", "stop", check=False, timeout=60)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) != 0:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"oned still listens on {self.port} after 'one stop'\n{self.log_tail()}")
            time.sleep(0.2)
        t0 = time.monotonic()
        result = self.run("one", "start", check=False, timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"one start failed ({result.returncode}): {result.stdout}{result.stderr}\n"
                                 + self.log_tail())
        while True:
            try:
                self.client().user.info(0)
                return time.monotonic() - t0
            except Exception as error:  # not up yet
                if time.monotonic() - t0 > READY_TIMEOUT_S:
                    raise AssertionError(f"oned's API did not answer after a restart: {error}\n"
                                         + self.log_tail()) from None
                time.sleep(0.2)

    def client(self, session: str | None = None) -> Any:
        import pyone

        return pyone.OneServer(self.endpoint, session=session or f"oneadmin:{self.password}", timeout=30)

    def log_tail(self, name: str = "oned.log", lines: int = 40) -> str:
        path = self.location / "var" / name
        if not path.exists():
            return f"(no {path})"
        return f"--- {path} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        self.run("one", "stop", check=False, timeout=60)
        for pid_file in Path("/tmp").glob("one-monitord-*.pid"):
            _stop_pid_file(pid_file)
        # Anything still running from this installation (drivers, hook manager children).
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if str(self.location).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue

    def remove(self) -> None:
        if os.environ.get("AIFACTORY_KEEP_REALONE"):
            return
        shutil.rmtree(self.top, ignore_errors=True)


def _stop_pid_file(pid_file: Path) -> None:
    """End the monitoring agent a pid file names (upstream's ``one stop`` leaves them running):
    only a oneadmin-owned file naming a oneadmin ``monitord-client`` process."""
    oneadmin = _oneadmin().pw_uid
    try:
        if pid_file.is_symlink() or pid_file.stat().st_uid != oneadmin:
            return
        pid = int(pid_file.read_text().strip())
        proc = Path(f"/proc/{pid}")
        if proc.stat().st_uid == oneadmin and b"monitord-client" in (proc / "cmdline").read_bytes():
            os.kill(pid, signal.SIGTERM)
        pid_file.unlink(missing_ok=True)
    except (OSError, ValueError):
        return


# oned, the hook manager and monitord listen on fixed ports (2633, 2101/2102, 4124): two test
# sessions on one machine take turns instead of colliding.
PORTS_LOCK = Path("/var/tmp/aifactory-realone.lock")


@pytest.fixture(scope="session")
def real_one() -> Iterator[RealOne]:
    needs.root("starts oned as the oneadmin user")
    needs.tool("runuser", hint="util-linux")
    location = built_location()
    lock_fd = os.open(PORTS_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    waited = time.monotonic()
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    waited = time.monotonic() - waited
    if waited > 1:
        _TIMINGS.append(f"waited {waited:.0f} s for another session's oned to stop")
    one = RealOne(location)
    try:
        one.start()
        _TIMINGS.append(f"real oned {VERSION}: API ready {one.started_s:.1f} s after 'one start' ({one.location})")
        yield one
    finally:
        try:
            one.stop()
            one.remove()
        finally:
            os.close(lock_fd)


PYTHON = "/usr/bin/python3"  # Debian's: oneadmin must be able to run the environments built from it


@dataclass
class Installed:
    one: RealOne
    prefix: Path
    etc_binds: dict[str, Path]
    first_run: subprocess.CompletedProcess[str]
    seconds: float

    def install_sh(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_install(self.one, self.prefix, self.etc_binds, *args)

    def hooks(self) -> list[str]:
        listed = self.one.run("onehook", "list", "--csv", "--list", "NAME")
        return sorted(line for line in listed.stdout.splitlines()[1:] if line)


def run_install(one: RealOne, prefix: Path, binds: dict[str, Path], *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHON": PYTHON, "HOME": "/root"}
    return in_frontend(one, binds, ["sh", str(REPO / "install.sh"), "--prefix", str(prefix), "--endpoint", one.endpoint,
                                    *args], env)


def in_frontend(one: RealOne, binds: dict[str, Path], argv: list[str],
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``argv`` as root in a private mount namespace with the session's ``/etc`` directories bound."""
    mounts = " && ".join(f"mount --bind {source} {target}" for target, source in binds.items())
    environment = {"PATH": f"/usr/sbin:/usr/bin:/sbin:/bin:{one.location}/bin", "ONE_LOCATION": str(one.location),
                   "ONE_AUTH": str(one.auth), "ONE_XMLRPC": one.endpoint, "LANG": "C.UTF-8", **(env or {})}
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{mounts} && exec \"$@\"", "sh", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600, check=False)


@pytest.fixture(scope="session")
def suite_installed(real_one: RealOne) -> Iterator[Installed]:
    """The suite installed by its install.sh, as root, into the session's OpenNebula (ONE_LOCATION):
    frontend and host environments built from Debian's ``/usr/bin/python3`` (oneadmin runs them),
    hooks registered with oned. What it writes outside ONE_LOCATION and its prefix
    (``/etc/sudoers.d``, ``/etc/systemd/system``) lands on directories of the session bind-mounted
    there in a private mount namespace, so the test machine keeps its own."""
    needs.root("install.sh installs as root")
    needs.tool("unshare", hint="util-linux")
    if not Path(PYTHON).exists():
        needs.unavailable(f"{PYTHON} missing (apt-get install python3-venv)")
    prefix = real_one.top / "aifactory"
    binds = {"/etc/sudoers.d": real_one.top / "sudoers.d", "/etc/systemd/system": real_one.top / "systemd-system"}
    for source in binds.values():
        source.mkdir()
    t0 = time.monotonic()
    first = run_install(real_one, prefix, binds)
    assert first.returncode == 0, first.stdout + first.stderr
    seconds = time.monotonic() - t0
    _TIMINGS.append(f"suite install.sh (both Python environments, hooks) into the real oned: {seconds:.1f} s")
    # install.sh changed oned.conf (release an ADMIN VM operation): oned acts on it after a restart,
    # as the installer's note tells the operator.
    assert "restart oned" in first.stdout, first.stdout
    _TIMINGS.append(f"oned restarted after install.sh: API ready in {real_one.restart():.1f} s")
    yield Installed(real_one, prefix, binds, first, seconds)


_TIMINGS: list[str] = []


def note(line: str) -> None:
    """A timing line for the end of the test session's report."""
    _TIMINGS.append(line)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _TIMINGS:
        terminalreporter.write_line(line)
