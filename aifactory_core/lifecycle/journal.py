"""The per-VM journal: every step is written (atomically) before the host is changed.

One JSON file per VM under ``<state dir>/vms/<vmid>.json``::

    {"vm_id": 42, "phase": "preparing" | "prepared" | "releasing",
     "steps": [{"kind": "pci_driver", "target": "0000:17:00.0", "value": "vfio-pci",
                "undo_value": "nvidia", "reason": "...", "status": "pending" | "done" | "undone",
                "scope": "nic1" (optional: a part of the VM released on its own)}]}

A VM whose transaction finished releasing has no file. ``pending`` means "about to be made or made
without confirmation": undoing it is safe because every action kind's undo is idempotent.

A journal that cannot be read as one (truncated, not a mapping, a step without a kind, larger than
:data:`MAX_JOURNAL_BYTES`, a link or not a regular file) is :class:`DamagedJournal`; the repair sets
it aside (:func:`set_aside`, renamed in its directory to ``<vmid>.json.damaged-<time>``, never
following a link) and goes on with the others. A set-aside journal keeps its VM's devices held
until an administrator removes it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aifactory_core.errors import HostError, UsageError
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle.atomic import names, read_bytes_at_most, remove, write_json
from aifactory_core.model import Action
from aifactory_core.validate import vm_id as check_vm_id

PHASES = ("preparing", "prepared", "releasing")
STATUSES = ("pending", "done", "undone")
MAX_VALUE = 4096
MAX_JOURNAL_BYTES = 1 << 20
SET_ASIDE = ".damaged-"
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_SCOPE = re.compile(r"^(|[a-z][a-z0-9_-]{0,31})$")
ENV_FAULT_AT = "AIFACTORY_FAULT_AT"


def journal_dir(host: HostRoot) -> Path:
    return host.state_dir / "vms"


class DamagedJournal(HostError):
    """A journal file that is not one; ``vm_id`` names its VM."""

    code = "journal-damaged"

    def __init__(self, vm_id: int, message: str) -> None:
        super().__init__(message)
        self.vm_id = vm_id


@dataclass
class Step:
    action: Action
    status: str = "pending"
    scope: str = ""
    """The part of the VM the step belongs to (``nic1``: a hot-pluggable NIC); ``""`` for the whole VM."""

    def to_json(self) -> dict[str, Any]:
        data = {"kind": self.action.kind, "target": self.action.target, "value": self.action.value,
                "undo_value": self.action.undo_value, "reason": self.action.reason, "status": self.status}
        if self.scope:
            data["scope"] = self.scope
        return data

    @classmethod
    def from_json(cls, data: object) -> Step:
        """A step as a journal holds it, every field checked (UsageError): the journal is data
        someone else may have written; what each kind's target and values may be is checked by
        that kind's undo before it acts."""
        if not isinstance(data, dict):
            raise UsageError("a step is not a mapping")
        kind, status, scope = _text(data, "kind", 32), _text(data, "status", 16), _text(data, "scope", 32, "")
        if not _KIND.fullmatch(kind) or status not in STATUSES or not _SCOPE.fullmatch(scope):
            raise UsageError(f"step {kind[:32]!r} {status[:16]!r} {scope[:32]!r}: unknown kind, status or scope")
        undo = None if data.get("undo_value") is None else _text(data, "undo_value", MAX_VALUE)
        action = Action(kind, _text(data, "target", 64), _text(data, "value", MAX_VALUE), undo,
                        _text(data, "reason", MAX_VALUE, ""))
        return cls(action, status, scope)


