"""The VMM driver actions OpenNebula runs on a KVM host, and the lifecycle events that run them.

One table for two readers: the VMM wrapper (:mod:`aifactory_core.vmm`) finds each argument of an
action by its position here, and ``docs/lifecycle.md`` is :func:`render_table`'s output.
``tests/test_vmm_actions.py`` checks every action's arguments against OpenNebula's own driver
source at each of :data:`CHECKED_VERSIONS` and the document against this module.

OpenNebula's driver passes an action its own arguments, each single-quoted, then appends the VM id
and the host the script runs on: ``save '<deploy id>' '<checkpoint file>' '<host>' <vmid> <host>``.
"""

from __future__ import annotations

from dataclasses import dataclass

CHECKED_VERSIONS = ("7.0.2", "7.4.0")

VM_ID = "vm_id"
HOST = "host"
DEPLOY_ID = "deploy_id"
DEPLOYMENT_FILE = "deployment_file"
CHECKPOINT_FILE = "checkpoint_file"
DEST_HOST = "dest_host"
APPENDED = (VM_ID, HOST)

DRIVER_ACTION_DATA = "VMM_DRIVER_ACTION_DATA (plain XML)"


@dataclass(frozen=True)
class DriverAction:
    """One script under ``remotes/vmm/kvm``: what OpenNebula passes it, and whether the suite wraps it."""

    name: str
    parameters: tuple[str, ...]
    """The action's own arguments, before the appended ``<vmid> <host>``."""
    stdin: str
    wrapped: bool

    @property
    def argv(self) -> tuple[str, ...]:
        return (*self.parameters, *APPENDED)

    def position(self, argument: str) -> int:
        """Where ``argument`` sits in the argv; ValueError when the action does not get it."""
        return self.argv.index(argument)

    def usage(self) -> str:
        own = " ".join(f"'<{parameter.replace('_', ' ')}>'" for parameter in self.parameters)
        return f"{self.name} {own} <vmid> <host>"


ACTIONS: dict[str, DriverAction] = {action.name: action for action in (
    DriverAction("deploy", (DEPLOYMENT_FILE, HOST), "the libvirt domain (deployment file)", True),
    DriverAction("shutdown", (DEPLOY_ID, HOST), DRIVER_ACTION_DATA, True),
    DriverAction("cancel", (DEPLOY_ID, HOST), DRIVER_ACTION_DATA, True),
    DriverAction("save", (DEPLOY_ID, CHECKPOINT_FILE, HOST), DRIVER_ACTION_DATA, True),
    DriverAction("restore", (CHECKPOINT_FILE, HOST, DEPLOY_ID), DRIVER_ACTION_DATA, True),
    DriverAction("migrate", (DEPLOY_ID, DEST_HOST, HOST), DRIVER_ACTION_DATA, True),
    DriverAction("reboot", (DEPLOY_ID, HOST), DRIVER_ACTION_DATA, False),
    DriverAction("reset", (DEPLOY_ID, HOST), DRIVER_ACTION_DATA, False),
    DriverAction("attach_nic", (DEPLOY_ID, "mac", "bridge", "model", "vn_mad", "target"), DRIVER_ACTION_DATA, False),
    DriverAction("detach_nic", (DEPLOY_ID, "mac"), DRIVER_ACTION_DATA, False),
    DriverAction("resize", (DEPLOY_ID,), DRIVER_ACTION_DATA, False),
    DriverAction("prereconfigure", (DEPLOY_ID, "target_device"), DRIVER_ACTION_DATA, False),
    DriverAction("reconfigure", (DEPLOY_ID, "target_device", "target_path"), DRIVER_ACTION_DATA, False),
)}
RELEASING = frozenset({"shutdown", "cancel", "save", "migrate"})
"""Wrapped actions after whose success the domain is gone from the host they ran on."""


def wrapped(name: str) -> DriverAction | None:
    """The action ``name`` when the suite wraps it."""
    action = ACTIONS.get(name)
    return action if action is not None and action.wrapped else None


@dataclass(frozen=True)
class Step:
    """A driver step OpenNebula runs on a host: a VMM action (a key of :data:`ACTIONS`) or a VNM
    phase (``vnm pre``/``vnm post``/``vnm clean``)."""

    action: str
    where: str = "the VM's host"


@dataclass(frozen=True)
class LifecycleEvent:
    """Something that happens to a VM, the host steps it runs in order, and what the suite does."""

    event: str
    states: str
    steps: tuple[Step, ...]
    suite: str


_PRE, _POST, _CLEAN = Step("vnm pre"), Step("vnm post"), Step("vnm clean")
_DEPLOY = (_PRE, Step("deploy"), _POST)
_RESTORE = (_PRE, Step("restore"), _POST)
_CONTEXT = (Step("prereconfigure"), Step("reconfigure"))
_CONTEXT_NOTE = ("; prereconfigure and reconfigure (which OpenNebula runs after every NIC hot-plug, with the "
                 "transfer driver's context step between them when the VM has a context disk) only renew the "
                 "context CD-ROM")
