"""``release`` as an ADMIN VM operation in ``oned.conf``: a tenant cannot release what admission holds.

Admission keeps a refused VM on hold. OpenNebula's shipped ``oned.conf`` lists ``release`` among
``VM_MANAGE_OPERATIONS``, which every VM owner has, so the tenant would undo the refusal with
``onevm release``. oned authorises a VM action by the first of the user's template, the group's
template and ``oned.conf`` that names it, and within one of them ``VM_ADMIN_OPERATIONS`` before
``VM_MANAGE_OPERATIONS`` before ``VM_USE_OPERATIONS`` (``RequestAttributes::set_auth_op``,
``VMActions::get_auth_op``); only an ADMIN right on the VM (the ``oneadmin`` group, or an ACL rule
granting ADMIN) then releases it. Users' and groups' ``VM_*_OPERATIONS`` are restricted
attributes only ``oneadmin`` may set.

install.sh moves ``release`` from the MANAGE/USE sets into ``VM_ADMIN_OPERATIONS`` (the first
occurrence of each key, which is the one oned reads), changing nothing else in the file, and records
each changed value (before, after) in the install manifest; ``--uninstall`` puts back a value that
is still what install wrote. oned reads ``oned.conf`` at start only: both need an oned restart.

``resume`` stays a MANAGE operation: oned refuses it from HOLD (``DispatchManager::resume`` takes
STOPPED, UNDEPLOYED, SUSPENDED and POWEROFF only), checks the ``RUNNING_*`` quotas on it, and
admission counts STOPPED and UNDEPLOYED VMs toward the cap, so a resumed VM never takes the tenant
past it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from aifactory_core.install import conffile, layout
from aifactory_core.install.stage import InstallError, Transaction

RECORD_KEY = "vm_operations"
OPERATION = "release"
SETS = ("VM_ADMIN_OPERATIONS", "VM_MANAGE_OPERATIONS", "VM_USE_OPERATIONS")
MAX_BYTES = 4 << 20
DEFAULT_ADMIN = "migrate, delete, recover, retry, deploy, resched, backup, restore"  # oned's built-in
RESTART = "restart oned for it to take effect (systemctl restart opennebula, or 'one restart' as oneadmin)"
_VALUE = r'^(?P<key>{key})(?P<eq>[ \t]*=[ \t]*)"(?P<value>[^"]*)"'


@dataclass(frozen=True)
class Found:
    key: str
    value: str
    start: int  # of the quoted value's text
    end: int


def find(text: str, key: str) -> Found | None:
    """The first ``KEY = "..."`` at the start of a line (a value may span lines), as oned reads it."""
    match = re.search(_VALUE.format(key=re.escape(key)), text, re.MULTILINE)
    if match is None:
        return None
    return Found(key, match.group("value"), match.start("value"), match.end("value"))


def operations(value: str) -> set[str]:
    """oned's reading of an operation list: comma-separated, trimmed, lower-cased."""
    return {item.strip().lower() for item in value.split(",") if item.strip()}


def without(value: str, operation: str) -> str:
    """``value`` with ``operation`` taken out of the list, the rest of the text as it was."""
    pieces = value.split(",")
    joined = ",".join(piece for piece in pieces if piece.strip().lower() != operation)
    return joined.lstrip() if pieces[0].strip().lower() == operation else joined


def with_operation(value: str, operation: str) -> str:
    stripped = value.rstrip()
    return f"{stripped}, {operation}" if stripped.strip() else operation


