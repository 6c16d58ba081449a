"""The per-VM journal: every step is written (atomically) before the host is changed.

One JSON file per VM under ``<state dir>/vms/<vmid>.json``::

    {"vm_id": 42, "phase": "preparing" | "prepared" | "releasing",
     "steps": [{"kind": "pci_driver", "target": "0000:17:00.0", "value": "vfio-pci",
                "undo_value": "nvidia", "reason": "...", "status": "pending" | "done" | "undone",
                "scope": "nic1" (optional: a part of the VM released on its own)}]}

A VM whose transaction finished releasing has no file. ``pending`` means "about to be made or made
without confirmation": undoing it is safe because every action kind's undo is idempotent.
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
from aifactory_core.lifecycle.atomic import names, read_json, remove, write_json
from aifactory_core.model import Action
from aifactory_core.validate import vm_id as check_vm_id

PHASES = ("preparing", "prepared", "releasing")
STATUSES = ("pending", "done", "undone")
MAX_VALUE = 4096
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_SCOPE = re.compile(r"^(|[a-z][a-z0-9_-]{0,31})$")
ENV_FAULT_AT = "AIFACTORY_FAULT_AT"


def journal_dir(host: HostRoot) -> Path:
    return host.state_dir / "vms"


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
        path = journal_dir(host) / f"{check_vm_id(vm)}.json"
        try:
            data = read_json(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise HostError(f"journal {path} is unreadable: {error}") from None
        if not isinstance(data, dict) or data.get("phase") not in PHASES or data.get("vm_id") != vm:
            phase = data.get("phase") if isinstance(data, dict) else None
            raise HostError(f"journal {path} is damaged (phase {str(phase)[:16]!r})")
        steps = data.get("steps", [])
        try:
            if not isinstance(steps, list):
                raise UsageError("steps is not a list")
            return cls(host, vm, data["phase"], [Step.from_json(step) for step in steps])
        except UsageError as error:
            raise HostError(f"journal {path} is damaged: {error.message}") from None


def all_journals(host: HostRoot) -> Iterator[Journal]:
    for name in names(journal_dir(host)):
        stem = name.removesuffix(".json")
        if name.endswith(".json") and stem.isdigit():
            journal = Journal.load(host, int(stem))
            if journal is not None:
                yield journal
