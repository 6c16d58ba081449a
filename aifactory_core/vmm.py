"""The KVM VMM driver extension: what the wrapped actions do around OpenNebula's originals.

OpenNebula calls ``<remotes>/vmm/kvm/<action>`` on the host; the suite's wrapper there runs
:func:`aifactory_core.vmm_fast.main` with ``<action> <wrapper path> <argv...>``, which runs the
original alone for a VM the suite has nothing to do for and otherwise calls :func:`main` here
(``python -m aifactory_core.vmm`` with the same arguments skips that check). This module keeps the
original contract (same argv; stdout = the original's stdout; non-zero exit + one stderr line on
refusal) around the original script, kept beside the wrapper as ``<action>.one``. Where each
argument sits in an action's argv is :mod:`aifactory_core.vmm_actions`' table:

- ``deploy '<deployment file>' '<host>' <vmid> <host>``, domain XML on stdin: admit (policy
  plugins), configure the VM's network VFs if VNM ``pre`` could not yet (from ``vm.xml`` beside
  the deployment file), prepare (journaled, rolled back on failure), let plugins edit the domain,
  run the original with the edited domain; if the original fails, release again.
- ``restore '<checkpoint>' '<host>' '<deploy id>' <vmid> <host>``: the same admission, network and
  prepare for the domain the VM was deployed with (the newest ``deployment.N`` beside the
  checkpoint; the saved domain already carries deploy's edits), then the original; if it fails,
  release what this restore claimed.
- ``shutdown``/``cancel``/``save``/``migrate``: run the original, then (the domain is gone from this
  host) release what deploy took. Every action is idempotent: ``cancel`` may follow a failed deploy.

Each action runs under its VM's lock (:mod:`aifactory_core.lifecycle.vmlock`), so neither ``aifactory
repair`` nor the reconciliation (:mod:`aifactory_core.lifecycle.reconcile`) touches a VM whose claim
exists before its domain does. A claim refused because another VM holds the device reconciles that
VM first: when its domain is gone, what it held is given back and the claim is planned again.

Log records go to stderr as ``WARN: aifactory <action>: ...`` (OpenNebula's driver log convention),
but only once the action succeeded: OpenNebula 6.10 makes a failed action's whole stderr its error
message, so a failure's stderr carries the error alone (plus ERROR records, which belong to it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from aifactory_core import vmm_actions
from aifactory_core.errors import AifactoryError, DocumentError, HostError, PolicyRefused, UsageError
from aifactory_core.model import Action, DeployRequest
from aifactory_core.validate import vm_id as check_vm_id
from aifactory_core.vmm_actions import DriverAction

if TYPE_CHECKING:
    from aifactory_core.config import Config
    from aifactory_core.hostroot import HostRoot
    from aifactory_core.lifecycle.journal import Journal

ENV_ORIGINAL_DIR = "AIFACTORY_VMM_ORIGINAL_DIR"
MAX_STDIN = 4 * 1024 * 1024


def deploy_request(domain: Any, vm: int, vm_document: Path | None = None) -> DeployRequest:
    from aifactory_core.domain import one_metadata, pci_hostdevs

    meta = one_metadata(domain)
    addresses = tuple(dict.fromkeys(ref.address for _element, ref in pci_hostdevs(domain)))
    return DeployRequest(vm_id=vm, pci_addresses=addresses,
                         uid=meta.uid if meta else None, gid=meta.gid if meta else None,
                         uname=meta.uname if meta else None, gname=meta.gname if meta else None,
                         vm_document=vm_document)


@dataclass(frozen=True)
class DeployPlan:
    """What ``deploy`` will do, decided before anything changes."""

    request: DeployRequest
    actions: list[Action]
    manager: Any  # the pluggy manager that planned it (its domain_xml hook edits the domain)
    inventory: Any  # the HostInventory it planned on


def plan_deploy(host: HostRoot, config: Config, domain: Any, vm: int, vm_document: Path | None = None) -> DeployPlan:
    """Admission and the actions every plugin wants, without changing anything."""
    from aifactory_core.host.inventory import HostInventory
    from aifactory_core.plugins import build_manager

    manager, _loaded = build_manager(config)
    inventory = HostInventory(host)
    request = deploy_request(domain, vm, vm_document)
    refusals = [reason for result in manager.hook.aifactory_admit(inventory=inventory, request=request, config=config)
                for reason in (result or ())]
    if refusals:
        raise PolicyRefused(f"VM {vm} refused: {'; '.join(refusals)}")
    actions = [action for result in manager.hook.aifactory_prepare(inventory=inventory, request=request, config=config)
               for action in (result or ())]
    return DeployPlan(request, actions, manager, inventory)


def _vm_directory(path: str, what: str, host: HostRoot) -> Path:
    """The VM directory holding ``path`` (an absolute path OpenNebula passed), under the host root."""
    if not path.startswith("/") or ".." in path.split("/") or "\0" in path:
        raise UsageError(f"{what} {path[:200]!r} is not an absolute path")
    return host.path(os.path.dirname(os.path.normpath(path)))


def vm_document_of(deployment_file: str, host: HostRoot) -> Path:
    """The ``vm.xml`` OpenNebula writes beside the remote deployment file before ``deploy``."""
    return _vm_directory(deployment_file, "deploy: deployment file", host) / "vm.xml"


def deployment_file_beside(checkpoint_file: str, vm: int, host: HostRoot) -> Path:
    """The newest ``deployment.N`` in the VM directory holding the checkpoint: the domain ``deploy``
    started (after the suite's edits), so the one ``save`` wrote into the checkpoint."""
    directory = _vm_directory(checkpoint_file, "restore: checkpoint", host)
    if directory.name != str(vm):
        raise UsageError(f"restore: checkpoint {checkpoint_file[:200]!r} is not in VM {vm}'s directory")
    numbered = [path for path in directory.glob("deployment.*") if path.suffix[1:].isdigit()]
    if not numbered:
        raise HostError(f"restore: no deployment file beside {checkpoint_file[:200]}: the devices of VM {vm} "
                        "are unknown")
    return max(numbered, key=lambda path: int(path.suffix[1:]))


class Claim(NamedTuple):
    """What one call claimed: the devices (False when it found them claimed already) and the
    network VFs (True only when VNM ``pre`` had not configured them), and the VM's journal."""

    devices: bool
    network: bool
    journal: Journal


def _claim(host: HostRoot, config: Config, plan: DeployPlan, vm: int, vm_document: Path | None) -> Claim:
    """Configure the VM's network VFs when VNM ``pre`` could not (see
    :func:`aifactory_core.vnm.hook.configure_at_deploy`), then prepare the plan's actions
    (journaled); a failure gives back the network part this call made."""
    from aifactory_core.lifecycle.executor import prepare, same_actions
    from aifactory_core.lifecycle.journal import Journal

    existing = Journal.load(host, vm)
    claimed_before = existing is not None and existing.phase == "prepared" and same_actions(existing, plan.actions)
    network_made = False
    if vm_document is not None:
        from aifactory_core.vnm.hook import configure_at_deploy

        network_made = configure_at_deploy(host, config, vm, vm_document)
    try:
        journal = prepare(host, vm, plan.actions)
    except BaseException:
        if network_made:
            _undo_network(host, vm)
        raise
    return Claim(devices=not claimed_before, network=network_made, journal=journal)


def prepare_deploy(host: HostRoot, config: Config, domain_xml: bytes, vm: int,
                   vm_document: Path | None = None) -> tuple[bytes, bool]:
    """Admit, configure the VM's network VFs and prepare the devices (:func:`_claim`), then
    rewrite the domain. Returns the domain to start, and whether this call configured the network
    (then a failed start must give it back). Any failure undoes what this call made."""
    from aifactory_core.domain import dump_domain, load_domain
    from aifactory_core.lifecycle.executor import rollback
    from aifactory_core.lifecycle.reconcile import retrying_held

    domain = load_domain(domain_xml)

    def plan_and_claim() -> tuple[DeployPlan, Claim]:
        plan = plan_deploy(host, config, domain, vm, vm_document)
        return plan, _claim(host, config, plan, vm, vm_document)

    plan, claim = retrying_held(host, plan_and_claim)
    try:
        plan.manager.hook.aifactory_domain_xml(inventory=plan.inventory, request=plan.request, domain=domain,
                                               config=config)
        return dump_domain(domain), claim.network
    except BaseException:
        rollback(host, claim.journal)
        if claim.network:
            _undo_network(host, vm)
        raise


def prepare_restore(host: HostRoot, config: Config, checkpoint_file: str, vm: int) -> Claim:
    """Before ``restore``: admit and claim again what the saved domain takes, as deploy did.

    The saved domain carries deploy's edits already, so no plugin edits anything; and
    ``restore`` also wakes a domain the guest suspended, whose claim was never given back (then
    :attr:`Claim.devices` is False and a failed restore must leave it)."""
    from aifactory_core.domain import load_domain
    from aifactory_core.lifecycle.reconcile import retrying_held

    deployment = deployment_file_beside(checkpoint_file, vm, host)
    vm_document = deployment.parent / "vm.xml"
    domain = load_domain(deployment.read_bytes(), str(deployment))
    return retrying_held(host, lambda: _claim(host, config, plan_deploy(host, config, domain, vm, vm_document), vm,
                                              vm_document))


def _undo_network(host: HostRoot, vm: int) -> None:
    from aifactory_core.vnm.hook import undo_at_deploy

    undo_at_deploy(host, vm)


def release_vm(host: HostRoot, vm: int) -> bool:
    from aifactory_core.lifecycle.executor import release

    return release(host, vm)


def _original(wrapper: str, action: str) -> Path:
    directory = os.environ.get(ENV_ORIGINAL_DIR) or os.path.dirname(os.path.abspath(wrapper))
    return Path(directory) / f"{action}.one"


def _run_original(wrapper: str, action: str, argv: Sequence[str], stdin: bytes) -> int:
    original = _original(wrapper, action)
    if not os.access(original, os.X_OK):
        raise UsageError(f"original {action} driver {original} is missing: re-run install.sh --upgrade")
    completed = subprocess.run([str(original), *argv], input=stdin, check=False)
    return completed.returncode


def _vm_of(action: DriverAction, argv: Sequence[str]) -> int:
    if len(argv) != len(action.argv):
        raise UsageError(f"{action.name}: expected {action.usage()}, got {len(argv)} arguments")
    return check_vm_id(argv[action.position(vmm_actions.VM_ID)])


def _read_stdin(data: bytes | None = None) -> bytes:
    """stdin, or ``data`` when the caller read it already."""
    if data is None:
        data = sys.stdin.buffer.read(MAX_STDIN + 1)
    if len(data) > MAX_STDIN:
        raise DocumentError(f"driver input is larger than {MAX_STDIN} bytes")
    return data


def run_action(name: str, wrapper: str, argv: Sequence[str], stdin_data: bytes | None = None) -> int:
    from aifactory_core.hostroot import HostRoot

    action = vmm_actions.wrapped(name)
    if action is None:
        known = ", ".join(sorted(each.name for each in vmm_actions.ACTIONS.values() if each.wrapped))
        raise UsageError(f"{name[:40]!r} is not a VMM action the suite wraps ({known})")
    vm = _vm_of(action, argv)
    stdin = _read_stdin(stdin_data)
    host = HostRoot.resolve(None)
    _check_input(name, action, argv, stdin, host, vm)
    from aifactory_core.lifecycle.vmlock import vm_lock

    with vm_lock(host, vm):  # no repair or reconciliation of this VM while its action runs
        return _run_locked(name, action, wrapper, argv, stdin, host, vm)


def _check_input(name: str, action: DriverAction, argv: Sequence[str], stdin: bytes, host: HostRoot, vm: int) -> None:
    """Refuse what cannot be acted on before anything is written, the VM's lock file included:
    deploy's domain must parse, restore's checkpoint must have its deployment file beside it."""
    if name == "deploy":
        from aifactory_core.domain import load_domain

        load_domain(stdin)
    elif name == "restore":
        deployment_file_beside(argv[action.position(vmm_actions.CHECKPOINT_FILE)], vm, host)


def _run_locked(name: str, action: DriverAction, wrapper: str, argv: Sequence[str], stdin: bytes, host: HostRoot,
                vm: int) -> int:
    """The action under the VM's lock: deploy and restore from the claim until the original
    returned (the domain then runs, or all is given back), the others from the original until the
    devices are back."""
    from aifactory_core.config import load_config

    if name == "deploy":
        config = load_config(None)
        deployment_file = argv[action.position(vmm_actions.DEPLOYMENT_FILE)]
        domain, network_made = prepare_deploy(host, config, stdin, vm, vm_document_of(deployment_file, host))
        status = _run_original(wrapper, name, argv, domain)
        if status != 0:
            release_vm(host, vm)
            if network_made:
                _undo_network(host, vm)
        return status
    if name == "restore":
        claim = prepare_restore(host, load_config(None), argv[action.position(vmm_actions.CHECKPOINT_FILE)], vm)
        status = _run_original(wrapper, name, argv, stdin)
        if status != 0:
            if claim.devices:
                release_vm(host, vm)
            if claim.network:
                _undo_network(host, vm)
        return status
    status = _run_original(wrapper, name, argv, stdin)
    if status == 0 and name in vmm_actions.RELEASING:
        release_vm(host, vm)
    return status


def main(argv: Sequence[str] | None = None, stdin: bytes | None = None) -> int:
    """The wrapped action; ``stdin``: what :mod:`aifactory_core.vmm_fast` read of stdin already."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        sys.stderr.write("usage: python -m aifactory_core.vmm ACTION WRAPPER_PATH ARGS...\n")
        return 2
    action, wrapper, rest = args[0], args[1], args[2:]
    from aifactory_core.driverlog import hold_log

    held = hold_log(action)
    try:
        status = run_action(action, wrapper, rest, stdin)
    except AifactoryError as error:
        held.write(succeeded=False)
        sys.stderr.write(f"aifactory {action}: {error.message}\n")
        return error.exit_status or 1
    except Exception as error:  # a defect: OpenNebula shows stderr as the VM's error, so one line
        held.write(succeeded=False)
        if os.environ.get("AIFACTORY_DEBUG") == "1":
            raise
        sys.stderr.write(f"aifactory {action}: internal error: {type(error).__name__}: {error}\n")
        return 1
    held.write(succeeded=status == 0)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
