"""Attacks through the probe's state directory on what root does with it: ``aifactory doctor``,
run as root on a host, passes the probe over a copy of ``<state dir>/probes``, a directory
``oneadmin`` owns and fills. The probe plugins' discovery cache there names modules to import; its
rule is that root never imports a module named by a file another user could write. A copy made by
root is root's file, whatever its source, so the copy must never carry the cache, and the copy must
never follow ``probes`` itself where it is a link (root would copy whatever it points at).

Root's probe runs (``aifactory probe``/``metrics``) write their state files in that directory: a
link ``oneadmin`` plants at a name they write is never written through. And the installer's
oned.conf edit in a self-contained OpenNebula, whose ``etc`` is ``oneadmin``'s: owner and mode go
to root's new file, never to what a swapped-in link names, and a FIFO there does not hold it.

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


def _self_contained_frontend(tmp_path: Path) -> tuple[object, Path]:
    """A self-contained OpenNebula (``ONE_LOCATION``) whose ``etc`` is ``oneadmin``'s, as its own
    install.sh leaves it, holding an oned.conf without ``release`` among the ADMIN operations."""
    from aifactory_core.install import layout

    target = layout.Layout(Path("/"), one_location=str(tmp_path / "one"))
    conf = Path(target.oned_conf)
    conf.parent.mkdir(parents=True)
    conf.write_text('VM_ADMIN_OPERATIONS = "migrate, delete"\n')
    conf.chmod(0o640)
    os.chown(conf.parent, ATTACKER, ATTACKER)
    os.chown(conf, 0, ATTACKER)
    return target, conf


@pytest.mark.root_attack
def test_a_link_swapped_in_at_oned_confs_new_name_gets_no_owner_or_mode_from_the_installer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from aifactory_core.install import vmops
    from aifactory_core.install.stage import Transaction

    victim = _victim(tmp_path)
    target, conf = _self_contained_frontend(tmp_path)
    real_fdopen = os.fdopen

    def swapping_fdopen(descriptor: int, *args: object, **kwargs: object) -> object:
        handle = real_fdopen(descriptor, *args, **kwargs)  # type: ignore[call-overload]
        new = conf.with_name(f".{conf.name}.aifactory-new")
        if new.exists():  # oneadmin, owner of the directory, swaps root's new file for a link
            new.rename(conf.with_name("kept"))
            new.symlink_to(victim)
        return handle

    monkeypatch.setattr(os, "fdopen", swapping_fdopen)
    try:
        vmops.apply(Transaction(out=io.StringIO()), target, {}, [])  # type: ignore[arg-type]
    except Exception:
        pass  # the install may fail; what it did to the victim is what counts
    monkeypatch.undo()
    status = victim.stat()
    assert (status.st_uid, status.st_gid, status.st_mode & 0o7777) == (0, 0, 0o600), \
        "root gave oneadmin's group (or a new mode) to the file behind the link"


@pytest.mark.root_attack
def test_a_fifo_as_oned_conf_does_not_hold_the_installer(tmp_path: Path) -> None:
    import io

    from aifactory_core.install import vmops
    from aifactory_core.install.stage import InstallError, Transaction

    target, conf = _self_contained_frontend(tmp_path)
    conf.unlink()
    os.mkfifo(conf)  # oneadmin's: the install would wait for a writer that never comes
    with pytest.raises(InstallError, match="not a regular file"):
        vmops.apply(Transaction(out=io.StringIO()), target, {}, [])  # type: ignore[arg-type]


@pytest.mark.root_attack
def test_a_quarantine_record_linked_to_a_secret_is_not_read_by_roots_doctor(dgx_root: Path,  # noqa: F811
                                                                           tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root:$y$j9T$not-for-oneadmin:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    state = _attacker_state(tmp_path)
    (state / "quarantine").mkdir()
    os.chown(state / "quarantine", ATTACKER, ATTACKER)
    planted = state / "quarantine" / "0000:1b:00.0"
    planted.symlink_to(secret)  # the doctor prints a quarantined device's reason
    os.lchown(planted, ATTACKER, ATTACKER)
    checks = pci_doctor.host_checks(str(dgx_root), str(state))
    assert not any("not-for-oneadmin" in check.message for check in checks), "root read oneadmin's link"
