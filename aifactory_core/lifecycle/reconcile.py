"""Giving back what a VM holds once it no longer runs, when no driver action did.

OpenNebula can take a VM off a host without running any VMM action there: the guest powers itself
off (monitoring moves the VM to POWEROFF), and a terminate or undeploy from POWEROFF runs only the
transfer driver's epilog. Its device journal, ownership records and network journal then outlive
the domain. :func:`reconcile` compares every VM those records name with the domains that run
(:func:`aifactory_core.host.domains.running_vms`) and gives back, through the same journaled
release as ``shutdown`` (:func:`aifactory_core.lifecycle.executor.release`: each function reset and
health-checked, back to its driver, ownership dropped; then the network journal's VFs scrubbed),
what a VM without a domain holds.

What keeps it from touching a VM that runs or is being started:

* the per-VM lock (:mod:`aifactory_core.lifecycle.vmlock`), taken without waiting: a VM whose
  deploy, release, VNM hook or repair is in flight is left alone (a deploy claims before its
  domain exists, and holds the lock until the domain runs or everything is given back);
* the domains are read again under that lock, so a domain started meanwhile is seen;
* a network journal younger than :data:`NETWORK_GRACE_S` of a VM with no device journal is left:
  VNM ``pre`` makes it in a process of its own just before ``deploy`` starts the domain;
* the root helper itself refuses to reset or unbind a function a process still uses through VFIO
  (:mod:`aifactory_core.host.vfio_users`), whatever these records say.

When the domains cannot be read (libvirt down), nothing is released. One VM's problem (a damaged
journal, a release that fails) is reported and the others are still reconciled.

It runs before a claim is refused as "held by VM N" (:func:`retrying_held`), and every monitoring
cycle: the ``vm/monitor`` probe starts ``aifactory repair --reconcile`` in the background when a
VM named by these records has no domain (:mod:`aifactory_core.probes.reconcile_trigger`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from aifactory_core.errors import AifactoryError

if TYPE_CHECKING:
    from aifactory_core.host.pcibind import Writer
    from aifactory_core.hostroot import HostRoot

log = logging.getLogger(__name__)
T = TypeVar("T")

NETWORK_GRACE_S = 120.0
"""A network journal this young, of a VM with no device journal and no domain, belongs to a deploy
whose VNM ``pre`` has run and whose VMM ``deploy`` has not started yet."""
RUN_LOCK = "reconcile.lock"


@dataclass
class ReconcileReport:
    released: list[int] = field(default_factory=list)
    """VMs without a domain whose records were given back."""
    running: list[int] = field(default_factory=list)
    """VMs with records whose domain runs: untouched."""
    busy: list[int] = field(default_factory=list)
    """VMs with an operation in flight (their lock is taken), or a network journal still in its
    grace period: untouched this time."""
    problems: list[str] = field(default_factory=list)


def recorded_vms(host: HostRoot) -> set[int]:
    """Every VM a device journal, an ownership record or a network journal names (the
    administrator's own holder, :data:`~aifactory_core.lifecycle.ownership.ADMIN_VM`, aside)."""
    from aifactory_core.lifecycle import ownership
    from aifactory_core.lifecycle.journal import journal_dir
    from aifactory_core.vnm.hook import vnm_host

    vms = set(ownership.held_devices(host).values())
    for scope in (host, vnm_host(host)):
        vms.update(_journal_ids(journal_dir(scope)))
    return vms - {ownership.ADMIN_VM}


def _journal_ids(directory: os.PathLike[str]) -> set[int]:
    from pathlib import Path

    from aifactory_core.lifecycle.atomic import names

    found = set()
    for name in names(Path(directory)):
        stem = name.removesuffix(".json")
        if name.endswith(".json") and stem.isdigit() and stem.isascii() and len(stem) <= 10:
            found.add(int(stem))
    return found


def reconcile(host: HostRoot, vms: Collection[int] | None = None, *, writer: Writer | None = None,
              running: Callable[[HostRoot], set[int]] | None = None) -> ReconcileReport:
    """Give back what every recorded VM (``vms``: only these) without a domain holds.

    ``running`` reads the domains (default :func:`aifactory_core.host.domains.running_vms`);
    ``writer`` is handed to the release (tests)."""
    from aifactory_core.host.domains import running_vms

    read_running = running or running_vms
    report = ReconcileReport()
    try:
        recorded = recorded_vms(host)
    except (OSError, AifactoryError) as error:
        report.problems.append(f"cannot read the state directory: {error}")
        return report
    candidates = sorted(recorded if vms is None else recorded & set(vms))
    if not candidates:
        return report
    try:
        live = read_running(host)
    except (OSError, AifactoryError) as error:
        report.problems.append(f"nothing released: {error}")
        return report
    for vm in candidates:
        if vm in live:
            report.running.append(vm)
            continue
        try:
            _reconcile_vm(host, vm, read_running, writer, report)
        except (OSError, AifactoryError) as error:
            report.problems.append(f"VM {vm}: {error}")
    return report


def _reconcile_vm(host: HostRoot, vm: int, read_running: Callable[[HostRoot], set[int]], writer: Writer | None,
                  report: ReconcileReport) -> None:
    from aifactory_core.lifecycle.executor import release
    from aifactory_core.lifecycle.journal import Journal, journal_dir, set_aside_ids
    from aifactory_core.lifecycle.vmlock import VmBusy, vm_lock
    from aifactory_core.vnm import vf  # noqa: F401  (registers the vf_config executor)
    from aifactory_core.vnm.hook import vnm_host

    try:
        with vm_lock(host, vm, timeout_s=0):
            if vm in read_running(host):  # started while the lock was free
                report.running.append(vm)
                return
            if vm not in recorded_vms(host):  # its own release finished while the lock was free
                return
            network = vnm_host(host)
            has_device_journal = (journal_dir(host) / f"{vm}.json").exists()
            if not has_device_journal and _young(journal_dir(network) / f"{vm}.json"):
                report.busy.append(vm)
                return
            aside = [name for scope in (host, network) for name in set_aside_ids(scope).get(vm, [])]
            if aside:  # the repair left what a damaged journal held to an administrator: so does this
                report.problems.append(f"VM {vm}: journal set aside as damaged ({', '.join(sorted(aside))}): "
                                       "what it held stays held ('aifactory device release' gives it back)")
                return
            problems = []
            for scope in (host, network):  # devices first, then the network, as shutdown then VNM clean
                try:
                    Journal.load(scope, vm)  # a damaged journal is reported, never guessed at
                    release(scope, vm, writer)
                except AifactoryError as error:
                    problems.append(error.message)
            if problems:
                report.problems.extend(f"VM {vm}: {problem}" for problem in problems)
                return
            log.warning("VM %s has no domain on this host: its devices and network were given back", vm)
            report.released.append(vm)
    except VmBusy:
        report.busy.append(vm)


def _young(path: os.PathLike[str]) -> bool:
    try:
        age = time.time() - os.stat(path, follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return False
    return age < NETWORK_GRACE_S


def retrying_held(host: HostRoot, attempt: Callable[[], T]) -> T:
    """``attempt()``; when it is refused because another VM holds a device or VF, reconcile that
    VM alone and, if it was given back (its domain is gone), ``attempt()`` once more. ``attempt``
    must plan afresh: what it planned before saw the device as the other VM left it."""
    from aifactory_core.lifecycle.ownership import DeviceHeld

    try:
        return attempt()
    except DeviceHeld as held:
        if held.owner is None:
            raise
        report = reconcile(host, [held.owner])
        if held.owner not in report.released:
            raise
        log.warning("VM %s no longer ran: what it held was given back before this claim", held.owner)
    return attempt()


def run_exclusive(host: HostRoot, work: Callable[[], T]) -> T | None:
    """``work()`` unless another reconciliation of the same state directory runs (then None): the
    probe may start one every cycle, and one at a time is enough."""
    from aifactory_core.flocks import flock_within
    from aifactory_core.lifecycle.atomic import open_lock

    descriptor = open_lock(host.state_dir / "locks" / RUN_LOCK)
    try:
        if not flock_within(descriptor, 0):
            return None
        return work()
    finally:
        os.close(descriptor)
