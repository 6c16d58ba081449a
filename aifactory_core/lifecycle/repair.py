"""Finishing what a crash interrupted: roll back half-made prepares, finish half-made releases,
and drop device ownership no journal explains.

At host boot (``boot=True``) no VM runs yet — OpenNebula's libvirt domains are transient — so a
VM whose prepare had finished is gone too: its devices are given back like any other.

A damaged journal stops nothing: it is set aside (:func:`~aifactory_core.lifecycle.journal.set_aside`),
named in one problem line, and every other journal is repaired. What the damaged one held stays
held — no one can tell from it what to give back — until an administrator removes the set-aside
file (``aifactory device release`` gives a device back by hand)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from aifactory_core.errors import AifactoryError
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import ownership
from aifactory_core.lifecycle.executor import rollback
from aifactory_core.lifecycle.journal import scan, set_aside, set_aside_ids


@dataclass
class RepairReport:
    rolled_back: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    busy: list[int] = field(default_factory=list)
    """VMs whose lock an action in flight holds (a deploy, a release): left to it."""
    orphans_dropped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, other: RepairReport) -> None:
        for each in fields(self):
            getattr(self, each.name).extend(getattr(other, each.name))


def repair(host: HostRoot, *, boot: bool = False, lock_host: HostRoot | None = None) -> RepairReport:
    """Roll back or finish every unfinished transaction; ``boot``: every journal is stale.

    Each VM is repaired under its lock (:mod:`aifactory_core.lifecycle.vmlock`, in ``lock_host``'s
    state directory: the device journals' host also for the network journals), taken without
    waiting: a VM whose deploy or release is running is that action's, and is left alone (``busy``)."""
    from aifactory_core.lifecycle.journal import Journal
    from aifactory_core.lifecycle.vmlock import VmBusy, vm_lock

    report = RepairReport()
    locks = lock_host or host
    journals, damaged = scan(host)
    for error in damaged:
        try:
            where = f"set aside as {set_aside(host, error.vm_id)}"
        except (OSError, AifactoryError) as failure:
            where = f"could not be set aside ({failure})"
        report.problems.append(f"VM {error.vm_id}: {error.message}; {where}; its devices stay held")
    for found in journals:
        if found.phase == "prepared" and not boot:
            report.kept.append(found.vm_id)
            continue
        try:
            with vm_lock(locks, found.vm_id, timeout_s=0):
                journal = Journal.load(host, found.vm_id)  # as it is now, under the lock
                if journal is None:
                    continue
                if journal.phase == "prepared" and not boot:
                    report.kept.append(journal.vm_id)
                    continue
                problems = rollback(host, journal)
        except VmBusy:
            report.busy.append(found.vm_id)
            continue
        except AifactoryError as error:
            report.problems.append(f"VM {found.vm_id}: {error.message}")
            continue
        if problems:
            report.problems.extend(f"VM {journal.vm_id}: {problem}" for problem in problems)
        elif journal.phase == "preparing":
            report.rolled_back.append(journal.vm_id)
        else:
            report.released.append(journal.vm_id)
    remaining, still_damaged = scan(host)
    live = {journal.vm_id for journal in remaining} | {error.vm_id for error in still_damaged}
    live |= set(set_aside_ids(host)) | set(report.busy)
    for address, owner in ownership.held_devices(host).items():
        if owner in live:
            continue
        try:
            with vm_lock(locks, owner, timeout_s=0):
                if Journal.load(host, owner) is None:  # a prepare may have begun meanwhile
                    ownership.disown(host, address, owner)
                    report.orphans_dropped.append(address)
        except VmBusy:
            report.busy.append(owner)
        except AifactoryError as error:
            report.problems.append(f"VM {owner}: {error.message}")
    return report


def state_owner(host: HostRoot) -> tuple[int, int] | None:
    """The user (uid, gid) a repair started as root must run as: the state directory's owner; None
    when it may go on as it is (not root, no state directory, or root's own).

    The journals are that user's (``oneadmin``'s) data: replaying them takes that user's rights, and
    every privileged step then goes through the root helper, which judges it by its own rules, as
    it does for the drivers (docs/threat-model.md). A root-owned state directory others can write
    is refused."""
    import os

    from aifactory_core.errors import HostError
    from aifactory_core.nofollow import open_directory

    if os.geteuid() != 0:
        return None
    try:
        descriptor = open_directory(host.state_dir)
    except FileNotFoundError:
        return None
    try:
        info = os.fstat(descriptor)
    finally:
        os.close(descriptor)
    if info.st_uid == 0:
        if info.st_mode & 0o022:
            raise HostError(f"state dir {host.state_dir} is root's but writable by others: not repairing from it")
        return None
    return info.st_uid, info.st_gid
