"""install.sh into a staged frontend (DESTDIR), hooks registered through pyone against the
XML-RPC test server (answers validated against OpenNebula's hook.xsd/hook_pool.xsd).

The staged root starts as a small stand-in for a clean OpenNebula frontend: the KVM VMM actions the
suite wraps, as OpenNebula's source tree has them (``src/vmm_mad/remotes/kvm/<action>``, installed
by OpenNebula's install.sh to ``/var/lib/one/remotes/vmm/kvm``), each a tiny recorder script. The
Python environments are not built here (``--no-venv``): the suite runs from this checkout, as
``test_install_script.py``'s full install shows the environments themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import needs
import pytest
from onetestserver import OneTestServer

from aifactory_core.install import manifest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "install.sh"
# Where OpenNebula's own install.sh (VAR_LOCATION=/var/lib/one) puts the remotes the suite extends:
#   src/vmm_mad/remotes/kvm:"$VAR_LOCATION"/remotes/vmm/kvm
#   src/im_mad/remotes/kvm-probes.d/host/system:"$VAR_LOCATION"/remotes/im/kvm-probes.d/host/system
#   src/im_mad/remotes/kvm-probes.d/vm/monitor:"$VAR_LOCATION"/remotes/im/kvm-probes.d/vm/monitor
#   IM_PROBES_QEMU_HOST_SYSTEM_FILES:$VAR_LOCATION/remotes/im/qemu-probes.d/host/system (and vm/monitor)
#   src/vnm_mad/remotes/<driver>:"$VAR_LOCATION"/remotes/vnm/<driver>:clean.d,post.d,pre.d
#   share/hooks/ft:"$VAR_LOCATION"/remotes/hooks/ft   (onehem-server.conf :hook_base_path)
OPENNEBULA_DIRS = (
    "var/lib/one/remotes/vmm/kvm",
    "var/lib/one/remotes/im/kvm-probes.d/host/system",
    "var/lib/one/remotes/im/kvm-probes.d/host/monitor",
    "var/lib/one/remotes/im/kvm-probes.d/vm/monitor",
    "var/lib/one/remotes/im/qemu-probes.d/host/system",
    "var/lib/one/remotes/im/qemu-probes.d/host/monitor",
    "var/lib/one/remotes/im/qemu-probes.d/vm/monitor",
    "var/lib/one/remotes/hooks",
    *(f"var/lib/one/remotes/vnm/{driver}/{phase}.d/" for driver in ("802.1Q", "bridge", "dummy", "fw", "ovswitch",
                                                                   "ovswitch_vxlan", "vxlan")
      for phase in ("pre", "post", "clean")),
)
ORIGINAL = """#!/bin/sh
# OpenNebula's {action} (test stand-in): records argv and stdin, prints a deploy id
printf '%s\\n' "$@" > "$(dirname "$0")/{action}.argv"
cat > "$(dirname "$0")/{action}.stdin"
echo 6f1c2c1e-5d0a-4d43-9a53-7d0c6f1b2a42
"""
DOMAIN = """<domain type='kvm'><name>one-42</name><memory>1048576</memory><vcpu>2</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type></os><devices/>
<metadata><one:vm xmlns:one='http://opennebula.org/xmlns/libvirt/1.0'>
<one:uid>5</one:uid><one:gid>100</one:gid><one:uname>alice</one:uname><one:gname>tenant-a</one:gname>
</one:vm></metadata></domain>"""


def wrapped_actions() -> list[str]:
    return sorted(path.name for path in (REPO / "drivers" / "vmm" / "kvm").iterdir() if path.is_file())


def clean_frontend(root: Path) -> Path:
    kvm = root / "var/lib/one/remotes/vmm/kvm"
    kvm.mkdir(parents=True)
    for action in wrapped_actions():
        (kvm / action).write_text(ORIGINAL.format(action=action))
        (kvm / action).chmod(0o755)
    (root / "var/lib/one/remotes/VERSION").write_text("7.0.2\n")
    return root


def snapshot(root: Path, directory_times: bool = False) -> dict[str, tuple[int, str, int]]:
    """Every path under root: (mode, sha256 of the content or '' for a directory, mtime_ns).

    A directory's mtime changes when an entry is added and removed again, so it is compared only
    where nothing at all may have happened (``directory_times``).
    """
    result: dict[str, tuple[int, str, int]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        mtime = info.st_mtime_ns if path.is_file() or directory_times else 0
        result[str(path.relative_to(root))] = (stat.S_IMODE(info.st_mode), digest, mtime)
    return result


@pytest.fixture
def auth(tmp_path: Path) -> Path:
    path = tmp_path / "one_auth"
    path.write_text("oneadmin:opennebula\n")
    return path


def install(root: Path, auth: Path, *args: str, endpoint: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "ONE_AUTH": str(auth)}
    env.pop("DESTDIR", None)
    extra = ["--endpoint", endpoint] if endpoint else ["--no-hooks"]
    return subprocess.run(["sh", str(SCRIPT), "--no-venv", "--destdir", str(root), *extra, *args],
                          capture_output=True, text=True, timeout=120, env=env, check=False)


def template_names() -> list[str]:
    return sorted(template.name for template in manifest.hook_templates(REPO))


def test_staged_install_matches_opennebulas_layout_and_registers_hooks(tmp_path: Path, auth: Path,
                                                                       one_server: OneTestServer) -> None:
    root = clean_frontend(tmp_path / "root")
    result = install(root, auth, endpoint=one_server.endpoint)
    assert result.returncode == 0, result.stdout + result.stderr

    for entry in manifest.discover(REPO):
        if entry.kind in (manifest.FILE, manifest.WRAPPER) and "/remotes/" in entry.destination:
            relative = entry.destination.lstrip("/")
            assert relative.startswith(OPENNEBULA_DIRS), relative
            assert os.access(root / relative, os.X_OK), relative
    kvm = root / "var/lib/one/remotes/vmm/kvm"
    for action in wrapped_actions():
        assert (kvm / action).read_bytes() == (REPO / "drivers/vmm/kvm" / action).read_bytes()
        assert (kvm / f"{action}.one").read_text() == ORIGINAL.format(action=action)
    for phase in ("pre", "post", "clean"):  # the VXLAN drivers run their hooks as 802.1Q does
        hooks = {driver: root / f"var/lib/one/remotes/vnm/{driver}/{phase}.d/aifactory-network"
                 for driver in ("802.1Q", "vxlan", "ovswitch_vxlan")}
        assert len({hook.read_bytes() for hook in hooks.values()}) == 1, phase
        assert all(os.access(hook, os.X_OK) for hook in hooks.values()), phase
    probe = root / "var/lib/one/remotes/im/kvm-probes.d/host/system/aifactory-gpu"
    assert probe.read_text().splitlines()[0] == "#!/var/tmp/one/aifactory/venv/bin/python3 -S"  # probes keep -S
    sudoers = root / "etc/sudoers.d/aifactory"
    assert stat.S_IMODE(sudoers.stat().st_mode) == 0o440
    assert stat.S_IMODE((root / "var/lib/one/aifactory").stat().st_mode) == 0o750
    assert (root / "etc/one/aifactory.conf").read_text() == manifest.DEFAULT_CONFIG

    registered = {name: attributes for name, _kind, attributes in one_server.hooks.values()}
    assert sorted(registered) == template_names()
    for attributes in registered.values():  # COMMAND is relative to onehem's :hook_base_path
        command = root / "var/lib/one/remotes/hooks" / attributes["COMMAND"]
        assert os.access(command, os.X_OK), attributes["COMMAND"]
        assert attributes["ARGUMENTS_STDIN"] == "YES"
    assert "onehost sync --force" in result.stdout
    record = json.loads((root / "var/lib/one/aifactory/install-manifest.json").read_text())
    assert sorted(record["hooks"]) == template_names()


def test_second_run_changes_nothing(tmp_path: Path, auth: Path, one_server: OneTestServer) -> None:
    root = clean_frontend(tmp_path / "root")
    assert install(root, auth, endpoint=one_server.endpoint).returncode == 0
    before, writes = snapshot(root, directory_times=True), len(one_server.writes())
    again = install(root, auth, endpoint=one_server.endpoint)
    assert again.returncode == 0, again.stderr
    assert "nothing to change" in again.stdout
    assert snapshot(root, directory_times=True) == before
    assert len(one_server.writes()) == writes  # only one.hookpool.info was called


def test_dry_run_prints_every_action_and_changes_nothing(tmp_path: Path, auth: Path,
                                                         one_server: OneTestServer) -> None:
    root = clean_frontend(tmp_path / "root")
    before = snapshot(root, directory_times=True)
    result = install(root, auth, "--dry-run", endpoint=one_server.endpoint)
    assert result.returncode == 0, result.stderr
    assert snapshot(root, directory_times=True) == before and one_server.writes() == []
    assert f"would keep OpenNebula's deploy as {root}/var/lib/one/remotes/vmm/kvm/deploy.one" in result.stdout
    assert f"would install {root}/etc/sudoers.d/aifactory" in result.stdout
    assert all(f"would allocate hook {name}" in result.stdout for name in template_names())


def test_uninstall_restores_the_staged_root_and_unregisters_the_hooks(tmp_path: Path, auth: Path,
                                                                     one_server: OneTestServer) -> None:
    root = clean_frontend(tmp_path / "root")
    one_server.m_hook_allocate('NAME="site-hook"\nTYPE="api"\nCALL="one.vm.allocate"\nCOMMAND="site/x"')
    before = {path: (mode, digest) for path, (mode, digest, _mtime) in snapshot(root).items()}
    assert install(root, auth, endpoint=one_server.endpoint).returncode == 0
    result = install(root, auth, "--uninstall", endpoint=one_server.endpoint)
    assert result.returncode == 0, result.stderr
    assert {path: (mode, digest) for path, (mode, digest, _mtime) in snapshot(root).items()} == before
    assert [hook[0] for hook in one_server.hooks.values()] == ["site-hook"]


def test_edited_config_is_kept_by_install_upgrade_and_uninstall(tmp_path: Path, auth: Path) -> None:
    root = clean_frontend(tmp_path / "root")
    assert install(root, auth).returncode == 0
    config = root / "etc/one/aifactory.conf"
    config.write_text("[host]\nreserved_cpus = \"0-3\"\n")
    assert install(root, auth).returncode == 0
    assert install(root, auth, "--upgrade").returncode == 0
    assert config.read_text() == "[host]\nreserved_cpus = \"0-3\"\n"
    result = install(root, auth, "--uninstall")
    assert result.returncode == 0 and config.exists()
    assert "kept /etc/one/aifactory.conf: edited since it was installed" in result.stdout


def test_upgrade_reapplies_wrappers_an_opennebula_upgrade_overwrote(tmp_path: Path, auth: Path) -> None:
    root = clean_frontend(tmp_path / "root")
    assert install(root, auth).returncode == 0
    kvm = root / "var/lib/one/remotes/vmm/kvm"
    newer = ORIGINAL.format(action="deploy").replace("test stand-in", "test stand-in, newer release")
    (kvm / "deploy").write_text(newer)  # what a package upgrade does to the remotes
    doctor = frontend_doctor(root)
    assert doctor.returncode == 1 and "vmm/kvm/deploy is not the aifactory wrapper" in doctor.stdout
    result = install(root, auth, "--upgrade")
    assert result.returncode == 0, result.stderr
    assert (kvm / "deploy").read_bytes() == (REPO / "drivers/vmm/kvm/deploy").read_bytes()
    assert (kvm / "deploy.one").read_text() == newer
    assert install(root, auth, "--uninstall").returncode == 0
    assert (kvm / "deploy").read_text() == newer and not (kvm / "deploy.one").exists()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_oned_unreachable_rolls_everything_back(tmp_path: Path, auth: Path) -> None:
    root = clean_frontend(tmp_path / "root")
    before = snapshot(root)
    result = install(root, auth, endpoint=f"http://127.0.0.1:{_closed_port()}/RPC2")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("install.sh: one.hookpool.info:") and "refused" in lines[0].lower()
    assert lines[1] == "install.sh: rolled back: the target is as it was before this run"
    assert snapshot(root) == before


def test_failure_half_way_through_the_files_rolls_back(tmp_path: Path, auth: Path) -> None:
    root = clean_frontend(tmp_path / "root")
    (root / "etc").mkdir()
    (root / "etc/one").write_text("a file where the config directory should be\n")
    before = snapshot(root)
    result = install(root, auth)
    assert result.returncode == 1
    assert "etc/one/aifactory.conf: Not a directory" in result.stderr and "rolled back" in result.stderr
    assert snapshot(root) == before  # the wrappers put in place before the failure were undone


def test_sudoers_snippet_refused_by_visudo_installs_nothing(tmp_path: Path, auth: Path) -> None:
    needs.tool("/usr/sbin/visudo", hint="apt-get install sudo")
    source = tmp_path / "source"
    source.mkdir()
    subprocess.run(["cp", "-a", str(REPO / "drivers"), str(REPO / "hooks"), str(SCRIPT), str(source)], check=True)
    (source / "aifactory_core").symlink_to(REPO / "aifactory_core")
    (source / "drivers/sudoers/aifactory").write_text("oneadmin ALL=(root) NOPASSWD: not a command list [\n")
    root = clean_frontend(tmp_path / "root")
    before = snapshot(root)
    env = {**os.environ, "PYTHON": sys.executable, "ONE_AUTH": str(auth)}
    result = subprocess.run(["sh", str(source / "install.sh"), "--no-venv", "--no-hooks", "--destdir", str(root)],
                            capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 1
    assert "sudoers snippet aifactory refused by visudo -cf" in result.stderr
    assert snapshot(root) == before


def test_installed_sudoers_snippet_passes_visudo(tmp_path: Path, auth: Path) -> None:
    needs.tool("/usr/sbin/visudo", hint="apt-get install sudo")
    root = clean_frontend(tmp_path / "root")
    assert install(root, auth).returncode == 0
    check = subprocess.run(["/usr/sbin/visudo", "-cf", str(root / "etc/sudoers.d/aifactory")],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def frontend_doctor(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aifactory_core.install.frontend_doctor", "--destdir", str(root)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)


UPSTREAM_CONFIG = REPO / "tests/fixtures/install/release-7.0.2"  # OpenNebula's own, unchanged


def with_upstream_config(root: Path, oned_conf: str | None = None, submit_on_hold: bool = True) -> None:
    """OpenNebula's own configuration, with the one change docs/tenant-policy.md asks of the operator."""
    etc = root / "etc/one"
    etc.mkdir(parents=True, exist_ok=True)
    text = oned_conf or (UPSTREAM_CONFIG / "oned.conf").read_text()
    if submit_on_hold:
        assert '#VM_SUBMIT_ON_HOLD = "NO"' in text
        text = text.replace('#VM_SUBMIT_ON_HOLD = "NO"', 'VM_SUBMIT_ON_HOLD = "YES"')
    (etc / "oned.conf").write_text(text)
    (etc / "monitord.conf").write_text((UPSTREAM_CONFIG / "monitord.conf").read_text())


