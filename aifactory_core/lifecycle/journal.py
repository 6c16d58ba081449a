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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aifactory_core.errors import HostError
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle.atomic import names, read_json, remove, write_json
from aifactory_core.model import Action
from aifactory_core.validate import vm_id as check_vm_id

PHASES = ("preparing", "prepared", "releasing")
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
    def from_json(cls, data: dict[str, Any]) -> Step:
        action = Action(str(data["kind"]), str(data["target"]), str(data["value"]),
                        None if data.get("undo_value") is None else str(data["undo_value"]), str(data["reason"]))
        return cls(action, str(data["status"]), str(data.get("scope", "")))


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
        if data.get("phase") not in PHASES or data.get("vm_id") != vm:
            raise HostError(f"journal {path} is damaged (phase {data.get('phase')!r})")
        return cls(host, vm, data["phase"], [Step.from_json(step) for step in data.get("steps", [])])


def all_journals(host: HostRoot) -> Iterator[Journal]:
    for name in names(journal_dir(host)):
        stem = name.removesuffix(".json")
        if name.endswith(".json") and stem.isdigit():
            journal = Journal.load(host, int(stem))
            if journal is not None:
                yield journal
