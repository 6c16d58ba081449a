"""``aifactory host-setup`` on a staged host root, and ``repair --boot`` on a generated host.

The staged host holds what ``onehost sync`` leaves on a host: a real Python environment (made by
``python -m venv --copies``, scripts naming ``/var/tmp/one/aifactory/venv`` the way the installer
builds them, owned by another user and group-writable as oneadmin's copy may be) and the synced
``aifactory/host/{sudoers,systemd}`` files as the installer's manifest ships them.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import needs
import pytest
from hostroots import run_cli
from simkernel import SimulatedDriverCore

from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot
from aifactory_core.install import host_setup, layout, manifest, stage
from aifactory_core.lifecycle import executor, ownership
from aifactory_core.lifecycle.journal import Journal
from aifactory_core.lifecycle.repair import repair
from aifactory_core.model import Action

REPO = Path(__file__).resolve().parents[1]
SYNCED_ENV = layout.HOST_ENV_ON_HOSTS
HELPER_SCRIPT = f"#!{SYNCED_ENV}/bin/python3\nimport sys\nprint(sys.prefix)\n"
INSTALLED = ("etc/sudoers.d/aifactory", "etc/systemd/system/aifactory-repair.service",
             "usr/local/lib/aifactory/host-setup.json", "usr/local/lib/aifactory/venv")
OTHER_UID = 65534


def snapshot(root: Path) -> dict[str, tuple[int, int, int, bytes | str | None]]:
    """Every path under ``root`` with its mode, owner, group and content (link target)."""
    found: dict[str, tuple[int, int, int, bytes | str | None]] = {}
    for directory, subdirs, names in os.walk(root):
        for name in [*subdirs, *names]:
            path = Path(directory) / name
            info = path.lstat()
            content: bytes | str | None = None
            if stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                content = path.read_bytes()
            found[path.relative_to(root).as_posix()] = (info.st_mode, info.st_uid, info.st_gid, content)
    return found


MARKER_MTIME_NS = 1_700_000_000_123_456_789


def synced_host(root: Path) -> Path:
    """A host root as ``onehost sync`` leaves it (environment and host files)."""
    env = root / SYNCED_ENV.lstrip("/")
    env.parent.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--copies", str(env)], check=True)
    for name in ("aifactory-root-helper", "aifactory"):
        script = env / "bin" / name
        script.write_text(HELPER_SCRIPT)
        script.chmod(0o775)  # group-writable, as oneadmin's copy may be
    (env / "lib" / "marker.txt").write_text("synced\n")
    (env / "lib" / "marker.txt").chmod(0o666)
    os.utime(env / "lib" / "marker.txt", ns=(MARKER_MTIME_NS, MARKER_MTIME_NS))
    for entry in manifest.discover(REPO):
        if entry.kind == manifest.HOST_DATA:
            target = root / entry.destination.replace(layout.Layout().remotes, layout.HOST_REMOTES, 1).lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(entry.content)
    if os.geteuid() == 0:
        for directory, subdirs, names in os.walk(root / "var"):
            for name in [*subdirs, *names]:
                os.lchown(Path(directory) / name, OTHER_UID, OTHER_UID)
    return root


def setup_cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("host-setup", "--destdir", str(root), *args)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return synced_host(tmp_path / "root")


def test_manifest_ships_the_host_files_to_the_remotes() -> None:
    shipped = {entry.destination: entry for entry in manifest.discover(REPO) if entry.kind == manifest.HOST_DATA}
    assert set(shipped) == {f"{layout.Layout().host_files}/sudoers/aifactory",
                            f"{layout.Layout().host_files}/systemd/aifactory-repair.service"}
    assert all(entry.mode == 0o644 for entry in shipped.values())


def test_staged_setup_installs_root_owned_files_and_a_working_environment(root: Path) -> None:
    result = setup_cli(root)
    assert result.returncode == 0, result.stdout + result.stderr
    sudoers = root / "etc/sudoers.d/aifactory"
    assert sudoers.read_bytes() == (REPO / "drivers/sudoers/aifactory").read_bytes()
    assert stat.S_IMODE(sudoers.stat().st_mode) == 0o440
    unit = root / "etc/systemd/system/aifactory-repair.service"
    assert unit.read_bytes() == (REPO / "drivers/systemd/aifactory-repair.service").read_bytes()
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    env = root / host_setup.ROOT_ENV.lstrip("/")
    helper = env / "bin/aifactory-root-helper"
    assert helper.read_text().splitlines()[0] == f"#!{host_setup.ROOT_ENV}/bin/python3"
    assert stat.S_IMODE(helper.stat().st_mode) == 0o755
    assert stat.S_IMODE((env / "lib/marker.txt").stat().st_mode) == 0o644
    # the source's modification times, which keep the compiled modules beside each source valid
    assert (env / "lib/marker.txt").stat().st_mtime_ns == MARKER_MTIME_NS
    # the copy is an environment of its own: its interpreter's prefix is the copy, not the synced tree
    prefix = subprocess.run([str(env / "bin/python3"), str(helper)], capture_output=True, text=True, check=True)
    assert Path(prefix.stdout.strip()) == env
    assert "not enabled (a staged tree)" in result.stdout
    if os.geteuid() == 0:  # the source belongs to another user; the copy to root, nothing writable by others
        assert host_setup.unsafe_paths(env) == []
        for path in (sudoers, unit):
            assert (path.stat().st_uid, path.stat().st_gid) == (0, 0)
    for relative in INSTALLED:
        assert (root / relative).exists(), relative


def test_second_run_changes_nothing_and_a_changed_source_is_recopied(root: Path) -> None:
    assert setup_cli(root).returncode == 0
    before = snapshot(root)
    again = setup_cli(root)
    assert again.returncode == 0 and "nothing to change" in again.stdout, again.stdout
    assert snapshot(root) == before
    env = root / host_setup.ROOT_ENV.lstrip("/")
    (root / SYNCED_ENV.lstrip("/") / "lib/marker.txt").write_text("newer\n")
    updated = setup_cli(root)
    assert updated.returncode == 0 and f"install {env}" in updated.stdout, updated.stdout
    assert (env / "lib/marker.txt").read_text() == "newer\n"
    assert not list(env.parent.glob(".venv.aifactory-*"))  # the previous copy is gone after the swap


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership of the copy is only enforced as root")
def test_a_copy_made_writable_by_others_is_replaced(root: Path) -> None:
    assert setup_cli(root).returncode == 0
    lib = root / host_setup.ROOT_ENV.lstrip("/") / "lib"
    lib.chmod(0o777)
    result = setup_cli(root)
    assert result.returncode == 0 and "nothing to change" not in result.stdout
    assert stat.S_IMODE(lib.stat().st_mode) == 0o755


def test_dry_run_prints_every_step_and_changes_nothing(root: Path) -> None:
    before = snapshot(root)
    result = setup_cli(root, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert snapshot(root) == before
    for relative in ("usr/local/lib/aifactory/venv", "etc/sudoers.d/aifactory",
                     "etc/systemd/system/aifactory-repair.service", "usr/local/lib/aifactory/host-setup.json"):
        assert f"{root}/{relative}" in result.stdout, relative
    assert all(line.startswith(("would ", "note: ")) for line in result.stdout.splitlines()), result.stdout


def test_uninstall_removes_exactly_what_was_installed(root: Path) -> None:
    (root / "etc/sudoers.d").mkdir(parents=True)
    (root / "etc/sudoers.d/admin").write_text("# the admin's own\n")
    before = snapshot(root)
    assert setup_cli(root).returncode == 0
    result = setup_cli(root, "--uninstall")
    assert result.returncode == 0, result.stdout + result.stderr
    assert snapshot(root) == before
    again = setup_cli(root, "--uninstall")
    assert again.returncode == 2 and "nothing to uninstall" in again.stderr


def test_a_sudoers_snippet_visudo_refuses_rolls_everything_back(root: Path, tmp_path: Path) -> None:
    assert setup_cli(root).returncode == 0
    (root / SYNCED_ENV.lstrip("/") / "lib/marker.txt").write_text("newer\n")  # an environment update first
    source = tmp_path / "source"
    shutil.copytree(REPO / "drivers", source / "drivers")
    (source / "drivers/sudoers/aifactory").write_text("oneadmin ALL=(root) NOPASSWD: not a command list [\n")
    before = snapshot(root)
    result = setup_cli(root, "--source", str(source))
    assert result.returncode == 1
    assert "refused by visudo -cf" in result.stderr and "rolled back" in result.stderr
    assert snapshot(root) == before


def test_a_failure_on_a_fresh_host_leaves_nothing(root: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(REPO / "drivers", source / "drivers")
    (source / "drivers/sudoers/aifactory").write_text("oneadmin ALL=(root) NOPASSWD: not a command list [\n")
    before = snapshot(root)
    result = setup_cli(root, "--source", str(source))
    assert result.returncode == 1 and "rolled back" in result.stderr
    assert snapshot(root) == before


def test_without_visudo_the_snippet_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(stage, "VISUDO_PATHS", ())
    with pytest.raises(host_setup.InstallError, match="visudo not found"):
        stage.validate_sudoers((REPO / "drivers/sudoers/aifactory").read_bytes(), Path("/etc/sudoers.d/aifactory"),
                               staged=False)


def test_a_rollback_reloads_systemd_after_the_unit_file_is_put_back(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    from aifactory_core.install import systemd
    from aifactory_core.install.stage import Transaction

    events: list[str] = []

    def systemctl(*argv: str) -> subprocess.CompletedProcess[str]:
        events.append(" ".join(argv))
        return subprocess.CompletedProcess(["systemctl", *argv], 1 if argv[0] == "is-enabled" else 0, "", "")

    monkeypatch.setattr(systemd, "running", lambda target: True)
    monkeypatch.setattr(systemd, "systemctl", systemctl)
    tx = Transaction(out=io.StringIO())
    tx.step("install the unit", lambda: events.append("unit written"), lambda: events.append("unit restored"))
    assert host_setup.enable_unit(tx, layout.Layout(Path("/")), True, [])
    assert tx.rollback() == []
    assert events == ["unit written", "daemon-reload", "is-enabled --quiet aifactory-repair.service",
                      "enable aifactory-repair.service", "disable aifactory-repair.service", "unit restored",
                      "daemon-reload"]


def test_a_missing_synced_tree_is_a_usage_error(tmp_path: Path) -> None:
    result = setup_cli(tmp_path)
    assert result.returncode == 2 and "onehost sync --force" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unit_runs_repair_boot_from_the_root_owned_environment_before_libvirt(tmp_path: Path) -> None:
    text = (REPO / "drivers/systemd/aifactory-repair.service").read_text()
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).extend(value.split())
    assert settings["Type"] == ["oneshot"]
    assert settings["ExecStart"] == [f"{host_setup.ROOT_ENV}/bin/aifactory", "repair", "--boot"]
    assert {"libvirtd.service", "libvirtd.socket", "virtqemud.service"} <= set(settings["Before"])
    assert {"local-fs.target", "systemd-modules-load.service"} <= set(settings["After"])
    assert int(settings["TimeoutStartSec"][0]) > 0 and settings["WantedBy"] == ["multi-user.target"]
    analyze = needs.tool("systemd-analyze", hint="apt-get install -y systemd")
    # verify resolves ExecStart on this machine: point it at an executable that exists here
    unit = tmp_path / "aifactory-repair.service"
    unit.write_text(text.replace(f"{host_setup.ROOT_ENV}/bin/aifactory", "/bin/true"))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


# repair --boot ------------------------------------------------------------------------------------

GPU = "0000:1b:00.0"
NIC = "0000:01:00.0"


@pytest.fixture
def host(tmp_path: Path) -> HostRoot:
    from hostroots import generate_host

    return HostRoot(generate_host("dgx-h100", tmp_path / "root"), tmp_path / "state")


def _driver(host: HostRoot, address: str) -> str | None:
    return HostInventory(host).pci[address].driver


def test_repair_boot_gives_back_the_devices_of_a_prepared_vm(host: HostRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    SimulatedDriverCore().install(monkeypatch)
    original = {address: _driver(host, address) for address in (GPU, NIC)}
    assert original == {GPU: "nvidia", NIC: "ixgbe"}
    executor.prepare(host, 7, [Action("pci_driver", address, "vfio-pci", driver or "", "VM 7")
                               for address, driver in original.items()])
    assert {address: _driver(host, address) for address in original} == {GPU: "vfio-pci", NIC: "vfio-pci"}
    running = repair(host)  # while VMs may run, a prepared VM keeps its devices
    assert running.kept == [7] and _driver(host, GPU) == "vfio-pci"
    booted = repair(host, boot=True)
    assert booted.released == [7] and booted.kept == [] and booted.problems == []
    assert {address: _driver(host, address) for address in original} == original
    assert ownership.held_devices(host) == {} and Journal.load(host, 7) is None


def test_repair_boot_option_reaches_the_command_line(tmp_path: Path) -> None:
    empty = HostRoot(tmp_path, tmp_path / "state")
    result = run_cli("--host-root", str(empty.root), "repair", "--boot",
                     env={"AIFACTORY_STATE_DIR": str(empty.state_dir)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["rolled back: none", "released: none"]


@pytest.mark.skipif(os.geteuid() != 0, reason="hands files from root to the state dir's owner")
def test_what_root_writes_in_the_state_dir_belongs_to_its_owner_from_the_start(host: HostRoot,
                                                                              tmp_path: Path) -> None:
    """A file or directory root creates in the state dir is the dir owner's as it is made (through
    its descriptor), so the drivers and probes can read and replace it; nothing walks the state dir
    afterwards to hand it back, and nothing outside is touched."""
    from aifactory_core.lifecycle.atomic import write_atomic

    host.state_dir.mkdir()
    os.chown(host.state_dir, OTHER_UID, OTHER_UID)
    write_atomic(host.state_dir / "quarantine" / GPU, b"reset failed\n")  # as a root repair writes it
    for relative in ("quarantine", f"quarantine/{GPU}"):
        info = (host.state_dir / relative).stat()
        assert (info.st_uid, info.st_gid) == (OTHER_UID, OTHER_UID)
    outside = tmp_path / "outside"
    outside.write_text("root's\n")
    os.link(outside, host.state_dir / "planted")  # a hard link to a file outside: not handed over
    (host.state_dir / "link").symlink_to(outside)
    write_atomic(host.state_dir / "quarantine" / GPU, b"reset failed again\n")
    assert (outside.stat().st_uid, outside.stat().st_gid) == (0, 0)


def test_a_link_out_of_the_synced_environment_is_refused(root: Path) -> None:
    env = root / SYNCED_ENV.lstrip("/")
    (env / "lib" / "escape").symlink_to("../../../../../../etc")
    before = snapshot(root)
    result = setup_cli(root)
    assert result.returncode == 1 and "a link out of the environment" in result.stderr, result.stderr
    assert snapshot(root) == before
    (env / "lib" / "escape").unlink()
    (env / "lib" / "escape").symlink_to(f"{SYNCED_ENV}/bin/python3")  # back into oneadmin's tree
    assert setup_cli(root).returncode == 1
    assert snapshot(root) == {**before, **{k: v for k, v in snapshot(root).items() if k.endswith("lib/escape")}}


def test_an_identical_snippet_already_in_place_is_left_to_its_owner(root: Path) -> None:
    """A host that is also the frontend has the installer's snippet: host-setup neither claims nor removes it."""
    snippet = root / "etc/sudoers.d/aifactory"
    snippet.parent.mkdir(parents=True)
    shutil.copy(REPO / "drivers/sudoers/aifactory", snippet)
    snippet.chmod(0o440)
    result = setup_cli(root)
    assert result.returncode == 0 and "/etc/sudoers.d/aifactory already in place" in result.stdout
    assert setup_cli(root, "--uninstall").returncode == 0
    assert snippet.read_bytes() == (REPO / "drivers/sudoers/aifactory").read_bytes()
    assert not (root / "etc/systemd/system/aifactory-repair.service").exists()


