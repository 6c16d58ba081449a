"""Which OpenNebula VMs run on this host now: the libvirt domains ``one-<id>`` that are active.

OpenNebula's domains are transient, so a VM whose guest powered itself off, or that was destroyed
outside OpenNebula, has no domain left. Two readings, joined (a VM either one finds is running):

* libvirt's own state directory for running QEMU domains, ``/run/libvirt/qemu``: libvirt keeps
  ``<name>.xml`` (and QEMU's ``<name>.pid``) there while the domain is active and removes them when
  it stops; listing it costs one ``readdir``. Where it cannot be listed, ``virsh -c qemu:///system
  list --name`` (the way OpenNebula's own KVM driver asks).
* the processes: a QEMU whose command line carries ``-name guest=one-<id>`` (``/proc/*/cmdline``),
  so a domain libvirt lost track of (libvirtd restarted, its state directory wiped) still counts.

Both readings err towards "running": a stale file or a process that only claims the name keeps a
VM's devices held; nothing here can make a running VM look gone. When neither libvirt reading is
possible the answer is unknown (:class:`DomainsUnknown`) and callers must release nothing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from aifactory_core.errors import HostError

if TYPE_CHECKING:
    from aifactory_core.hostroot import HostRoot

LIBVIRT_QEMU_STATE = "/run/libvirt/qemu"
LIBVIRT_URI = "qemu:///system"
VIRSH_TIMEOUT_S = 30
PREFIX = "one-"


class DomainsUnknown(HostError):
    """Which domains run cannot be told (libvirt unreachable)."""


def vm_of_domain(name: str) -> int | None:
    """The VM id of domain name ``one-<id>``; None for any other name."""
    digits = name[len(PREFIX):] if name.startswith(PREFIX) else ""
    return int(digits) if digits.isdigit() and digits.isascii() and len(digits) < 10 else None


def _from_state_directory(directory: str) -> set[int] | None:
    """The VMs libvirt's state directory ``directory`` shows running; None when it cannot be listed."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return None
    running = set()
    for entry in entries:
        stem, dot, suffix = entry.rpartition(".")
        vm = vm_of_domain(stem) if dot and suffix in ("xml", "pid") else None
        if vm is not None:
            running.add(vm)
    return running


def _from_virsh() -> set[int] | None:
    import subprocess

    try:
        completed = subprocess.run(["virsh", "-c", LIBVIRT_URI, "list", "--name"], capture_output=True, text=True,
                                   timeout=VIRSH_TIMEOUT_S, check=False, env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired):
        return None
    if completed.returncode != 0:
        return None
    return {vm for vm in (vm_of_domain(line.strip()) for line in completed.stdout.splitlines()) if vm is not None}


def qemu_processes(proc: str) -> set[int]:
    """VM ids named by a running QEMU's ``-name guest=one-<id>`` (or ``-name one-<id>``) in ``proc``."""
    running: set[int] = set()
    try:
        pids = [entry for entry in os.listdir(proc) if entry.isdigit()]
    except OSError:
        return running
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/cmdline", "rb") as handle:
                words = handle.read(1 << 16).split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        for index, word in enumerate(words[:-1]):
            if word != b"-name":
                continue
            for part in words[index + 1].split(b","):
                name = part.removeprefix(b"guest=").decode("ascii", "replace")
                vm = vm_of_domain(name)
                if vm is not None:
                    running.add(vm)
    return running


def running_vms(host: HostRoot) -> set[int]:
    """The ids of the VMs whose domain is active; :class:`DomainsUnknown` when libvirt cannot be read.

    Libvirt and its QEMUs are the machine's own: read from the live machine, unless the host root
    carries a libvirt state directory of its own (a test's tree: then its ``/proc`` too)."""
    own = str(host.path(LIBVIRT_QEMU_STATE))
    if not host.is_live and os.path.isdir(own):
        running = _from_state_directory(own)
        proc = str(host.path("/proc"))
    else:
        running = _from_state_directory(LIBVIRT_QEMU_STATE)
        proc = "/proc"
        if running is None:
            running = _from_virsh()
    if running is None:
        raise DomainsUnknown(f"cannot tell which domains run: {LIBVIRT_QEMU_STATE} is unreadable "
                             f"and 'virsh -c {LIBVIRT_URI} list' failed")
    return running | qemu_processes(proc)