def _text(data: dict[str, Any], key: str, limit: int, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or len(value) > limit:
        raise UsageError(f"step field {key!r} is not a string of at most {limit} characters")
    return value


class FaultInjector:
    """Test hook: ``AIFACTORY_FAULT_AT=N`` kills the process right after the N-th journal write."""

    def __init__(self) -> None:
        text = os.environ.get(ENV_FAULT_AT, "")
        self.target = int(text) if text.isdigit() else None
        self.count = 0

    def after_write(self) -> None:
        self.count += 1
        if self.target is not None and self.count == self.target:
            os.kill(os.getpid(), 9)


@dataclass
class Journal:
    host: HostRoot
    vm_id: int
    phase: str = "preparing"
    steps: list[Step] = field(default_factory=list)
    faults: FaultInjector = field(default_factory=FaultInjector)

    @property
    def path(self) -> Path:
        return journal_dir(self.host) / f"{self.vm_id}.json"

    def save(self) -> None:
        write_json(self.path, {"vm_id": self.vm_id, "phase": self.phase,
                               "steps": [step.to_json() for step in self.steps]})
        self.faults.after_write()

    def remove(self) -> None:
        remove(self.path)

    @classmethod
    def load(cls, host: HostRoot, vm: int) -> Journal | None:
        """The VM's journal; None when it has none; :class:`DamagedJournal` when its file is not one."""
        import json

        path = journal_dir(host) / f"{check_vm_id(vm)}.json"
        try:
            raw = read_bytes_at_most(path, MAX_JOURNAL_BYTES)
            data = json.loads(raw.decode("utf-8"))
        except FileNotFoundError:
            return None
        except HostError as error:  # a link, a FIFO, a directory, larger than the limit
            raise DamagedJournal(vm, f"journal {path} is damaged: {error.message}") from None
        except (OSError, ValueError) as error:
            raise DamagedJournal(vm, f"journal {path} is damaged: {str(error)[:200]}") from None
        if not isinstance(data, dict):
            raise DamagedJournal(vm, f"journal {path} is damaged: not a JSON object")
        if data.get("phase") not in PHASES or data.get("vm_id") != vm:
            raise DamagedJournal(vm, f"journal {path} is damaged (phase {str(data.get('phase'))[:16]!r}, "
                                     f"vm_id {str(data.get('vm_id'))[:16]!r})")
        steps = data.get("steps", [])
        try:
            if not isinstance(steps, list):
                raise UsageError("steps is not a list")
            return cls(host, vm, data["phase"], [Step.from_json(step) for step in steps])
        except UsageError as error:
            raise DamagedJournal(vm, f"journal {path} is damaged: {error.message}") from None


def journal_ids(host: HostRoot) -> list[int]:
    """The VMs with a journal file (damaged or not), in name order."""
    found = []
    for name in names(journal_dir(host)):
        stem = name.removesuffix(".json")
        if name.endswith(".json") and stem.isdigit() and len(stem) <= 10:
            found.append(int(stem))
    return found


def all_journals(host: HostRoot) -> Iterator[Journal]:
    """Every journal; a damaged one raises :class:`DamagedJournal` (see :func:`scan`)."""
    for vm in journal_ids(host):
        journal = Journal.load(host, vm)
        if journal is not None:
            yield journal


def scan(host: HostRoot) -> tuple[list[Journal], list[DamagedJournal]]:
    """Every journal that reads as one, and what is wrong with each that does not."""
    journals, damaged = [], []
    for vm in journal_ids(host):
        try:
            journal = Journal.load(host, vm)
        except DamagedJournal as error:
            damaged.append(error)
            continue
        if journal is not None:
            journals.append(journal)
    return journals, damaged


def set_aside(host: HostRoot, vm: int) -> str:
    """Rename the VM's damaged journal to ``<vmid>.json.damaged-<UTC time>`` in its directory (the
    entry itself, even a link, through the directory's descriptor); returns the new name."""
    import time

    from aifactory_core import nofollow

    name = f"{check_vm_id(vm)}.json"
    aside = f"{name}{SET_ASIDE}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    directory = nofollow.open_directory(journal_dir(host))
    try:
        for attempt in range(100):
            candidate = aside if attempt == 0 else f"{aside}.{attempt}"
            try:
                os.stat(candidate, dir_fd=directory, follow_symlinks=False)
            except FileNotFoundError:
                os.rename(name, candidate, src_dir_fd=directory, dst_dir_fd=directory)
                return candidate
        raise HostError(f"journal {name}: too many set-aside copies in {journal_dir(host)}")
    finally:
        os.close(directory)


def set_aside_ids(host: HostRoot) -> dict[int, list[str]]:
    """VM id -> the names of its set-aside journals."""
    found: dict[int, list[str]] = {}
    for name in names(journal_dir(host)):
        stem, marker, _stamp = name.partition(f".json{SET_ASIDE}")
        if marker and stem.isdigit() and len(stem) <= 10:
            found.setdefault(int(stem), []).append(name)
    return found
