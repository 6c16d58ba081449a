"""Attacks through the probe's state directory on what root does with it: ``aifactory doctor``,
run as root on a host, passes the probe over a copy of ``<state dir>/probes``, a directory
``oneadmin`` owns and fills. The probe plugins' discovery cache there names modules to import; its
rule is that root never imports a module named by a file another user could write. A copy made by
root is root's file, whatever its source, so the copy must never carry the cache, and the copy must
never follow ``probes`` itself where it is a link (root would copy whatever it points at).

Each test is one attack by the ``nobody`` user standing in for ``oneadmin``, marked ``root_attack``.
The module an attack names writes a marker when imported: any module on root's path whose import
does something (stdlib's ``antigravity``, ``venv.__main__``) serves an attacker the same way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hostroots import dgx_root  # noqa: F401 - fixture

from aifactory_core.install import pci_doctor
from aifactory_core.probes import plugins

ATTACKER = 65534
MODULE = "aifactory_attack_probe_marker"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the attacks are on root")


def _plant_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module on root's path whose import leaves a marker (removed from sys.modules afterwards)."""
    library = tmp_path / "library"
    library.mkdir()
    marker = tmp_path / "imported"
    (library / f"{MODULE}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(library))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    return marker


def _attacker_state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    (state / "probes").mkdir(parents=True)
    for path in (state, state / "probes"):
        os.chown(path, ATTACKER, ATTACKER)
    return state


@pytest.mark.root_attack
def test_a_plugin_cache_planted_for_root_is_not_imported_by_roots_doctor(
        dgx_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    marker = _plant_module(tmp_path, monkeypatch)
    state = _attacker_state(tmp_path)
    cache = state / "probes" / f"plugins-{os.geteuid()}.tsv"  # the name root's probe reads
    key = plugins.cache_key(plugins._path_dirs())
    cache.write_text("".join(f"{line}\n" for line in key + [f"P\tevil\t{MODULE}"]))
    os.chown(cache, ATTACKER, ATTACKER)
    os.chmod(cache, 0o644)
    assert plugins._read_trusted(str(cache)) is None  # the planted file itself is refused...
    pci_doctor.host_checks(str(dgx_root), str(state))
    assert not marker.exists(), "root imported a module named by oneadmin's file"  # ...and so is a copy
    assert cache.stat().st_uid == ATTACKER  # the attacker's file is left as it was


@pytest.mark.root_attack
def test_a_probes_link_is_not_followed_by_roots_doctor(dgx_root: Path, tmp_path: Path,  # noqa: F811
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    marker = _plant_module(tmp_path, monkeypatch)
    elsewhere = tmp_path / "roots-own"  # a root-owned directory holding a cache root wrote
    elsewhere.mkdir()
    key = plugins.cache_key(plugins._path_dirs())
    (elsewhere / f"plugins-{os.geteuid()}.tsv").write_text(
        "".join(f"{line}\n" for line in key + [f"P\tevil\t{MODULE}"]))
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, ATTACKER, ATTACKER)
    (state / "probes").symlink_to(elsewhere)  # oneadmin points its probes directory at it
    os.lchown(state / "probes", ATTACKER, ATTACKER)
    checks = pci_doctor.host_checks(str(dgx_root), str(state))
    assert not marker.exists(), "root's doctor followed oneadmin's link"
    assert any(check.name == "pci-offer" for check in checks)  # the doctor still reports


def _victim(tmp_path: Path) -> Path:
    """A root-owned file outside the state directory (``/etc/shadow`` in a real attack)."""
    victim = tmp_path / "victim"
    victim.write_text("root's own file\n")
    victim.chmod(0o600)
    os.utime(victim, (0, 0))  # old: as a stamp it does not hold the reconciliation back
    return victim


@pytest.mark.root_attack
def test_a_link_at_the_caches_temporary_name_is_not_written_through_by_roots_probe(tmp_path: Path) -> None:
    from aifactory_core.probes.sysfs import Root

    victim = _victim(tmp_path)
    state = _attacker_state(tmp_path)
    cache = state / "probes" / f"plugins-{os.geteuid()}.tsv"
    planted = Path(f"{cache}.{os.getpid()}.tmp")  # the name root's next write uses
    planted.symlink_to(victim)
    os.lchown(planted, ATTACKER, ATTACKER)
    plugins.discover(Root("/", str(state)))
    assert victim.read_text() == "root's own file\n", "root wrote through oneadmin's link"
    assert victim.stat().st_mode & 0o777 == 0o600
    assert not cache.is_symlink() and cache.stat().st_mode & 0o777 == 0o644  # the cache itself is made


@pytest.mark.root_attack
@pytest.mark.parametrize("name", ["reconcile.stamp", "reconcile.log"])
def test_a_link_at_the_reconciliation_stamp_or_log_is_not_written_through_by_roots_probe(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    import subprocess

    from aifactory_core.probes import reconcile_trigger
    from aifactory_core.probes.sysfs import Root

    victim = _victim(tmp_path)
    state = _attacker_state(tmp_path)
    host = tmp_path / "host"
    (host / "run/libvirt/qemu").mkdir(parents=True)  # this host root's libvirt: no domain runs
    planted = state / "probes" / name
    planted.symlink_to(victim)
    os.lchown(planted, ATTACKER, ATTACKER)
    started: list[list[str]] = []
    # the reconciliation itself is not started here: only where its stamp and log go is attacked
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **_kwargs: started.append(argv))
    monkeypatch.setenv("AIFACTORY_RECONCILE", "on")
    assert reconcile_trigger.maybe_start(Root(str(host), str(state)), {"0000:1b:00.0": 7})  # VM 7 has no domain
    assert started and started[0][-2:] == ["repair", "--reconcile"]
    assert victim.read_text() == "root's own file\n", "root wrote through oneadmin's link"
    assert not planted.is_symlink()
