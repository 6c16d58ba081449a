"""Executing actions: journal first, then change the host; undo in reverse on any failure.

Action kinds are pluggable: ``register_executor(kind, do, undo)`` adds one (``do`` and ``undo``
receive the host root, the action and the sysfs writer; ``undo`` must be idempotent, since a step
interrupted by a crash is undone without knowing how far it got). Built in: ``pci_driver``
(target = PCI address, value = ``vfio-pci``, the one driver it puts a function on, undo_value = the
driver it had, ``""`` for none). A journal is data: every undo validates what it reads and acts only
through fixed code and the configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aifactory_core.errors import AifactoryError, HostError, UsageError
from aifactory_core.host.pcibind import VFIO_DRIVER, PciBinder, RecordingWriter, SysfsWrite, SysfsWriter, Writer
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import ownership
from aifactory_core.lifecycle.journal import Journal, Step
from aifactory_core.model import Action
from aifactory_core.validate import driver_name, pci_address

log = logging.getLogger(__name__)

ActionFunction = Callable[[HostRoot, Action, Writer], None]


@dataclass(frozen=True)
class ActionExecutor:
    do: ActionFunction
    undo: ActionFunction
    claims_target: bool = False
    """True when the action's target is a device the VM takes exclusively (ownership is checked)."""
    parallel: bool = False
    """True when consecutive actions of this kind may run at the same time (distinct targets)."""


EXECUTORS: dict[str, ActionExecutor] = {}


def register_executor(kind: str, do: ActionFunction, undo: ActionFunction, *, claims_target: bool = False,
                      parallel: bool = False) -> None:
    EXECUTORS[kind] = ActionExecutor(do, undo, claims_target, parallel)


def _set_driver(host: HostRoot, address: str, driver: str, writer: Writer) -> None:
    """Move a function; unprivileged on the live host, through the root helper and sudo."""
    from aifactory_core.roothelper import needed

    if needed(host) and not isinstance(writer, RecordingWriter):
        from aifactory_core.roothelper import run_privileged

        run_privileged("set-driver", pci_address(address), driver or "none")
        return
    PciBinder(host, writer).set_driver(address, driver)


def _judge(host: HostRoot, address: str, writer: Writer) -> None:
    """A change made here, not through the root helper (as root, or on a test's host root), passes
    the helper's own judgement: the same rule, the same root-owned configuration. Through the helper,
    the helper judges."""
    from aifactory_core.roothelper import needed

    if isinstance(writer, RecordingWriter) or needed(host):
        return
    from aifactory_core.host.hostuse import check_function
    from aifactory_core.rootconfig import load_root_config

    check_function(host, address, load_root_config().host.host_devices)


def _judge_release(host: HostRoot, address: str, writer: Writer) -> None:
    """A function leaving vfio-pci here, not through the root helper, passes the helper's own
    rule for that too: no process may still use it through VFIO (a running guest)."""
    from aifactory_core.roothelper import needed

    if isinstance(writer, RecordingWriter) or needed(host):
        return
    from aifactory_core.host.vfio_users import check_unused

    check_unused(host, address, "give it back")


def _pci_driver_step(action: Action) -> tuple[str, str]:
    """The function of a ``pci_driver`` step and the driver it had (``""``: none), validated: a step
    (perhaps read from a journal someone else can write) moves a function onto vfio-pci and nowhere
    else, and names the driver to give it back to by a driver name only."""
    address = pci_address(action.target)
    if action.value != VFIO_DRIVER:
        raise UsageError(f"pci_driver step for {address}: a step moves a function onto {VFIO_DRIVER} only, "
                         f"not {action.value[:32]!r}")
    original = action.undo_value or ""
    return address, driver_name(original) if original else ""


def _pci_driver_do(host: HostRoot, action: Action, writer: Writer) -> None:
    address, _original = _pci_driver_step(action)
    _judge(host, address, writer)
    _set_driver(host, address, VFIO_DRIVER, writer)


def _pci_driver_undo(host: HostRoot, action: Action, writer: Writer) -> None:
    """Give the function back; a function leaving vfio-pci is reset and checked first, and one that
    fails the check stays on vfio-pci, quarantined, so no tenant's state reaches anyone else.

    Only what the kernel shows of the step is undone: a function on vfio-pci, or left without a
    driver with vfio-pci pinned (a move cut short), goes back; one on another driver with vfio-pci
    still pinned only loses the pin; any other function has left vfio-pci since, and is not touched.
    A driver other than vfio-pci takes the function only by the kernel's own match
    (:meth:`~aifactory_core.host.pcibind.PciBinder.set_driver`)."""
    from aifactory_core.host.sysfs import link_name, read_str

    address, original = _pci_driver_step(action)
    device = host.pci_devices / address
    current = link_name(device / "driver") or ""
    pinned = read_str(device / "driver_override") == VFIO_DRIVER
    if current != VFIO_DRIVER and not pinned:
        return
    _judge(host, address, writer)
    if current == VFIO_DRIVER:
        _judge_release(host, address, writer)
    if current and current != VFIO_DRIVER:
        _set_driver(host, address, current, writer)  # clears the pin, nothing else
        return
    if current == VFIO_DRIVER and original != VFIO_DRIVER:
        from aifactory_core.host.sanitize import sanitize

        if sanitize(host, address, writer) is not None:
            return
    _set_driver(host, address, original, writer)