def admin_only(text: str) -> tuple[str, dict[str, list[str | None]]]:
    """The text with ``release`` only in VM_ADMIN_OPERATIONS, and each changed value (before, after)."""
    changes: dict[str, list[str | None]] = {}
    edits: list[tuple[Found, str]] = []
    for key in SETS:
        found = find(text, key)
        if key == SETS[0]:
            if found is None:  # oned then uses its built-in set, which has no release: add the line
                line = f'{key} = "{DEFAULT_ADMIN}, {OPERATION}"'
                changes[key] = [None, line]
                text = text + ("" if not text or text.endswith("\n") else "\n") + line + "\n"
                continue
            if OPERATION not in operations(found.value):
                edits.append((found, with_operation(found.value, OPERATION)))
        elif found is not None and OPERATION in operations(found.value):
            edits.append((found, without(found.value, OPERATION)))
    for found, new in sorted(edits, key=lambda edit: edit[0].start, reverse=True):
        text = text[:found.start] + new + text[found.end:]
        changes[found.key] = [found.value, new]
    return text, changes


def restored(text: str, recorded: dict[str, list[str | None]]) -> tuple[str, list[str], list[str]]:
    """The text with each value install changed put back where it is still what install wrote;
    returns (text, keys put back, keys left because they were edited since)."""
    edits: list[tuple[Found, str]] = []
    kept: list[str] = []
    added: list[str] = []
    for key, pair in recorded.items():
        if pair[0] is None:  # a line install added
            line = f"{pair[1]}\n"
            if line in text:
                text = text.replace(line, "", 1)
                added.append(key)
            else:
                kept.append(key)
            continue
        found = find(text, key)
        if found is None or found.value != pair[1]:
            kept.append(key)
            continue
        edits.append((found, pair[0]))
    for found, old in sorted(edits, key=lambda edit: edit[0].start, reverse=True):
        text = text[:found.start] + old + text[found.end:]
    return text, sorted([*added, *(found.key for found, _ in edits)]), sorted(kept)


def _read(path: Path) -> tuple[str, os.stat_result]:
    found = conffile.read(path, MAX_BYTES)
    if found is None:
        raise InstallError(f"{path}: no such file")
    return found


def apply(tx: Transaction, target: layout.Layout, previous: dict[str, list[str | None]],
          notes: list[str]) -> dict[str, list[str | None]]:
    """Make ``release`` an ADMIN operation; returns what the manifest keeps (earlier changes too)."""
    path = target.path(target.oned_conf)
    if not path.exists() and target.staged:
        notes.append(f"{target.oned_conf} not in the staged tree: VM operation sets not changed")
        return dict(previous)
    text, info = _read(path)
    new, changes = admin_only(text)
    if not changes:
        return dict(previous)
    described = "; ".join(f"{key}: {' '.join(str(pair[1]).split())}" for key, pair in sorted(changes.items()))
    tx.step(f"make VM operation {OPERATION} ADMIN-only in {path} ({described})",
            lambda: conffile.replace(path, new, info), lambda: conffile.replace(path, text, info))
    notes.append(f"oned.conf changed (VM operation {OPERATION} is an ADMIN operation now): {RESTART}")
    merged = dict(previous)
    for key, pair in changes.items():
        merged[key] = [previous[key][0] if key in previous else pair[0], pair[1]]
    return merged


def remove(tx: Transaction, target: layout.Layout, recorded: dict[str, list[str | None]],
           notes: list[str]) -> None:
    """Put back the values install changed, where they are still what install wrote."""
    if not recorded:
        return
    path = target.path(target.oned_conf)
    if not path.exists():
        notes.append(f"{target.oned_conf} is gone: VM operation sets not restored")
        return
    text, info = _read(path)
    new, back, kept = restored(text, recorded)
    for key in kept:
        notes.append(f"kept {key} in oned.conf: edited since install changed it")
    if back:
        tx.step(f"restore {', '.join(back)} in {path}", lambda: conffile.replace(path, new, info),
                lambda: conffile.replace(path, text, info))
        notes.append(f"oned.conf restored ({', '.join(back)}): {RESTART}")


def configured_admin(text: str) -> bool:
    """True when oned reading ``text`` makes ``release`` an ADMIN operation (its first ADMIN value)."""
    found = find(text, SETS[0])
    return found is not None and OPERATION in operations(found.value)
