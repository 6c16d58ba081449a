"""Finishing what a crash interrupted: roll back half-made prepares, finish half-made releases,
and drop device ownership no journal explains.

At host boot (``boot=True``) no VM runs yet — OpenNebula's libvirt domains are transient — so a
VM whose prepare had finished is gone too: its devices are given back like any other."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import ownership
from aifactory_core.lifecycle.executor import rollback
from aifactory_core.lifecycle.journal import Journal, all_journals


@dataclass
class RepairReport:
    rolled_back: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    orphans_dropped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, other: RepairReport) -> None:
        for each in fields(self):
            getattr(self, each.name).extend(getattr(other, each.name))


def repair(host: HostRoot, *, boot: bool = False) -> RepairReport:
    """Roll back or finish every unfinished transaction; ``boot``: every journal is stale."""
    report = RepairReport()
    journals: list[Journal] = list(all_journals(host))
    for journal in journals:
        if journal.phase == "prepared" and not boot:
            report.kept.append(journal.vm_id)
            continue
        problems = rollback(host, journal)
        if problems:
            report.problems.extend(f"VM {journal.vm_id}: {problem}" for problem in problems)
        elif journal.phase == "preparing":
            report.rolled_back.append(journal.vm_id)
        else:
            report.released.append(journal.vm_id)
    live = {journal.vm_id for journal in all_journals(host)}
    for address, owner in ownership.held_devices(host).items():
        if owner not in live:
            ownership.disown(host, address, owner)
            report.orphans_dropped.append(address)
    return report


def restore_state_owner(host: HostRoot) -> list[str]:
    """Give what a repair run as root wrote in the state dir (journals, quarantine and reset records,
    the directories holding them) to the state dir's owner, so the unprivileged drivers and probes
    can read and replace it; returns the paths it changed.

    Each path is opened without following links and changed through that descriptor, and only when
    root owns it and it has a single link: a link planted in the directory cannot hand over anything
    outside it."""
    import os
    import stat

    state = host.state_dir
    try:
        owner = os.stat(state)
    except FileNotFoundError:
        return []
    if os.geteuid() != 0 or owner.st_uid == 0:
        return []
    changed: list[str] = []
    for directory, subdirs, names in os.walk(state):
        for name in [*subdirs, *names]:
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue  # a link, or gone
            try:
                info = os.fstat(fd)
                single = stat.S_ISDIR(info.st_mode) or (stat.S_ISREG(info.st_mode) and info.st_nlink == 1)
                if info.st_uid == 0 and single:
                    os.fchown(fd, owner.st_uid, owner.st_gid)
                    changed.append(path)
            finally:
                os.close(fd)
    return changed
