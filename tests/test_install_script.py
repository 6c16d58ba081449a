"""install.sh itself: shellcheck-clean, argument errors, a dry run changes nothing, and a complete
staged install (both Python environments built with pip) whose host environment still works after
being copied the way ``onehost sync`` copies the remotes (``rsync -L``: symlinks dereferenced) to
``/var/tmp/one`` — here a directory standing for it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import needs
import pytest
from hostroots import h100_root  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "install.sh"


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in ("DESTDIR", "PYTHONPATH")}
    return subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


def test_shellcheck_clean() -> None:
    needs.tool("shellcheck", hint="apt-get install -y shellcheck")
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = _run("--destdir", str(root), "--no-hooks", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"-m venv {root}/opt/aifactory/venv.new" in result.stdout
    assert f"-m venv {root}/var/lib/one/remotes/aifactory/venv.new" in result.stdout
    assert f"would install {root}/var/lib/one/remotes/vmm/kvm/deploy" in result.stdout
    assert not root.exists()


@pytest.mark.parametrize("args", [("--prefix", "relative/dir"), ("--destdir", "relative"), ("--bogus",),
                                  ("--prefix",), ("--upgrade", "--destdir", "/nonexistent/aifactory-test")])
def test_bad_arguments(args: tuple[str, ...]) -> None:
    result = _run(*args, "--no-hooks", "--no-venv")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_is_usage_on_stdout_and_exit_0(flag: str) -> None:
    result = _run(flag)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout.startswith(f"usage: {SCRIPT} [--prefix DIR]") and "--with-example-plugin" in result.stdout
    bad = _run("--bogus")
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr.startswith("install.sh: unknown option --bogus\nusage: ")


def _sync_like_onehost(remotes: Path, host_tmp_one: Path) -> None:
    """What ``onehost sync`` does (``rsync -LRaz --delete . host:/var/tmp/one/``), to a local directory."""
    if shutil.which("rsync"):
        subprocess.run(["rsync", "-La", "--delete", f"{remotes}/", f"{host_tmp_one}/"], check=True)
    else:
        shutil.copytree(remotes, host_tmp_one, symlinks=False)


def test_complete_staged_install_gives_working_environments(tmp_path: Path, h100_root: Path) -> None:  # noqa: F811
    root = tmp_path / "root"
    first = _run("--destdir", str(root), "--no-hooks")
    assert first.returncode == 0, first.stdout + first.stderr
    frontend = root / "opt/aifactory/venv"
    version = subprocess.run([str(frontend / "bin/python3"), "-m", "aifactory_core.cli", "--version"],
                             capture_output=True, text=True, check=True)
    assert version.stdout.startswith("aifactory ")
    assert (frontend / "bin/aifactory").read_text().splitlines()[0] == "#!/opt/aifactory/venv/bin/python3"
    staged_host_env = root / "var/lib/one/remotes/aifactory/venv"
    helper = staged_host_env / "bin/aifactory-root-helper"
    assert helper.read_text().splitlines()[0] == "#!/var/tmp/one/aifactory/venv/bin/python3"

    host = tmp_path / "host-var-tmp-one"
    _sync_like_onehost(root / "var/lib/one/remotes", host)
    python = host / "aifactory/venv/bin/python3"
    assert not python.is_symlink()  # dereferenced, as rsync -L leaves it on a host
    probe = host / "im/kvm-probes.d/host/system/aifactory-gpu"
    flags = probe.read_text().splitlines()[0].split()[1:]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "AIFACTORY_HOST_ROOT": str(h100_root),
           "AIFACTORY_STATE_DIR": str(tmp_path / "state")}
    result = subprocess.run([str(python), *flags, str(probe), "kvm", "0", "gpu-node-01"], input="<X/>",
                            capture_output=True, text=True, env=env, check=False, timeout=60)
    assert result.returncode == 0 and 'STATUS="FAILED"' not in result.stdout, result.stdout + result.stderr
    assert "0000:00:06.0" in result.stdout
    imports = subprocess.run([str(python), "-c", "import aifactory_core.vmm, lxml, pluggy, pyroute2, pyudev, pynvml"],
                             capture_output=True, text=True, env=env, check=False)
    assert imports.returncode == 0, imports.stderr
    # What oned copies to every host is what runs there: no frontend-only pyone, no pip or
    # setuptools, no lib64 link or extra interpreter links (each would arrive as a full copy).
    host_env = host / "aifactory/venv"
    for absent in ("pyone", "pip", "setuptools"):
        found = subprocess.run([str(python), "-c", f"import {absent}"], capture_output=True, text=True, env=env,
                               check=False)
        assert found.returncode != 0, f"{absent} is in the hosts' environment"
    assert sorted(p.name for p in (host_env / "bin").iterdir() if p.name.startswith("python")) == ["python3"]
    assert not (host_env / "lib64").exists()
    size = sum(p.stat().st_size for p in host_env.rglob("*") if p.is_file())
    assert size < 60 * 2**20, f"the hosts' environment is {size / 2**20:.0f} MiB as a host receives it"
    frontend_pyone = subprocess.run([str(frontend / "bin/python3"), "-c", "import pyone"], capture_output=True,
                                    text=True, check=False)
    assert frontend_pyone.returncode == 0, frontend_pyone.stderr

    second = _run("--destdir", str(root), "--no-hooks")
    assert second.returncode == 0 and "-m venv" not in second.stdout
    assert "nothing to change" in second.stdout
    # The example plugin is part of the environments' stamp: asked for on an up-to-date install,
    # both environments are rebuilt with it (not left without it).
    example = _run("--destdir", str(root), "--no-hooks", "--dry-run", "--with-example-plugin")
    assert example.returncode == 0, example.stderr
    assert example.stdout.count("-m venv") == 2, example.stdout
    assert example.stdout.count("plugins/examples/aifactory-example-accel") == 2, example.stdout

    removed = _run("--destdir", str(root), "--no-hooks", "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == []


# --- live installs (no DESTDIR) in an isolated mount namespace -------------------------------------

DEFAULT_ONEADMIN_ID = 9869  # the uid/gid OpenNebula's packages give oneadmin


def oneadmin_ids() -> tuple[int, int]:
    """This machine's oneadmin (uid, gid), where one exists (OpenNebula installed, or the real-oned
    tier's build made one: its uid need not be the packages' 9869); else the packages' ids, which
    the overlaid frontend then creates."""
    import pwd

    try:
        entry = pwd.getpwnam("oneadmin")
    except KeyError:
        return DEFAULT_ONEADMIN_ID, DEFAULT_ONEADMIN_ID
    return entry.pw_uid, entry.pw_gid


STANDIN_DIR = "/opt/aifactory-test-standins"
ONEHOST_STANDIN = f"""#!/bin/sh
# Stand-in for OpenNebula's onehost: records the call only (oned cannot run here). Its exit status is
# chosen by the test; a failure prints what OpenNebula's CLI prints and exits 255 like its exit(-1).
calls={STANDIN_DIR}/onehost.calls
{{
    printf 'call'; printf ' %s' "$@"; printf '\\n'
    printf 'uid=%s gid=%s home=%s cwd=%s xmlrpc=%s\\n' "$(id -u)" "$(id -g)" "$HOME" "$(pwd)" "${{ONE_XMLRPC:-}}"
    if [ -f /var/lib/one/aifactory/install-manifest.json ]; then echo manifest=present; else echo manifest=absent; fi
}} >> "$calls"
status=$(cat {STANDIN_DIR}/onehost.status 2>/dev/null || echo 0)
if [ "$status" != 0 ]; then
    echo "Failed to update the following hosts:" >&2
    echo "* gpu-node-01" >&2