def test_end_to_end_from_install_sh_through_onehost_sync(tmp_path: Path) -> None:
    """install.sh builds the host environment (pip), the remotes are copied as ``onehost sync`` does
    (``rsync -La``), the synced ``aifactory host-setup`` installs the root-owned copy, and the copy's
    root helper and ``repair --boot`` run from it."""
    frontend = tmp_path / "frontend"
    env = {key: value for key, value in os.environ.items() if key not in ("DESTDIR", "PYTHONPATH")}
    built = subprocess.run(["sh", str(REPO / "install.sh"), "--destdir", str(frontend), "--no-hooks"],
                           capture_output=True, text=True, timeout=900, env=env, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    host = tmp_path / "host"
    synced = host / layout.HOST_REMOTES.lstrip("/")
    synced.mkdir(parents=True)
    remotes = frontend / layout.Layout().remotes.lstrip("/")
    if shutil.which("rsync"):
        subprocess.run(["rsync", "-La", "--delete", f"{remotes}/", f"{synced}/"], check=True)
    else:
        shutil.copytree(remotes, synced, symlinks=False, dirs_exist_ok=True)
    synced_python = synced / "aifactory/venv/bin/python3"
    result = subprocess.run([str(synced_python), "-m", "aifactory_core.cli", "host-setup", "--destdir", str(host)],
                            capture_output=True, text=True, env=env, check=False, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    copy = host / host_setup.ROOT_ENV.lstrip("/")
    helper = copy / "bin/aifactory-root-helper"
    assert helper.read_text().splitlines()[0] == f"#!{host_setup.ROOT_ENV}/bin/python3"
    if os.geteuid() == 0:
        assert host_setup.unsafe_paths(copy) == []
    refused = subprocess.run([str(copy / "bin/python3"), str(helper), "set-driver", "../../etc", "none"],
                             capture_output=True, text=True, env=env, check=False)
    assert refused.returncode == 2 and "invalid" in refused.stderr.lower() + refused.stdout.lower(), refused.stderr
    repaired = subprocess.run([str(copy / "bin/python3"), str(copy / "bin/aifactory"), "--host-root", str(tmp_path),
                               "repair", "--boot"], capture_output=True, text=True, check=False,
                              env={**env, "AIFACTORY_CONFIG": os.devnull, "AIFACTORY_STATE_DIR": str(tmp_path / "s")})
    assert repaired.returncode == 0 and "released: none" in repaired.stdout, repaired.stderr
    again = subprocess.run([str(synced_python), "-m", "aifactory_core.cli", "host-setup", "--destdir", str(host)],
                           capture_output=True, text=True, env=env, check=False, timeout=300)
    assert again.returncode == 0 and "nothing to change" in again.stdout, again.stdout + again.stderr