def test_frontend_doctor_passes_on_a_complete_install(tmp_path: Path, auth: Path, one_server: OneTestServer) -> None:
    root = clean_frontend(tmp_path / "root")
    with_upstream_config(root)
    assert install(root, auth, endpoint=one_server.endpoint).returncode == 0
    result = subprocess.run([sys.executable, "-m", "aifactory_core.install.frontend_doctor", "--destdir", str(root),
                             "--endpoint", one_server.endpoint], capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": str(REPO), "ONE_AUTH": str(auth)})
    assert result.returncode == 0, result.stdout
    assert f"PASS  hooks: {len(template_names())} hooks registered" in result.stdout
    assert "PASS  oned.conf: VM_MAD kvm: one_vmm_exec -t 15 -r 0 kvm -p" in result.stdout
    assert "PASS  wrapper: vmm/kvm/deploy wraps vmm/kvm/deploy.one" in result.stdout

    del one_server.hooks[min(one_server.hooks)]
    (root / "var/lib/one/remotes/vmm/kvm/cancel.one").unlink()
    result = subprocess.run([sys.executable, "-m", "aifactory_core.install.frontend_doctor", "--destdir", str(root),
                             "--endpoint", one_server.endpoint], capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": str(REPO), "ONE_AUTH": str(auth)})
    assert result.returncode == 1
    assert f"FAIL  hooks: hook {template_names()[0]} is not registered" in result.stdout
    assert "FAIL  wrapper: vmm/kvm/cancel.one (OpenNebula's original) is missing" in result.stdout


def test_frontend_doctor_fails_when_new_vms_are_not_held_for_admission(tmp_path: Path, auth: Path) -> None:
    """Upstream's default (VM_SUBMIT_ON_HOLD = "NO"): oned schedules a VM before admission decides."""
    root = clean_frontend(tmp_path / "root")
    with_upstream_config(root, submit_on_hold=False)
    assert install(root, auth).returncode == 0
    result = frontend_doctor(root)
    assert result.returncode == 1
    assert "FAIL  oned.conf: VM_SUBMIT_ON_HOLD is not YES" in result.stdout
    assert 'fix: set VM_SUBMIT_ON_HOLD = "YES" in oned.conf; restart opennebula' in result.stdout


def test_frontend_doctor_refuses_wrapped_actions_run_on_the_frontend(tmp_path: Path, auth: Path) -> None:
    root = clean_frontend(tmp_path / "root")
    oned_conf = (UPSTREAM_CONFIG / "oned.conf").read_text()
    oned_conf = oned_conf.replace('"-t 15 -r 0 kvm -p"', '"-t 15 -r 0 -l deploy kvm -p"')
    with_upstream_config(root, oned_conf)
    assert install(root, auth).returncode == 0
    result = frontend_doctor(root)
    assert result.returncode == 1
    assert "FAIL  oned.conf: VM_MAD kvm runs deploy on the frontend (-l)" in result.stdout


def test_changed_hook_is_updated_in_place(tmp_path: Path, auth: Path, one_server: OneTestServer) -> None:
    root = clean_frontend(tmp_path / "root")
    assert install(root, auth, endpoint=one_server.endpoint).returncode == 0
    hook_id = min(one_server.hooks)
    name, kind, attributes = one_server.hooks[hook_id]
    one_server.hooks[hook_id] = (name, kind, {**attributes, "COMMAND": "elsewhere/x"})  # an admin's edit
    result = install(root, auth, endpoint=one_server.endpoint)
    assert result.returncode == 0, result.stderr
    assert f"update hook {name}" in result.stdout
    assert one_server.hooks[hook_id] == (name, kind, attributes) and len(one_server.hooks) == len(template_names())


def test_hook_refused_by_oned_undoes_the_hooks_and_files_before_it(tmp_path: Path, auth: Path,
                                                                  one_server: OneTestServer) -> None:
    source = tmp_path / "source"
    source.mkdir()
    subprocess.run(["cp", "-a", str(REPO / "drivers"), str(REPO / "hooks"), str(SCRIPT), str(source)], check=True)
    (source / "aifactory_core").symlink_to(REPO / "aifactory_core")
    (source / "hooks/templates/zz-no-command.tmpl").write_text('NAME = "zz-no-command"\nTYPE = "api"\n'
                                                               'CALL = "one.vm.allocate"\n')
    root = clean_frontend(tmp_path / "root")
    before = snapshot(root)
    env = {**os.environ, "PYTHON": sys.executable, "ONE_AUTH": str(auth)}
    result = subprocess.run(["sh", str(source / "install.sh"), "--no-venv", "--destdir", str(root),
                             "--endpoint", one_server.endpoint], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 1
    assert "one.hook.allocate" in result.stderr and "No COMMAND in hook template" in result.stderr
    assert one_server.hooks == {}  # the hooks allocated before the refused one were deleted again
    assert snapshot(root) == before


def test_cli_doctor_frontend_on_a_staged_root(tmp_path: Path, auth: Path) -> None:
    root = clean_frontend(tmp_path / "root")
    with_upstream_config(root)
    assert install(root, auth).returncode == 0
    result = subprocess.run([sys.executable, "-m", "aifactory_core.cli", "--host-root", str(root), "doctor",
                             "--frontend"], capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": str(REPO), "ONE_AUTH": str(auth)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS  oned.conf: VM_MAD kvm" in result.stdout and "FAIL" not in result.stdout