fi
exit "$status"
"""
SYSTEMCTL_STANDIN = f"""#!/bin/sh
# Stand-in for systemctl: records the call only (systemd does not manage this machine). is-enabled
# and is-active answer like systemctl (0: yes, 1: no) from what enable/disable --now recorded; a
# command named in systemctl.fail exits 1.
dir={STANDIN_DIR}
unit=/etc/systemd/system/aifactory-hook-server.service
if [ -f "$unit" ]; then state=unit-present; else state=unit-absent; fi
echo "$* ($state)" >> "$dir/systemctl.calls"
case "$1" in
    is-enabled|is-active) [ -f "$dir/enabled" ]; exit $? ;;
esac
if grep -qx "$1" "$dir/systemctl.fail" 2>/dev/null; then echo "Failed to $1 unit: stand-in told to fail" >&2; exit 1; fi
case "$1" in
    enable) touch "$dir/enabled" ;;
    disable) rm -f "$dir/enabled" ;;
esac
"""
OVERLAID = ("etc", "var", "opt", "run")


class LiveFrontend:
    """A throw-away frontend: ``/etc /var /opt /run`` overlaid (in a private mount namespace) on
    directories under ``top``, so install.sh can run without DESTDIR and change nothing real.

    The overlays start with a ``oneadmin`` user (the machine's own where it has one, else uid 9869 as
    OpenNebula's packages make it: :func:`oneadmin_ids`), OpenNebula's KVM VMM actions that the
    suite wraps, and the recording stand-ins for ``onehost`` and ``systemctl`` on ``PATH``; with
    ``systemd=True`` also ``/run/systemd/system``, which says systemd manages the machine.
    """

    def __init__(self, top: Path, systemd: bool = False) -> None:
        from test_install_staged import OPENNEBULA_DIRS, ORIGINAL, UPSTREAM_CONFIG, wrapped_actions

        self.top = top
        for name in OVERLAID:
            (top / name / "upper").mkdir(parents=True)
            (top / name / "work").mkdir()
        etc = self.upper("/etc")
        etc.mkdir(parents=True, exist_ok=True)
        passwd = Path("/etc/passwd").read_text()
        group = Path("/etc/group").read_text()
        uid, gid = oneadmin_ids()
        if not any(line.startswith("oneadmin:") for line in passwd.splitlines()):
            passwd += f"oneadmin:x:{uid}:{gid}::/var/lib/one:/bin/sh\n"
        if not any(line.startswith("oneadmin:") for line in group.splitlines()):
            group += f"oneadmin:x:{gid}:\n"
        (etc / "passwd").write_text(passwd)
        (etc / "group").write_text(group)
        for directory in OPENNEBULA_DIRS:
            self.upper("/" + directory).mkdir(parents=True, exist_ok=True)
        if not Path("/etc/one/oned.conf").exists():  # a frontend has OpenNebula's own (install.sh edits it)
            one = self.upper("/etc/one")
            one.mkdir(parents=True, exist_ok=True)
            (one / "oned.conf").write_text((UPSTREAM_CONFIG / "oned.conf").read_text())
        for action in wrapped_actions():
            original = self.upper(f"/var/lib/one/remotes/vmm/kvm/{action}")
            original.write_text(ORIGINAL.format(action=action))
            original.chmod(0o755)
        standins = self.upper(STANDIN_DIR)
        (standins / "bin").mkdir(parents=True)
        standins.chmod(0o777)  # onehost runs as oneadmin and writes its record here
        for name, text in (("onehost", ONEHOST_STANDIN), ("systemctl", SYSTEMCTL_STANDIN)):
            (standins / "bin" / name).write_text(text)
            (standins / "bin" / name).chmod(0o755)
        if systemd:
            self.upper("/run/systemd/system").mkdir(parents=True)

    def upper(self, path: str) -> Path:
        """Where ``path`` (under one of the overlaid trees) is written."""
        top, _, rest = path.lstrip("/").partition("/")
        return self.top / top / "upper" / rest

    def run(self, *args: str, command: tuple[str, ...] = ("sh", str(SCRIPT))) -> subprocess.CompletedProcess[str]:
        """``command ARGS`` (default: install.sh) in the frontend, as root."""
        mounts = " && ".join(f"mount -t overlay overlay -o lowerdir=/{name},upperdir={self.top}/{name}/upper,"
                             f"workdir={self.top}/{name}/work /{name}" for name in OVERLAID)
        env = {key: value for key, value in os.environ.items() if key not in ("DESTDIR", "PYTHONPATH", "ONE_XMLRPC")}
        env["PATH"] = f"{STANDIN_DIR}/bin:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               f"{mounts} || exit 97; exec \"$@\"", "sh", *command, *args],
                              capture_output=True, text=True, env=env, timeout=300, check=False)

    def calls(self, name: str) -> list[str]:
        record = self.upper(f"{STANDIN_DIR}/{name}.calls")
        return record.read_text().splitlines() if record.exists() else []

    def standin_file(self, name: str) -> Path:
        return self.upper(f"{STANDIN_DIR}/{name}")


def _live_frontend(tmp_path: Path, systemd: bool = False) -> LiveFrontend:
    needs.root("mounts overlays in a private mount namespace")
    needs.tool("unshare", hint="util-linux")
    needs.tool("runuser", hint="util-linux")
    probe = tmp_path / "overlay-probe"
    for part in ("lower", "upper", "work", "mnt"):
        (probe / part).mkdir(parents=True)
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "-t", "overlay", "overlay",
                             "-o", f"lowerdir={probe}/lower,upperdir={probe}/upper,workdir={probe}/work",
                             str(probe / "mnt")], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        needs.unavailable(f"no private mount namespace with overlayfs here: {result.stderr.strip()}")
    return LiveFrontend(tmp_path / "frontend", systemd=systemd)


def test_sync_runs_onehost_once_as_oneadmin_after_everything_is_installed(tmp_path: Path) -> None:
    """``--sync`` runs OpenNebula's ``onehost sync --force`` as oneadmin once the installation is in
    place (and again after ``--uninstall --sync``, so the hosts lose the suite). The ``onehost`` on
    PATH is a stand-in that records the call only (argv, uid, gid, HOME, cwd, ONE_XMLRPC, and whether
    the install manifest existed at that moment): oned cannot run here."""
    frontend = _live_frontend(tmp_path)
    uid, gid = oneadmin_ids()
    endpoint = "http://127.0.0.1:2633/RPC2"
    result = frontend.run("--no-venv", "--no-hooks", "--sync", "--endpoint", endpoint)
    assert result.returncode == 0, result.stdout + result.stderr
    assert frontend.calls("onehost") == [
        "call sync --force",
        f"uid={uid} gid={gid} home=/var/lib/one cwd=/ xmlrpc={endpoint}",
        "manifest=present",
    ]
    assert frontend.upper("/var/lib/one/remotes/vmm/kvm/deploy.one").exists()
    assert "run 'onehost sync --force'" not in result.stdout  # done, not advised

    removed = frontend.run("--no-venv", "--no-hooks", "--uninstall", "--sync")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert frontend.calls("onehost")[3:] == [
        "call sync --force",
        f"uid={uid} gid={gid} home=/var/lib/one cwd=/ xmlrpc=",
        "manifest=absent",
    ]


def test_failed_sync_is_one_line_and_keeps_the_installation(tmp_path: Path) -> None:
    """A failing ``onehost sync`` (stand-in recording the call only, exiting 255 as OpenNebula's CLI
    does when a host fails) leaves the installation in place and says so in one line, exit 1."""
    frontend = _live_frontend(tmp_path)
    frontend.standin_file("onehost.status").write_text("255\n")
    result = frontend.run("--no-venv", "--no-hooks", "--sync")
    assert result.returncode == 1, result.stdout + result.stderr
    assert frontend.calls("onehost")[0] == "call sync --force"
    ours = [line for line in result.stderr.splitlines() if line.startswith("install.sh:")]
    assert ours == [result.stderr.splitlines()[-1]]
    assert ours[0].startswith("install.sh: installed, but 'onehost sync --force' failed (exit 255)")
    assert "* gpu-node-01" in result.stderr  # onehost's own words, naming the host, are kept
    manifest_path = frontend.upper("/var/lib/one/aifactory/install-manifest.json")
    installed = json.loads(manifest_path.read_text())
    deploy = frontend.upper("/var/lib/one/remotes/vmm/kvm/deploy")
    assert any(item["path"] == "/var/lib/one/remotes/vmm/kvm/deploy" for item in installed["files"])
    assert "aifactory" in deploy.read_text()


def test_dry_run_sync_prints_the_command_and_runs_nothing(tmp_path: Path) -> None:
    """``--dry-run --sync`` shows the exact command; the recording onehost stand-in is not called."""
    frontend = _live_frontend(tmp_path)
    result = frontend.run("--no-venv", "--no-hooks", "--sync", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    runuser = shutil.which("runuser")
    assert f"+ {runuser} -u oneadmin -- {STANDIN_DIR}/bin/onehost sync --force" in result.stdout.splitlines()
    assert frontend.calls("onehost") == []
    assert not frontend.upper("/var/lib/one/aifactory").exists()


@pytest.mark.parametrize("args, message", [
    (("--destdir", "/nonexistent/aifactory-test", "--sync"), "--sync cannot be used with DESTDIR"),
    (("--uninstall", "--enable-hook-server"), "--enable-hook-server cannot be combined with --uninstall"),
    (("--endpoint", "http://oned:2633/RPC2;reboot"), "--endpoint: unexpected characters"),
])
def test_refused_combinations_change_nothing(args: tuple[str, ...], message: str) -> None:
    result = _run(*args, "--no-hooks", "--no-venv")
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr.splitlines() == [result.stderr.splitlines()[0]] and message in result.stderr
    assert not Path("/nonexistent/aifactory-test").exists()


HOOK_SERVER_UNIT = "/etc/systemd/system/aifactory-hook-server.service"


def _changing_calls(frontend: LiveFrontend) -> list[str]:
    return [call for call in frontend.calls("systemctl") if not call.startswith(("is-enabled", "is-active"))]


def test_enable_hook_server_is_a_step_of_the_install_and_undone_by_uninstall(tmp_path: Path) -> None:
    """``--enable-hook-server`` on a machine systemd manages: the unit is installed, systemd reloaded,
    the service enabled and started; a later run that changes the suite restarts it; ``--uninstall``
    stops and disables it while its unit file is still there, then removes it and reloads. The
    ``systemctl`` on PATH is a stand-in that records the calls only (systemd does not run here)."""
    frontend = _live_frontend(tmp_path, systemd=True)
    result = frontend.run("--no-venv", "--no-hooks", "--enable-hook-server")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _changing_calls(frontend) == ["daemon-reload (unit-present)",
                                         "enable --now aifactory-hook-server.service (unit-present)"]
    unit = frontend.upper(HOOK_SERVER_UNIT).read_text()
    assert "ExecStart=/opt/aifactory/venv/bin/aifactory hook-server" in unit
    record = json.loads(frontend.upper("/var/lib/one/aifactory/install-manifest.json").read_text())
    assert record["hook_server"] is True
    doctor = frontend.run("--no-hooks", command=(sys.executable, "-m", "aifactory_core.install.frontend_doctor"))
    assert "PASS  hook-server: aifactory-hook-server.service running" in doctor.stdout.splitlines(), doctor.stdout

    again = frontend.run("--no-venv", "--no-hooks", "--enable-hook-server")
    assert again.returncode == 0 and "nothing to change" in again.stdout, again.stdout + again.stderr
    assert len(_changing_calls(frontend)) == 2  # enabled and active: left alone

    hook = next(path for path in frontend.upper("/var/lib/one/remotes/hooks/aifactory").iterdir())
    hook.unlink()  # the suite changes (here: a hook executable is missing): the server must restart
    changed = frontend.run("--no-venv", "--no-hooks")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert _changing_calls(frontend)[2:] == ["try-restart aifactory-hook-server.service (unit-present)"]

    rebuilt = frontend.run("--no-hooks", "--dry-run")  # the environments would be rebuilt: so would it restart
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "would systemctl try-restart aifactory-hook-server.service (once committed)" in rebuilt.stdout
    assert len(_changing_calls(frontend)) == 3

    removed = frontend.run("--no-venv", "--no-hooks", "--uninstall")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert _changing_calls(frontend)[3:] == ["disable --now aifactory-hook-server.service (unit-present)",
                                             "daemon-reload (unit-absent)"]
    assert not frontend.upper(HOOK_SERVER_UNIT).exists()


def test_hook_server_that_cannot_start_rolls_the_install_back(tmp_path: Path) -> None:
    """``systemctl enable --now`` failing (the recording stand-in told to fail) undoes the whole run."""
    frontend = _live_frontend(tmp_path, systemd=True)
    frontend.standin_file("systemctl.fail").write_text("enable\n")
    result = frontend.run("--no-venv", "--no-hooks", "--enable-hook-server")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "install.sh: systemctl enable --now aifactory-hook-server.service: Failed to enable unit" in result.stderr
    assert "rolled back" in result.stderr
    assert _changing_calls(frontend) == ["daemon-reload (unit-present)",
                                         "enable --now aifactory-hook-server.service (unit-present)",
                                         "daemon-reload (unit-absent)"]  # the rollback's, once the unit is gone
    assert not frontend.upper(HOOK_SERVER_UNIT).exists()
    assert not frontend.upper("/var/lib/one/aifactory/install-manifest.json").exists()
    assert frontend.upper("/var/lib/one/remotes/vmm/kvm/deploy").read_text().startswith("#!/bin/sh\n# OpenNebula's")


def test_enable_hook_server_dry_run_and_refusals(tmp_path: Path) -> None:
    """The dry run shows the systemctl steps and calls none (recording stand-in); without systemd the
    option is refused before anything changes; staged (DESTDIR), the unit is installed, not enabled."""
    frontend = _live_frontend(tmp_path, systemd=True)
    dry = frontend.run("--no-venv", "--no-hooks", "--enable-hook-server", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "would systemctl daemon-reload" in dry.stdout.splitlines()
    assert "would systemctl enable --now aifactory-hook-server.service" in dry.stdout.splitlines()
    assert frontend.calls("systemctl") == []

    no_systemd = _live_frontend(tmp_path / "no-systemd")
    refused = no_systemd.run("--no-venv", "--no-hooks", "--enable-hook-server")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.startswith("install.sh: --enable-hook-server: this machine is not managed by systemd")
    assert no_systemd.calls("systemctl") == []
    assert not no_systemd.upper("/var/lib/one/aifactory").exists()

    root = tmp_path / "staged"
    root.mkdir()
    staged = _run("--destdir", str(root), "--no-venv", "--no-hooks", "--enable-hook-server")
    assert staged.returncode == 0, staged.stdout + staged.stderr
    assert (root / HOOK_SERVER_UNIT.lstrip("/")).is_file()
    assert "aifactory-hook-server.service not enabled (a staged tree)" in staged.stdout
    assert "hook_server" not in json.loads((root / "var/lib/one/aifactory/install-manifest.json").read_text())


def test_hook_server_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """The unit as the installer writes it (ExecStart under --prefix) passes ``systemd-analyze verify``
    with no warning; the prefix here holds a ``venv`` that is this checkout's environment."""
    analyze = needs.tool("systemd-analyze", hint="apt-get install -y systemd")
    from aifactory_core.install import manifest

    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "venv").symlink_to(Path(sys.prefix))
    entry = next(entry for entry in manifest.discover(REPO, str(prefix)) if entry.destination == HOOK_SERVER_UNIT)
    unit = tmp_path / "aifactory-hook-server.service"
    unit.write_bytes(entry.content)
    assert f"ExecStart={prefix}/venv/bin/aifactory hook-server" in unit.read_text()
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stdout + result.stderr
    broken = tmp_path / "broken" / unit.name
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace("Type=simple", "Type=simple\nRestartSecs=2"))
    warned = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True, check=False, timeout=60)
    assert "Unknown key" in warned.stderr  # the check would see a mistake


def test_hosts_interpreter_link_survives_an_environment_made_by_a_versioned_interpreter(tmp_path: Path) -> None:
    """``PYTHON=python3.X``: venv makes ``bin/python3.X`` the real link and ``bin/python3`` a link to
    it; the hosts' environment drops the versioned name and must keep a working ``bin/python3``."""
    versioned = Path(f"/usr/bin/python3.{sys.version_info.minor}")
    if not versioned.exists():
        needs.unavailable(f"{versioned} missing")
    root = tmp_path / "root"
    env = {key: value for key, value in os.environ.items() if key not in ("DESTDIR", "PYTHONPATH")}
    done = subprocess.run(["sh", str(SCRIPT), "--destdir", str(root), "--no-hooks"], capture_output=True, text=True,
                          timeout=900, env={**env, "PYTHON": str(versioned)}, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    python = root / "var/lib/one/remotes/aifactory/venv/bin/python3"
    ran = subprocess.run([str(python), "-c", "import aifactory_core.vmm, lxml; print('ok')"], capture_output=True,
                         text=True, check=False)
    assert ran.stdout.strip() == "ok", ran.stderr