_GIVES_BACK = "the wrapper gives the devices back once the action succeeded; VNM clean scrubs the VFs"

EVENTS: tuple[LifecycleEvent, ...] = (
    LifecycleEvent("deploy", "PENDING → PROLOG → BOOT → RUNNING", _DEPLOY,
                   "claims, binds and edits the domain before the original runs; a failed VNM post makes "
                   "OpenNebula run cancel, which gives everything back"),
    LifecycleEvent("terminate", "RUNNING → SHUTDOWN → EPILOG → DONE", (Step("shutdown"), _CLEAN), _GIVES_BACK),
    LifecycleEvent("terminate --hard", "RUNNING → SHUTDOWN → EPILOG → DONE", (Step("cancel"), _CLEAN), _GIVES_BACK),
    LifecycleEvent("poweroff", "RUNNING → SHUTDOWN_POWEROFF → POWEROFF", (Step("shutdown"), _CLEAN), _GIVES_BACK),
    LifecycleEvent("poweroff --hard", "RUNNING → SHUTDOWN_POWEROFF → POWEROFF", (Step("cancel"), _CLEAN),
                   _GIVES_BACK),
    LifecycleEvent("undeploy", "RUNNING → SHUTDOWN_UNDEPLOY → EPILOG_UNDEPLOY → UNDEPLOYED",
                   (Step("shutdown"), _CLEAN), _GIVES_BACK),
    LifecycleEvent("undeploy --hard", "RUNNING → SHUTDOWN_UNDEPLOY → EPILOG_UNDEPLOY → UNDEPLOYED",
                   (Step("cancel"), _CLEAN), _GIVES_BACK),
    LifecycleEvent("suspend", "RUNNING → SAVE_SUSPEND → SUSPENDED", (Step("save"), _CLEAN),
                   _GIVES_BACK + " (QEMU saves a domain with passthrough functions only when they support "
                                 "VFIO migration; otherwise save fails and the VM keeps running with them)"),
    LifecycleEvent("stop", "RUNNING → SAVE_STOP → EPILOG_STOP → STOPPED", (Step("save"), _CLEAN),
                   _GIVES_BACK + "; the transfer driver moves the VM directory (checkpoint, deployment "
                                 "files) off the host"),
    LifecycleEvent("resume from SUSPENDED", "SUSPENDED → BOOT_SUSPENDED → RUNNING", _RESTORE,
                   "the restore wrapper claims and binds the devices again before the original restores"),
    LifecycleEvent("resume from STOPPED", "STOPPED → PENDING → PROLOG_RESUME → BOOT_STOPPED → RUNNING",
                   tuple(Step(step.action, "the newly chosen host") for step in _RESTORE),
                   "as resume from SUSPENDED, on the host the VM directory was moved to"),
    LifecycleEvent("resume from POWEROFF", "POWEROFF → BOOT_POWEROFF → RUNNING", _DEPLOY,
                   "as deploy: functions PCI-attached while powered off are claimed with the rest (after a "
                   "guest-initiated poweroff the old claim has been reconciled away: see that row)"),
    LifecycleEvent("resume from UNDEPLOYED", "UNDEPLOYED → PENDING → PROLOG_UNDEPLOY → BOOT_UNDEPLOY → RUNNING",
                   tuple(Step(step.action, "the newly chosen host") for step in _DEPLOY), "as deploy"),
    LifecycleEvent("migrate (cold)", "RUNNING → SAVE_MIGRATE → PROLOG_MIGRATE → BOOT_MIGRATE → RUNNING",
                   (Step("save", "the old host"), Step("vnm clean", "the old host"),
                    Step("vnm pre", "the new host"), Step("restore", "the new host"),
                    Step("vnm post", "the new host")),
                   "save gives the devices back on the old host, restore claims the saved domain's on the new "
                   "one (OpenNebula restores the saved domain unchanged: its hostdevs name the old host's "
                   "addresses; a function held by another VM there refuses the restore)"),
    LifecycleEvent("migrate --poweroff / --poweroff-hard",
                   "RUNNING → SAVE_MIGRATE → PROLOG_MIGRATE → BOOT → RUNNING",
                   (Step("shutdown", "the old host"), Step("vnm clean", "the old host"),
                    *(Step(step.action, "the new host") for step in _DEPLOY)),
                   "the old host gives the devices back (shutdown, or cancel with --poweroff-hard); the new "
                   "host's deploy claims the functions OpenNebula allocated there"),
    LifecycleEvent("migrate --live (source)", "RUNNING → MIGRATE → RUNNING",
                   (Step("migrate", "the source host"), Step("vnm clean", "the source host")),
                   "the migrate wrapper gives the devices back on the source once the domain left"),
    LifecycleEvent("migrate --live (destination)", "RUNNING → MIGRATE → RUNNING",
                   (Step("vnm pre", "the destination host"), Step("vnm post", "the destination host")),
                   "no VMM action runs here, so nothing claims devices on the destination: a domain with "
                   "passthrough functions migrates only when they support VFIO migration, and then "
                   "arrives unclaimed (a gap: claim them before such a migration)"),
    LifecycleEvent("reboot", "RUNNING", (Step("reboot"),), "nothing: the domain keeps its devices"),
    LifecycleEvent("reset", "RUNNING", (Step("reset"),), "nothing: the domain keeps its devices"),
    LifecycleEvent("resched", "RUNNING (RESCHED=1)", (),
                   "the scheduler migrates the VM (live or cold per LIVE_RESCHEDS): see the migrate rows"),
    LifecycleEvent("NIC attach (running)", "RUNNING → HOTPLUG_NIC → RUNNING",
                   (_PRE, Step("attach_nic"), _POST, *_CONTEXT),
                   "VNM pre/post configure a PCI NIC's VF as a part of the VM of its own" + _CONTEXT_NOTE),
    LifecycleEvent("NIC detach (running)", "RUNNING → HOTPLUG_NIC → RUNNING", (Step("detach_nic"), _CLEAN, *_CONTEXT),
                   "VNM clean scrubs the PCI NIC's VF and gives back that part alone" + _CONTEXT_NOTE),
    LifecycleEvent("resize (live: VCPU, MEMORY)", "RUNNING → HOTPLUG_RESIZE → RUNNING", (Step("resize"),),
                   "nothing at resize: the cpu_pinning plugin pinned every vCPU the domain can have (`<vcpu>`'s "
                   "maximum, VCPU_MAX, not `current`) at deploy, so a vCPU `virsh setvcpus --live` plugs in runs "
                   "on the CPUs planned for it (a VM oned pins has no VCPU_MAX: oned refuses it with TOPOLOGY); "
                   "memory hot-plugged as a DIMM (MEMORY_RESIZE_MODE = HOTPLUG) lands in guest cell 0, bound by "
                   "its strict memnode, and is not in the pinning record until the next deploy"),
    LifecycleEvent("NIC or PCI attach/detach in POWEROFF or UNDEPLOYED", "POWEROFF or UNDEPLOYED", (),
                   "no host action (KVM has no cold NIC attach; pci-attach/-detach change the template only): "
                   "the next deploy claims what the new domain takes"),
    LifecycleEvent("guest-initiated poweroff", "RUNNING → SHUTDOWN_POWEROFF → POWEROFF (found by monitoring)", (),
                   "no host action: the domain is gone, so the next vm/monitor probe run (every MONITOR_VM cycle) "
                   "starts 'aifactory repair --reconcile', which gives the devices and VFs back through the "
                   "journaled release (reset, health check, back to the driver; VFs scrubbed); a deploy asking "
                   "for them sooner reconciles their VM first; terminate or undeploy from POWEROFF (the transfer "
                   "epilog only) then finds nothing held, and resume deploys afresh"),
    LifecycleEvent("host failure", "RUNNING → UNKNOWN; the host error hook may recover --recreate", (),
                   "nothing until the host answers again: the claims stay on the failed host"),
    LifecycleEvent("host recovery", "UNKNOWN → RUNNING (domain found again) or → POWEROFF", (),
                   "after a reboot, aifactory-repair.service ('aifactory repair --boot', before libvirt) gives "
                   "back every claim; a host back without a reboot keeps the claims of the domains still "
                   "running, and the probe's reconciliation gives back those whose domain is gone"),
    LifecycleEvent("recover --recreate (delete-recreate), recover --delete",
                   "any → CLEANUP_RESUBMIT → PENDING, or → CLEANUP_DELETE → DONE",
                   (Step("cancel"), _CLEAN, Step("cancel", "the migration's other host"),
                    Step("vnm clean", "the migration's other host")),
                   "the cancel wrapper gives the devices back on each host that answers (OpenNebula ignores "
                   "a failure; the second pair runs only for a VM caught migrating); a recreated VM is "
                   "deployed again"),
)


def _step_text(step: Step) -> str:
    if step.action.startswith("vnm "):
        return f"VNM `{step.action[4:]}`"
    return f"`{ACTIONS[step.action].usage()}`"


def _steps_text(steps: tuple[Step, ...]) -> str:
    """The steps in order, each run of steps on one host named once: ``a, b on the old host; ...``."""
    if not steps:
        return "none"
    runs: list[tuple[str, list[Step]]] = []
    for step in steps:
        if runs and runs[-1][0] == step.where:
            runs[-1][1].append(step)
        else:
            runs.append((step.where, [step]))
    return "; ".join(", ".join(map(_step_text, run)) + f" on {where}" for where, run in runs)


def render_table() -> str:
    """The table of ``docs/lifecycle.md``: every event, what runs on which host, what the suite does."""
    versions = " and ".join(CHECKED_VERSIONS)
    lines = [f"| event | OpenNebula states | host steps in order, argv as OpenNebula {versions} pass it "
             "| what the suite does |",
             "|---|---|---|---|"]
    lines += [f"| {event.event} | {event.states} | {_steps_text(event.steps)} | {event.suite} |" for event in EVENTS]
    return "\n".join(lines) + "\n"
