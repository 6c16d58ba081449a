"""The KVM VMM driver extension: what the wrapped ``deploy``/``cancel``/``shutdown`` actions do.

OpenNebula calls ``<remotes>/vmm/kvm/<action>`` on the host; the suite's wrapper there runs
``python -m aifactory_core.vmm <action> <wrapper path> <argv...>``, and this module keeps the
original contract (same argv; stdout = the original's stdout; non-zero exit + one stderr line on
refusal) around the original script, kept beside the wrapper as ``<action>.one``:

- ``deploy '<deployment file>' '<host>' <vmid> <host>``, domain XML on stdin: admit (policy
  plugins), configure the VM's network VFs if VNM ``pre`` could not yet (from ``vm.xml`` beside
  the deployment file), prepare (journaled, rolled back on failure), let plugins edit the domain,
  run the original with the edited domain; if the original fails, release again.
- ``cancel``/``shutdown``/``reset``… ``'<deploy id>' '<host>' <vmid> <host>``: run the original, then
  (when the VM is gone) release what deploy took. Every action is idempotent: ``cancel`` may follow
  a failed deploy.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aifactory_core.errors import AifactoryError, DocumentError, PolicyRefused, UsageError
from aifactory_core.model import Action, DeployRequest
from aifactory_core.validate import vm_id as check_vm_id

if TYPE_CHECKING:
    from aifactory_core.config import Config
    from aifactory_core.hostroot import HostRoot

ENV_ORIGINAL_DIR = "AIFACTORY_VMM_ORIGINAL_DIR"
RELEASING_ACTIONS = ("cancel", "shutdown", "save", "migrate")
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


def vm_document_of(deployment_file: str, host: HostRoot) -> Path:
    """The ``vm.xml`` OpenNebula writes beside the remote deployment file before ``deploy``."""
    if not deployment_file.startswith("/") or ".." in deployment_file.split("/") or "\0" in deployment_file:
        raise UsageError(f"deploy: deployment file {deployment_file[:200]!r} is not an absolute path")
    return host.path(os.path.dirname(os.path.normpath(deployment_file))) / "vm.xml"


def prepare_deploy(host: HostRoot, config: Config, domain_xml: bytes, vm: int,
                   vm_document: Path | None = None) -> tuple[bytes, bool]:
    """Admit, configure the VM's network VFs (when VNM ``pre`` could not: see
    :func:`aifactory_core.vnm.hook.configure_at_deploy`), prepare the devices (journaled) and
    rewrite the domain. Returns the domain to start, and whether this call configured the network
    (then a failed start must give it back). Any failure undoes what this call made."""
    from aifactory_core.domain import dump_domain, load_domain
    from aifactory_core.lifecycle.executor import prepare, rollback

    domain = load_domain(domain_xml)
    plan = plan_deploy(host, config, domain, vm, vm_document)
    network_made = False
    if vm_document is not None:
        from aifactory_core.vnm.hook import configure_at_deploy

        network_made = configure_at_deploy(host, config, vm, vm_document)
    try:
        journal = prepare(host, vm, plan.actions)
        try:
            plan.manager.hook.aifactory_domain_xml(inventory=plan.inventory, request=plan.request, domain=domain,
                                                   config=config)
            return dump_domain(domain), network_made
        except BaseException:
            rollback(host, journal)
            raise
    except BaseException:
        if network_made:
            _undo_network(host, vm)
        raise


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


def _vm_of(action: str, argv: Sequence[str]) -> int:
    if len(argv) < 3:
        raise UsageError(f"{action}: expected '<file or deploy id>' '<host>' <vmid> ..., got {len(argv)} arguments")
    return check_vm_id(argv[2])


def _read_stdin() -> bytes:
    data = sys.stdin.buffer.read(MAX_STDIN + 1)
    if len(data) > MAX_STDIN:
        raise DocumentError(f"driver input is larger than {MAX_STDIN} bytes")
    return data


def run_action(action: str, wrapper: str, argv: Sequence[str]) -> int:
    from aifactory_core.config import load_config
    from aifactory_core.hostroot import HostRoot

    vm = _vm_of(action, argv)
    stdin = _read_stdin()
    host = HostRoot.resolve(None)
    if action == "deploy":
        config = load_config(None)
        domain, network_made = prepare_deploy(host, config, stdin, vm, vm_document_of(argv[0], host))
        status = _run_original(wrapper, action, argv, domain)
        if status != 0:
            release_vm(host, vm)
            if network_made:
                _undo_network(host, vm)
        return status
    status = _run_original(wrapper, action, argv, stdin)
    if status == 0 and action in RELEASING_ACTIONS:
        release_vm(host, vm)
    return status


class _OpenNebulaLogFormat(logging.Formatter):
    """``WARN: aifactory deploy: ...``: OpenNebula 7 forwards stderr lines that start with
    ``ERROR:``/``WARN:``/``INFO:``/``DEBUG:`` to the VM's log instead of its error message."""

    LEVELS = {"WARNING": "WARN", "CRITICAL": "ERROR"}

    def __init__(self, action: str) -> None:
        super().__init__()
        self.action = action

    def format(self, record: logging.LogRecord) -> str:
        level = self.LEVELS.get(record.levelname, record.levelname)
        return f"{level}: aifactory {self.action}: {' '.join(record.getMessage().split())}"


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # a log line must never fail the action
            self.handleError(record)


def _log_to_opennebula(action: str) -> None:
    for name, level in (("aifactory", logging.INFO), ("aifactory_core", logging.WARNING)):
        logger = logging.getLogger(name)
        for old in [handler for handler in logger.handlers if isinstance(handler, _StderrHandler)]:
            logger.removeHandler(old)
        handler = _StderrHandler()
        handler.setFormatter(_OpenNebulaLogFormat(action))
        logger.addHandler(handler)
        logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        sys.stderr.write("usage: python -m aifactory_core.vmm ACTION WRAPPER_PATH ARGS...\n")
        return 2
    action, wrapper, rest = args[0], args[1], args[2:]
    _log_to_opennebula(action)
    try:
        return run_action(action, wrapper, rest)
    except AifactoryError as error:
        sys.stderr.write(f"aifactory {action}: {error.message}\n")
        return error.exit_status or 1
    except Exception as error:  # a defect: OpenNebula shows stderr as the VM's error, so one line
        if os.environ.get("AIFACTORY_DEBUG") == "1":
            raise
        sys.stderr.write(f"aifactory {action}: internal error: {type(error).__name__}: {error}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
