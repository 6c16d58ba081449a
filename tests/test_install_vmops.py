"""install.sh makes ``release`` an ADMIN VM operation in oned.conf, and ``--uninstall`` puts it back.

Checked on the ``oned.conf`` OpenNebula 7.0.2 and 7.4.0 ship (read out of the release tarballs in
``../shared/opennebula/src``), through the install transaction on a staged root, and by the
frontend doctor. The real oned's answer to a tenant's ``onevm release`` is checked in
``tests/oned/test_oned_isolation.py``.
"""

from __future__ import annotations

import io
import json
import tarfile
from functools import cache
from pathlib import Path

import needs
import pytest

from aifactory_core.install import layout, vmops
from aifactory_core.install.frontend_doctor import release_check
from aifactory_core.install.stage import Transaction

REPO = Path(__file__).resolve().parent.parent
TARBALLS = REPO.parent / "shared" / "opennebula" / "src"


@cache
def shipped_oned_conf(version: str) -> str:
    tarball = TARBALLS / f"one-release-{version}.tar.gz"
    if not tarball.is_file():
        needs.unavailable(f"{tarball} missing: OpenNebula {version}'s shipped oned.conf is needed")
    with tarfile.open(tarball, "r:gz") as archive:
        member = archive.extractfile(f"one-release-{version}/share/etc/oned.conf")
        assert member is not None
        return member.read().decode("utf-8")


@pytest.mark.parametrize("version", ["7.0.2", "7.4.0"])
def test_shipped_oned_conf_gets_release_as_admin_only_and_uninstall_gives_the_same_bytes_back(version: str) -> None:
    text = shipped_oned_conf(version)
    assert vmops.OPERATION in vmops.operations(vmops.find(text, "VM_MANAGE_OPERATIONS").value)  # upstream's default
    assert not vmops.configured_admin(text)
    changed, changes = vmops.admin_only(text)
    assert vmops.configured_admin(changed)
    assert vmops.OPERATION not in vmops.operations(vmops.find(changed, "VM_MANAGE_OPERATIONS").value)
    # every other operation stays where it was
    for key in vmops.SETS:
        before, after = vmops.find(text, key), vmops.find(changed, key)
        if before is not None and after is not None:
            assert vmops.operations(before.value) - {vmops.OPERATION} == vmops.operations(after.value) - {
                vmops.OPERATION}
    assert _without_values(changed) == _without_values(text)  # nothing else in the file changed
    assert vmops.admin_only(changed)[1] == {}  # a second install changes nothing
    restored, keys, kept = vmops.restored(changed, changes)
    assert (restored, keys, kept) == (text, ["VM_ADMIN_OPERATIONS", "VM_MANAGE_OPERATIONS"], [])


def _without_values(text: str) -> str:
    for key in vmops.SETS:
        found = vmops.find(text, key)
        if found is not None:
            text = text[:found.start] + text[found.end:]
    return text


def test_a_missing_admin_set_is_added_with_onads_built_in_operations_and_removed_again() -> None:
    text = 'LOG = [ SYSTEM = "file" ]\nVM_MANAGE_OPERATIONS = "release, hold"\n'
    changed, changes = vmops.admin_only(text)
    assert changed == ('LOG = [ SYSTEM = "file" ]\nVM_MANAGE_OPERATIONS = "hold"\n'
                       f'VM_ADMIN_OPERATIONS = "{vmops.DEFAULT_ADMIN}, release"\n')
    assert vmops.restored(changed, changes)[0] == text


def _staged(tmp_path: Path, text: str) -> layout.Layout:
    target = layout.Layout(tmp_path)
    conf = target.path(target.oned_conf)
    conf.parent.mkdir(parents=True)
    conf.write_text(text)
    conf.chmod(0o640)
    return target


def test_install_journals_the_change_rolls_back_and_uninstall_restores(tmp_path: Path) -> None:
    text = shipped_oned_conf("7.0.2")
    target = _staged(tmp_path, text)
    conf = target.path(target.oned_conf)
    notes: list[str] = []
    tx = Transaction(out=io.StringIO())
    record = vmops.apply(tx, target, {}, notes)
    assert vmops.configured_admin(conf.read_text()) and conf.stat().st_mode & 0o777 == 0o640
    assert notes == ["oned.conf changed (VM operation release is an ADMIN operation now): restart oned for it to "
                     "take effect (systemctl restart opennebula, or 'one restart' as oneadmin)"]
    assert json.loads(json.dumps(record)) == record  # what the manifest keeps
    assert tx.rollback() == [] and conf.read_text() == text  # a failed install leaves it as it was

    tx = Transaction(out=io.StringIO())
    record = vmops.apply(tx, target, {}, [])
    tx.commit()
    again = Transaction(out=io.StringIO())
    assert vmops.apply(again, target, record, []) == record and again.changes == 0
    removing = Transaction(out=io.StringIO())
    notes = []
    vmops.remove(removing, target, record, notes)
    removing.commit()
    assert conf.read_text() == text
    assert notes[0].startswith("oned.conf restored (VM_ADMIN_OPERATIONS, VM_MANAGE_OPERATIONS): restart oned")


def test_uninstall_keeps_a_value_edited_since(tmp_path: Path) -> None:
    target = _staged(tmp_path, shipped_oned_conf("7.0.2"))
    tx = Transaction(out=io.StringIO())
    record = vmops.apply(tx, target, {}, [])
    tx.commit()
    conf = target.path(target.oned_conf)
    conf.write_text(conf.read_text().replace("backup, restore, release", "backup, restore, release, deploy"))
    notes: list[str] = []
    vmops.remove(Transaction(out=io.StringIO()), target, record, notes)
    assert "kept VM_ADMIN_OPERATIONS in oned.conf: edited since install changed it" in notes
    assert vmops.configured_admin(conf.read_text())


def test_frontend_doctor_fails_on_the_shipped_sets_and_passes_after_install(tmp_path: Path) -> None:
    target = _staged(tmp_path, shipped_oned_conf("7.0.2"))
    before = release_check(target)
    assert before.status == "FAIL" and "onevm release" in before.message
    assert before.fix == "run install.sh (it moves release into VM_ADMIN_OPERATIONS), then restart oned"
    tx = Transaction(out=io.StringIO())
    vmops.apply(tx, target, {}, [])
    tx.commit()
    assert release_check(target).status == "PASS"
