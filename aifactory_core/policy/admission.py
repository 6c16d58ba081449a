"""Frontend admission: what the API hook does after oned ran a VM-shaping call.

OpenNebula hooks run after the call and cannot veto it, so VMs are created on hold
(``VM_SUBMIT_ON_HOLD = "YES"`` in oned.conf, or ``hold = true`` in the call: oned 7.0 does not act
on a template's ``SUBMIT_ON_HOLD`` at instantiate) and this step *releases* the VMs
that pass — once: a VM already marked ``AIFACTORY_ADMISSION`` or carrying
``AIFACTORY_KEEP_HOLD = "YES"`` stays as it is — and keeps on hold (or,
with ``on_refusal = "terminate"``, terminates) the ones that do not, writing the reason into the
VM's ``USER_TEMPLATE`` (``AIFACTORY_POLICY_ERROR``) where the owner sees it.

The hook receives ``$API`` (base64 of ``<CALL_INFO>``) followed by the method name on stdin
(hook template ``ARGUMENTS = "$API one.vm.attachpci"``, ``ARGUMENTS_STDIN = "YES"``): CALL_INFO
does not name its method. Steps, each pure but the last:

1. :func:`read_event` — decode and parse (hardened); malformed input is a DocumentError.
2. :func:`vm_id_of` — the VM the call created or changed.
3. :func:`plan` — from the VM document, the tenant's usage and the policy: the calls to make.
4. make them through :class:`aifactory_core.policy.oned.Oned`.

When GPUs are asked, steps 3-4 (re-read the VM and the group's pool, decide, release) run under
:func:`group_lock`, an exclusive ``flock`` per OpenNebula group on the frontend (where the hook
manager runs every hook of one oned): two VMs of one tenant admitted at once are decided one
after the other, and the second sees the first already released (PENDING) in the pool.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from aifactory_core.errors import AifactoryError, DocumentError

if TYPE_CHECKING:
    from lxml import etree

    from aifactory_core.one.payload import CallInfo
    from aifactory_core.one.vm import NicRequest, PciRequest, VmRequest
    from aifactory_core.policy.decide import Decision, Usage
    from aifactory_core.policy.oned import Oned
    from aifactory_core.policy.schema import Policy

HOOKED_CALLS = (
    "one.template.instantiate", "one.vm.allocate", "one.vm.attachpci", "one.vm.attachnic",
    "one.vm.updateconf", "one.vm.resize",
)  # fmt: skip
CREATING_CALLS = frozenset({"one.template.instantiate", "one.vm.allocate"})
ERROR_ATTRIBUTE = "AIFACTORY_POLICY_ERROR"
STATUS_ATTRIBUTE = "AIFACTORY_ADMISSION"
KEEP_HOLD_ATTRIBUTE = "AIFACTORY_KEEP_HOLD"  # the owner wants the VM held: admit, do not release
# States whose VMs count toward the tenant's cap: those holding devices (PENDING, ACTIVE, SUSPENDED,
# POWEROFF: oned keeps the PCI allocation through poweroff/suspend) and those a tenant may bring back
# without any API call the hooks see (STOPPED, UNDEPLOYED: ``resume`` sends them to PENDING and the
# scheduler deploys them). HOLD VMs wait for admission: only an ADMIN operation releases them (install
# puts ``release`` into oned.conf's VM_ADMIN_OPERATIONS), so they are not counted until released.
HOLDING_STATES = frozenset({1, 3, 4, 5, 8, 9})
STATE_HOLD, STATE_PENDING = 2, 1
ATTACH_CALLS = frozenset({"one.vm.attachpci", "one.vm.attachnic"})

DEFAULT_LOCK_TIMEOUT = 60.0  # seconds; the admission hook templates allow 120

OnRefusal = Literal["hold", "terminate"]


class AdmissionLockTimeout(AifactoryError):
    """Another admission of the same group held the lock for longer than the bounded wait."""

    code = "lock"


@contextmanager
def group_lock(directory: Path, gid: int, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[Path]:
    """Hold ``directory/admission-<gid>.lock`` exclusively (created 0600), waiting at most ``timeout``
    seconds; the lock goes with the process, so a killed hook never leaves it taken."""
    from aifactory_core.flocks import flock_within

    path = directory / f"admission-{int(gid)}.lock"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as error:
        raise AifactoryError(f"admission lock {path}: {error.strerror or error}", code="lock") from None
    try:
        if not flock_within(descriptor, timeout):
            raise AdmissionLockTimeout(f"admission lock {path} still held by another admission after {timeout:g}s; "
                                       "VM left as it is")
        yield path
    finally:
        os.close(descriptor)  # closing the last descriptor drops the flock


@dataclass(frozen=True)
class Event:
    method: str
    call: CallInfo


@dataclass(frozen=True)
class Step:
    """One XML-RPC call the hook makes: ``method`` with ``params`` (session added by the client)."""

    method: str
    params: tuple[object, ...]

    def __str__(self) -> str:
        return f"{self.method}{self.params!r}"


def read_event(stdin: bytes, argv_method: str | None = None) -> Event:
    """Split ``"<base64> <method>"`` and parse the CALL_INFO; refuses anything unexpected (the
    input's size is bounded where it is read, :mod:`aifactory_core.policy.hookmain`)."""
    from aifactory_core.one.payload import parse_call_info

    parts = stdin.split()
    if not parts:
        raise DocumentError("hook input is empty: expected '$API METHOD' on stdin (ARGUMENTS_STDIN = \"YES\")")
    method = argv_method
    if len(parts) == 2:
        method = parts[1].decode("ascii", "replace")
    elif len(parts) > 2:
        raise DocumentError(f"hook input has {len(parts)} words: expected '$API METHOD'")
    if method is None:
        raise DocumentError("hook input names no method: expected '$API METHOD' (ARGUMENTS = \"$API one.vm.allocate\")")
    if method not in HOOKED_CALLS:
        raise DocumentError(f"hook input names method {str(method)[:60]!r}: expected one of {', '.join(HOOKED_CALLS)}")
    return Event(method, parse_call_info(parts[0], "$API payload", encoding="base64", method=method))


def vm_id_of(event: Event) -> int | None:
    """The VM the call acted on: OUT 2 for creating calls, IN 2 for calls on an existing VM."""
    if event.method in CREATING_CALLS:
        return event.call.object_id
    raw = event.call.inputs().get(2)
    if raw is None or not raw.isdigit() or len(raw) > 10:
        raise DocumentError(f"CALL_INFO of {event.method}: IN parameter 2 (the VM id) is missing or not an id")
    return int(raw)


def usage_from_pool(policy: Policy, vms: Iterable[VmRequest]) -> Usage:
    from aifactory_core.policy.decide import Usage, gpu_count

    usage = Usage()
    for vm in vms:
        if vm.state not in HOLDING_STATES:
            continue
        tenant = policy.tenant_for(vm.gid, vm.gname)
        if tenant is not None:
            usage.set(vm.vm_id, tenant.key, gpu_count(vm))
    return usage


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")[:1000]


def plan(event: Event, vm: VmRequest, decision: Decision, on_refusal: OnRefusal = "hold",
         detach: Iterable[Step] = ()) -> list[Step]:
    """The calls that carry out ``decision`` for ``vm`` (empty: nothing to change).

    A refusal is carried out by a call oned accepts in the state the VM is in after ``event``:

    * PENDING (any call): ``hold`` -- it is not placed; only an ADMIN releases it again;
    * HOLD: nothing -- it stays held;
    * after ``one.vm.attachpci`` (oned attaches PCI only in POWEROFF or UNDEPLOYED) or
      ``one.vm.attachnic`` (RUNNING or POWEROFF): ``detach``, the ``one.vm.detachpci`` /
      ``one.vm.detachnic`` calls :func:`detach_steps` names for the refused devices and NICs;
    * after ``one.vm.updateconf`` or ``one.vm.resize``: nothing to restore -- those calls change
      nothing the policy judges (OS, FEATURES, GRAPHICS, CONTEXT... and CPU, VCPU, MEMORY; PCI and
      NICs are not theirs, and RAW/DATA, which could add a hostdev, is one of oned's restricted
      attributes), so the refusal is about what the VM already had: it is recorded, and the host
      gate refuses the VM at its next deploy;
    * ``on_refusal = "terminate"``: ``terminate-hard`` in any state.
    """
    steps: list[Step] = []
    held_for_admission = (
        vm.state == STATE_HOLD
        and event.method in CREATING_CALLS
        and STATUS_ATTRIBUTE not in vm.user_template
        and vm.user_template.get(KEEP_HOLD_ATTRIBUTE, "").upper() != "YES"
    )
    if decision.admitted:
        if vm.user_template.get(ERROR_ATTRIBUTE) is not None or held_for_admission:
            steps.append(Step("one.vm.update", (vm.vm_id, f'{STATUS_ATTRIBUTE}="ADMITTED"\n{ERROR_ATTRIBUTE}=""', 1)))
        if held_for_admission:
            steps.append(Step("one.vm.action", ("release", vm.vm_id)))
        return steps
    reason = _quote(decision.reason)
    steps.append(Step("one.vm.update", (vm.vm_id, f'{STATUS_ATTRIBUTE}="REFUSED"\n{ERROR_ATTRIBUTE}="{reason}"', 1)))
    if on_refusal == "terminate":
        steps.append(Step("one.vm.action", ("terminate-hard", vm.vm_id)))
    elif vm.state == STATE_PENDING:
        steps.append(Step("one.vm.action", ("hold", vm.vm_id)))
    elif event.method in ATTACH_CALLS and vm.state != STATE_HOLD:
        steps.extend(detach)
    return steps


def detach_steps(policy: Policy, event: Event, vm: VmRequest, usage: Usage | None) -> list[Step]:
    """The detach calls that take back what an attach call gave against the policy: every PCI
    device (``one.vm.attachpci``) or NIC/PCI NIC (``one.vm.attachnic``) refused on its own, then,
    while the tenant is still over its GPU cap, the newest devices that count as GPUs. oned detaches
    a ``TYPE = "NIC"`` PCI device only through ``one.vm.detachnic`` (by its NIC_ID)."""
    from dataclasses import replace

    from aifactory_core.policy.decide import decide

    candidates: list[tuple[int, Step, PciRequest | None, NicRequest | None]] = []
    if event.method == "one.vm.attachpci":
        candidates = [(item.pci_id, Step("one.vm.detachpci", (vm.vm_id, item.pci_id)), item, None)
                      for item in vm.pci if not item.is_nic and item.pci_id is not None]
    elif event.method == "one.vm.attachnic":
        candidates = [(item.nic_id, Step("one.vm.detachnic", (vm.vm_id, item.nic_id)), item, None)
                      for item in vm.pci if item.is_nic and item.nic_id is not None]
        candidates += [(nic.nic_id, Step("one.vm.detachnic", (vm.vm_id, nic.nic_id)), None, nic)
                       for nic in vm.nics if nic.nic_id is not None]
    candidates.sort(key=lambda entry: entry[0], reverse=True)  # newest first: oned numbers upwards
    chosen: list[tuple[int, Step, PciRequest | None, NicRequest | None]] = []
    for entry in candidates:
        alone = replace(vm, pci=() if entry[2] is None else (entry[2],), nics=() if entry[3] is None else (entry[3],))
        if any(not refusal.rule.endswith(".max_gpus") for refusal in decide(policy, alone).refusals):
            chosen.append(entry)

    def remaining() -> VmRequest:
        kept_pci = tuple(item for item in vm.pci if not any(item is entry[2] for entry in chosen))
        kept_nics = tuple(nic for nic in vm.nics if not any(nic is entry[3] for entry in chosen))
        return replace(vm, pci=kept_pci, nics=kept_nics)

    for entry in candidates:
        if entry in chosen or entry[2] is None or entry[2].network_function:
            continue
        if not any(refusal.rule.endswith(".max_gpus") for refusal in decide(policy, remaining(), usage).refusals):
            break
        chosen.append(entry)
    return [entry[1] for entry in chosen]


def fetch_vm(oned: Oned, vm_id: int) -> VmRequest:
    from aifactory_core.one.vm import vm_from_element

    return vm_from_element(oned.document("one.vm.info", vm_id, False))


def fetch_usage(oned: Oned, policy: Policy, gid: int) -> Usage:
    """Usage of the VM's group: ``one.vmpool.infoextended(-2 all, -1, -1, -1 any state but DONE)``
    (the extended pool: the short ``one.vmpool.info`` body carries no PCI)."""
    from aifactory_core.one.vm import vm_from_element

    pool = oned.document("one.vmpool.infoextended", -2, -1, -1, -1)
    mine = (vm_from_element(item) for item in pool.iterfind("VM") if item.findtext("GID") == str(gid))
    return usage_from_pool(policy, mine)


def address_lookup(hostpool: etree._Element) -> Callable[[str], tuple[int, int, int] | None]:
    """What a request by SHORT_ADDRESS alone can get, from oned's host pool: the (vendor, device,
    class) that every host listing the address agrees on. Where no host lists it, or hosts list
    different devices there, the request stays unidentified (and matches no grant); the host gate
    identifies it again from the host's own sysfs before anything is bound."""
    from aifactory_core import validate
    from aifactory_core.errors import UsageError

    found: dict[str, set[tuple[int, int, int] | None]] = {}
    for pci in hostpool.iterfind("HOST/HOST_SHARE/PCI_DEVICES/PCI"):
        try:
            short = validate.pci_address((pci.findtext("SHORT_ADDRESS") or "").strip())[5:]
        except UsageError:
            continue
        identity: tuple[int, int, int] | None
        try:
            vendor, device, device_class = (validate.hex_id((pci.findtext(tag) or "").strip(), tag.lower())
                                            for tag in ("VENDOR", "DEVICE", "CLASS"))
            identity = (vendor, device, device_class)
        except UsageError:
            identity = None  # a device there that cannot be named: the address is not identified
        found.setdefault(short, set()).add(identity)

    def lookup(short_address: str) -> tuple[int, int, int] | None:
        identities = found.get(short_address, set())
        return next(iter(identities)) if len(identities) == 1 else None  # one device, or None

    return lookup


@dataclass(frozen=True)
class Outcome:
    vm_id: int | None
    decision: Decision | None
    steps: tuple[Step, ...]
    note: str

    def summary(self) -> str:
        verdict = "no VM" if self.decision is None else ("admitted" if self.decision.admitted else "refused")
        head = f"VM {self.vm_id}: {verdict}" if self.vm_id is not None else verdict
        detail = f" ({self.decision.reason})" if self.decision is not None and not self.decision.admitted else ""
        done = "; ".join(str(step) for step in self.steps) or "no change"
        return f"{head}{detail}; {self.note}; {done}"


def admit_event(
    event: Event, policy: Policy, oned_factory: type[Oned] | None = None, *, on_refusal: OnRefusal = "hold",
    endpoint: str | None = None, session: str | None = None, lock_directory: Path | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> Outcome:  # fmt: skip
    """Decide one hook event and carry the decision out (oned is contacted only when needed).

    With ``lock_directory``, a VM asking GPUs is re-read, decided and acted on under the group's
    :func:`group_lock`, so concurrent admissions of one tenant cannot both pass its GPU cap."""
    from aifactory_core.policy.decide import decide, gpu_count

    if not event.call.success:
        return Outcome(None, None, (), f"{event.method} failed in oned; nothing to admit")
    vm_id = vm_id_of(event)
    if vm_id is None:
        raise DocumentError(f"CALL_INFO of {event.method}: OUT parameter 2 (the new VM id) is missing")
    extra = event.call.extra_vm
    if extra is not None and extra.vm_id == vm_id and not extra.pci and not extra.nics:
        if extra.state != STATE_HOLD:
            return Outcome(vm_id, decide(policy, extra), (), "no devices or NICs requested")
    if oned_factory is None:
        from aifactory_core.policy.oned import Oned as default_factory

        oned_factory = default_factory
    oned = oned_factory(endpoint, session)
    vm = fetch_vm(oned, vm_id)
    if vm.vm_id != vm_id:
        raise DocumentError(f"one.vm.info {vm_id} answered VM {vm.vm_id}")
    if vm.gid is None or not gpu_count(vm):
        return _carry_out(event, oned, policy, vm, None, on_refusal)
    if lock_directory is None:
        return _carry_out(event, oned, policy, vm, fetch_usage(oned, policy, vm.gid), on_refusal)
    with group_lock(lock_directory, vm.gid, lock_timeout):
        vm = fetch_vm(oned, vm_id)  # as it is now, after any admission that held the lock before
        if vm.vm_id != vm_id or vm.gid is None:
            raise DocumentError(f"one.vm.info {vm_id} answered VM {vm.vm_id} (group {vm.gid})")
        return _carry_out(event, oned, policy, vm, fetch_usage(oned, policy, vm.gid), on_refusal)


def _carry_out(
    event: Event, oned: Oned, policy: Policy, vm: VmRequest, usage: Usage | None, on_refusal: OnRefusal
) -> Outcome:
    from aifactory_core.policy.decide import decide

    if event.method in ATTACH_CALLS:
        vm = _settled(oned, vm)
    if any(item.selects_by_address for item in vm.pci):
        from aifactory_core.policy.decide import resolve_addresses

        vm = resolve_addresses(vm, address_lookup(oned.document("one.hostpool.info")))
    decision = decide(policy, vm, usage)
    detach = detach_steps(policy, event, vm, usage) if not decision.admitted and event.method in ATTACH_CALLS else []
    steps = plan(event, vm, decision, on_refusal, detach)
    for step in steps:
        oned.call(step.method, *step.params)
    return Outcome(vm.vm_id, decision, tuple(steps), f"{event.method} on VM in state {vm.state_name}")


SETTLE_SECONDS = 30.0
HOTPLUG_NIC_STATES = frozenset({25, 65})  # HOTPLUG_NIC, HOTPLUG_NIC_POWEROFF: detachnic waits for them


def _settled(oned: Oned, vm: VmRequest) -> VmRequest:
    """``vm`` once oned has finished hot-plugging the NIC the call attached (a detach is refused
    until then), re-read for at most :data:`SETTLE_SECONDS`."""
    import time

    deadline = time.monotonic() + SETTLE_SECONDS
    while vm.state == 3 and vm.lcm_state in HOTPLUG_NIC_STATES and time.monotonic() < deadline:
        time.sleep(0.5)
        vm = fetch_vm(oned, vm.vm_id)
    return vm