register_executor("pci_driver", _pci_driver_do, _pci_driver_undo, claims_target=True, parallel=True)


def _fingerprint_do(host: HostRoot, action: Action, writer: Writer) -> None:
    import json

    from aifactory_core.host.fingerprint import record

    if not isinstance(writer, RecordingWriter):
        record(host, action.target, json.loads(action.value))


def _keep(host: HostRoot, action: Action, writer: Writer) -> None:
    """A record that stays after release: nothing to undo."""


register_executor("fingerprint", _fingerprint_do, _keep)


BUILTIN_PROVIDERS: dict[str, str] = {
    "vf_config": "aifactory_core.vnm.vf",
    "ovs_port": "aifactory_plugins.bluefield",
    "ovs_vxlan_port": "aifactory_plugins.bluefield",
    "ib_pkey": "aifactory_plugins.infiniband",
}
"""The module that registers each built-in kind on import. A process that undoes a journal (VNM
clean, release, repair) may not have imported the plugin that wrote a step, so the kind's module
is imported on first use: a fixed module name per kind, never one read from the journal."""


def executor_for(kind: str) -> ActionExecutor:
    """The registered executor of an action kind (a built-in kind's module imported on demand)."""
    if kind not in EXECUTORS and kind in BUILTIN_PROVIDERS:
        import importlib

        importlib.import_module(BUILTIN_PROVIDERS[kind])
    try:
        return EXECUTORS[kind]
    except KeyError:
        raise HostError(f"no executor for action kind {kind!r}") from None


def plan_writes(host: HostRoot, actions: Sequence[Action]) -> list[SysfsWrite]:
    """The exact sysfs writes ``actions`` would make, in order (dry run: nothing is changed)."""
    recorder = RecordingWriter()
    for action in actions:
        executor_for(action.kind).do(host, action, recorder)
    return recorder.writes


def undo_steps(host: HostRoot, journal: Journal, writer: Writer, scope: str | None = None) -> list[str]:
    """Undo every step not yet undone (of ``scope`` only, when given), newest first; returns the
    errors (keeps going)."""
    errors = []
    for step in reversed(journal.steps):
        if step.status == "undone" or (scope is not None and step.scope != scope):
            continue
        try:
            executor_for(step.action.kind).undo(host, step.action, writer)
        except AifactoryError as error:
            errors.append(error.message)
            continue
        except OSError as error:  # a state file the undo records (a full disk): the step stays to redo
            errors.append(f"{step.action.kind} {step.action.target}: {error.strerror or error}")
            continue
        step.status = "undone"
        _save_progress(journal)
    return errors


def _save_progress(journal: Journal) -> None:
    """Record a step as undone. A journal that cannot be written (no space left) does not stop the
    undo: every undo is idempotent, so a crash before the journal is removed only undoes the step
    again."""
    try:
        journal.save()
    except OSError as error:
        log.warning("VM %s: journal not updated (%s); going on with the undo", journal.vm_id, error.strerror)


def _disown_all(host: HostRoot, vm: int) -> None:
    for address, owner in ownership.held_devices(host).items():
        if owner == vm:
            ownership.disown(host, address, vm)


def _batches(actions: Sequence[Action]) -> list[list[Action]]:
    """Consecutive actions of a parallel kind form one batch; every other action is its own."""
    batches: list[list[Action]] = []
    for action in actions:
        if batches and executor_for(action.kind).parallel and batches[-1][-1].kind == action.kind:
            batches[-1].append(action)
        else:
            batches.append([action])
    return batches


def _run_batch(host: HostRoot, steps: list[Step], writer: Writer) -> None:
    """Make a batch's actions (in parallel when more than one), marking each done as it succeeds.

    Each device's writes carry their own deadline, so one hung unbind fails its step without
    holding up the others; the first failure is re-raised once all have finished.
    """
    def make(step: Step) -> None:
        executor_for(step.action.kind).do(host, step.action, writer)
        step.status = "done"

    if len(steps) == 1 or isinstance(writer, RecordingWriter):
        for step in steps:
            make(step)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(steps), 8), thread_name_prefix="prepare") as pool:
        futures = [pool.submit(make, step) for step in steps]
    errors = [future.exception() for future in futures if future.exception() is not None]
    if errors:
        raise errors[0]  # type: ignore[misc]


