"""The ``vm/monitor`` probe's part in reconciliation: start ``aifactory repair --reconcile`` when a
VM the suite's records name has no running domain.

OpenNebula runs ``vm/monitor`` every monitoring cycle (``MONITOR_VM``, 30 s by default) as
``oneadmin``. The check is a few directory listings, and on the common host, where no VM holds
anything, one: the owner records (which the probe has read already), the device and network journal
directories, and libvirt's directory of running QEMU domains (``/run/libvirt/qemu``,
:mod:`aifactory_core.host.domains`). Only when a recorded VM is missing there does it start the
reconciliation, detached (its own session, stdio to ``<state dir>/probes/reconcile.log``), so the
probe's output and timing do not wait for any reset; the reconciliation itself reads the domains
again (``virsh`` where the directory cannot be read, and the QEMU processes), takes each VM's lock
and releases only what a VM without a domain holds (:mod:`aifactory_core.lifecycle.reconcile`).
It is started at most once per :data:`MIN_INTERVAL_S`, and only on the live host unless
``AIFACTORY_RECONCILE=on`` (:func:`enabled`).

Imports only the standard library (``subprocess`` only when it starts the reconciliation).
"""

import os
import sys
import time

from aifactory_core.probes.sysfs import Root, create_new

MIN_INTERVAL_S = 60.0
ENV_SWITCH = "AIFACTORY_RECONCILE"
STAMP = "reconcile.stamp"
LOG = "reconcile.log"
LIBVIRT_QEMU_STATE = "/run/libvirt/qemu"
JOURNAL_DIRECTORIES = ("vms", "vnm/vms")
ADMIN_VM = 2**31 - 1
""":data:`aifactory_core.lifecycle.ownership.ADMIN_VM` (not imported: the probe stays light)."""


def _vm_of(name: str, prefix: str, suffixes: tuple[str, ...]) -> int | None:
    stem, dot, suffix = name.rpartition(".")
    if not dot or suffix not in suffixes or not stem.startswith(prefix):
        return None
    digits = stem[len(prefix):]
    return int(digits) if digits.isdigit() and digits.isascii() and len(digits) <= 10 else None


def recorded(root: Root, held: dict[str, int]) -> set[int]:
    """The VMs an owner record (``held``) or a device or network journal names (the administrator's
    own holder aside)."""
    vms = set(held.values())
    for directory in JOURNAL_DIRECTORIES:
        try:
            names = os.listdir(os.path.join(root.state_dir, directory))
        except OSError:
            continue
        vms.update(vm for vm in (_vm_of(name, "", ("json",)) for name in names) if vm is not None)
    return vms - {ADMIN_VM}


def running(root: Root) -> set[int] | None:
    """The VMs libvirt's state directory shows running (the machine's own, unless the host root
    carries one, as :func:`aifactory_core.host.domains.running_vms` reads it); None when it cannot
    be listed."""
    own = root.path(LIBVIRT_QEMU_STATE)
    directory = own if not root.is_live and os.path.isdir(own) else LIBVIRT_QEMU_STATE
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    return {vm for vm in (_vm_of(name, "one-", ("xml", "pid")) for name in names) if vm is not None}


def due(root: Root, held: dict[str, int]) -> bool:
    """Whether a recorded VM may have no domain (or the domains cannot be listed here)."""
    vms = recorded(root, held)
    if not vms:
        return False
    live = running(root)
    return live is None or not vms <= live


def enabled(root: Root) -> bool:
    """On the live host unless ``AIFACTORY_RECONCILE=off``; on another host root (a capture, a
    test's tree) only with ``AIFACTORY_RECONCILE=on``: a probe run over a capture must not release
    what its state directory records."""
    setting = os.environ.get(ENV_SWITCH, "")
    return setting == "on" or (root.is_live and setting != "off")


def maybe_start(root: Root, held: dict[str, int]) -> bool:
    """Start the reconciliation when :func:`enabled`, :func:`due` and none was started in the last
    :data:`MIN_INTERVAL_S`; True when it was started."""
    if not enabled(root) or not due(root, held):
        return False
    directory = os.path.join(root.state_dir, "probes")
    stamp = os.path.join(directory, STAMP)
    try:
        if time.time() - os.stat(stamp).st_mtime < MIN_INTERVAL_S:
            return False
    except FileNotFoundError:
        pass
    os.makedirs(directory, exist_ok=True)
    with open(create_new(stamp), "w", encoding="ascii") as handle:  # never through a planted link
        handle.write(f"{int(time.time())}\n")
    _start(root, os.path.join(directory, LOG))
    return True


def _start(root: Root, log: str) -> None:
    import subprocess

    import aifactory_core

    source = os.path.dirname(os.path.dirname(os.path.abspath(aifactory_core.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (source, os.environ.get("PYTHONPATH"))))}
    argv = [sys.executable, "-m", "aifactory_core.cli"]
    if not root.is_live:
        argv += ["--host-root", root.prefix]
        env["AIFACTORY_STATE_DIR"] = root.state_dir
    argv += ["repair", "--reconcile"]
    with open(create_new(log, 0o644), "wb") as output:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=env,
                         cwd="/", start_new_session=True, close_fds=True)
