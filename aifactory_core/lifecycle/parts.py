"""Parts of a VM's transaction added and given back on their own.

A NIC hot-plugged into a running VM (``onevm nic-attach``) must join the VM's journal without
touching what the VM already holds, and detaching it must undo only its own steps: scrubbing the
VM's other VFs while it runs would put its remaining NICs on the wire untagged. Each step carries
the scope of the part it belongs to (``nic<N>``); the whole-VM operations in
:mod:`aifactory_core.lifecycle.executor` still undo everything, whatever the scope.
"""

from __future__ import annotations

from collections.abc import Sequence

from aifactory_core.errors import AifactoryError, HostError
from aifactory_core.host.pcibind import SysfsWriter, Writer
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import ownership
from aifactory_core.lifecycle.executor import executor_for, make_steps, prepare, undo_steps
from aifactory_core.lifecycle.journal import Journal
from aifactory_core.model import Action


def add_part(host: HostRoot, vm: int, scope: str, actions: Sequence[Action], writer: Writer | None = None) -> Journal:
    """Make ``actions`` as part ``scope`` of the VM's transaction; on failure undo only them.

    Without a journal this is a new transaction. A part already in the journal is not made again
    (a repeated ``pre``). A journal left mid-transaction by a crash is refused: repair it first.
    """
    if not scope:
        raise ValueError("a part needs a scope")
    writer = writer if writer is not None else SysfsWriter()
    journal = Journal.load(host, vm)
    if journal is None:
        return prepare(host, vm, actions, writer, scopes=[scope] * len(actions))
    if journal.phase != "prepared":
        raise HostError(f"VM {vm}: its journal is {journal.phase}, not prepared: run 'aifactory repair' first")
    if any(step.scope == scope for step in journal.steps):
        return journal
    try:
        make_steps(host, journal, actions, writer, scopes=[scope] * len(actions))
    except BaseException as error:
        problems = _undo_part(host, journal, scope, writer, actions)
        if problems and isinstance(error, AifactoryError):
            raise HostError(f"{error.message}; undoing {scope} also failed: {'; '.join(problems)}") from None
        raise
    return journal


def release_part(host: HostRoot, vm: int, scope: str, writer: Writer | None = None) -> bool:
    """Undo the steps of part ``scope`` (newest first) and drop them; False when it held nothing.
    The journal goes when no step is left."""
    writer = writer if writer is not None else SysfsWriter()
    journal = Journal.load(host, vm)
    if journal is None or not any(step.scope == scope for step in journal.steps):
        return False
    problems = _undo_part(host, journal, scope, writer, [step.action for step in journal.steps
                                                           if step.scope == scope])
    if problems:
        raise HostError(f"release of {scope} of VM {vm} incomplete: {'; '.join(problems)}")
    return True


def _undo_part(host: HostRoot, journal: Journal, scope: str, writer: Writer,
               actions: Sequence[Action]) -> list[str]:
    errors = undo_steps(host, journal, writer, scope)
    if errors:
        return errors
    for action in actions:
        if executor_for(action.kind).claims_target and ownership.owner_of(host, action.target) == journal.vm_id:
            ownership.disown(host, action.target, journal.vm_id)
    journal.steps = [step for step in journal.steps if step.scope != scope]
    if journal.steps:
        journal.save()
    else:
        journal.remove()
    return []