def make_steps(host: HostRoot, journal: Journal, actions: Sequence[Action], writer: Writer, *,
               scopes: Sequence[str] = ()) -> None:
    """Claim the devices, then make ``actions`` as new steps of ``journal`` (saved before and after
    each batch). On failure the caller undoes what was made."""
    scope_of = {id(action): scope for action, scope in zip(actions, scopes, strict=False)}
    for action in actions:
        if executor_for(action.kind).claims_target:
            ownership.claim(host, action.target, journal.vm_id)
    for batch in _batches(actions):
        steps = [Step(action, scope=scope_of.get(id(action), "")) for action in batch]
        journal.steps.extend(steps)
        journal.save()
        _run_batch(host, steps, writer)
        journal.save()


def prepare(host: HostRoot, vm: int, actions: Sequence[Action], writer: Writer | None = None, *,
            scopes: Sequence[str] = ()) -> Journal:
    """Claim the devices, then make every action, journaled; on failure undo all and re-raise.

    ``scopes`` (parallel to ``actions``) names the part of the VM each action belongs to, so that
    part can later be released alone (:mod:`aifactory_core.lifecycle.parts`)."""
    if scopes and len(scopes) != len(actions):
        raise ValueError("scopes must name one scope per action")
    writer = writer if writer is not None else SysfsWriter()
    existing = Journal.load(host, vm)
    if existing is not None and existing.phase == "prepared" and same_actions(existing, actions):
        _claim_again(host, existing)  # deploy retried after success: the claims still hold, or it fails
        return existing
    if existing is not None:  # unfinished, or made for another request: give it all back first
        actions = carried_undo(existing, actions)
        problems = rollback(host, existing, writer)
        if problems:
            raise HostError(f"VM {vm}: an earlier transaction could not be undone: {'; '.join(problems)}")
    journal = Journal(host, vm)
    try:
        journal.save()
        make_steps(host, journal, actions, writer, scopes=scopes)
        journal.phase = "prepared"
        journal.save()
    except BaseException as error:
        problems = rollback(host, journal, writer)
        message = error.message if isinstance(error, AifactoryError) else (
            f"VM {vm}: {error.strerror or error}" if isinstance(error, OSError) else None)
        if message is None:
            raise
        if problems:
            message = f"{message}; rollback also failed: {'; '.join(problems)}"
        if isinstance(error, AifactoryError) and not problems:
            raise
        raise HostError(message) from None
    return journal


def same_actions(journal: Journal, actions: Sequence[Action]) -> bool:
    """Whether ``journal`` made exactly ``actions`` (kind, target and value, in order): only then
    is a ``prepared`` journal the same deploy's, retried."""
    made = [(step.action.kind, step.action.target, step.action.value) for step in journal.steps]
    return made == [(action.kind, action.target, action.value) for action in actions]


def carried_undo(journal: Journal, actions: Sequence[Action]) -> list[Action]:
    """``actions`` planned over what ``journal`` made, each with the undo value of the journal's
    step of the same kind and target: undoing the journal puts a device back where it was before
    that journal (a GPU on nvidia), so that, not what the plan saw (the GPU on vfio-pci), is what the
    new step must give it back to."""
    from dataclasses import replace

    before = {(step.action.kind, step.action.target): step.action.undo_value for step in journal.steps}
    return [replace(action, undo_value=before[(action.kind, action.target)])
            if (action.kind, action.target) in before else action for action in actions]


def _claim_again(host: HostRoot, journal: Journal) -> None:
    """Every device the journal claimed is still this VM's and not quarantined (claim, again)."""
    for step in journal.steps:
        if executor_for(step.action.kind).claims_target:
            ownership.claim(host, step.action.target, journal.vm_id)


def rollback(host: HostRoot, journal: Journal, writer: Writer | None = None) -> list[str]:
    """Undo an unfinished (or any) transaction and give its devices back."""
    writer = writer if writer is not None else SysfsWriter()
    problems = undo_steps(host, journal, writer)
    if problems:
        log.error("VM %s: rollback incomplete: %s", journal.vm_id, "; ".join(problems))
        return problems
    _disown_all(host, journal.vm_id)
    journal.remove()
    return []


def release(host: HostRoot, vm: int, writer: Writer | None = None) -> bool:
    """Give back what ``prepare`` took for ``vm``; False when there was nothing to release."""
    journal = Journal.load(host, vm)
    if journal is None:
        _disown_all(host, vm)
        return False
    journal.phase = "releasing"
    journal.save()
    problems = rollback(host, journal, writer)
    if problems:
        raise HostError(f"release of VM {vm} incomplete: {'; '.join(problems)}")
    return True
