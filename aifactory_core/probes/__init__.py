"""Monitoring probes: GPU, NIC and fabric inventory and health for OpenNebula's IM probes.

This package is on the hot path (a process per probe run, every host, every cycle): its modules
import only what ``python3`` has already loaded at start-up (``os``, ``re``, ``base64``...) and
read sysfs directly under a host-root prefix. pynvml, threading and the lifecycle engine are
imported inside the functions that need them, and only when there is something for them to do.

The probe executables (``drivers/im/kvm-probes.d/...``) start from :func:`run` here, in the package
itself, so that a probe run loads one module fewer (each costs ~0.1 ms of import machinery). For
the same reason the modules a probe run loads do without ``from __future__ import annotations``
(which imports ``__future__``): an annotation naming what is imported only for type checking, or
a class not yet defined, is quoted.
OpenNebula runs each probe as ``<probe> kvm <host_id> <hostname>`` with the monitord config XML on
stdin, concatenates the outputs of a directory, and fails the whole directory (host in ERROR) when
one probe exits non-zero. So these never exit non-zero, never print a traceback, and do not read
stdin (the config XML is not needed). Options, for operators and tests only:
``AIFACTORY_HOST_ROOT``, ``AIFACTORY_STATE_DIR``, ``AIFACTORY_NVML_REPLAY`` (a recorded
``nvml.json``), ``AIFACTORY_PROBE_BUDGET_S`` (NVML deadline, default 5 s; the SYSTEM_HOST probe
timeout in monitord is far longer), ``AIFACTORY_RECONCILE`` (``off``: the vm/monitor probe starts no
reconciliation; ``on``: it does so also over a host root other than ``/``).
"""

import os
import sys


def _budget() -> float:
    try:
        seconds = float(os.environ.get("AIFACTORY_PROBE_BUDGET_S", "5"))
    except ValueError:
        return 5.0
    return min(max(seconds, 0.1), 60.0) if seconds == seconds else 5.0  # nan passes min/max unchanged


def run(kind: str) -> int:
    """Print the ``host-system`` or ``vm-monitor`` probe's output; always returns 0."""
    try:
        from aifactory_core.probes.sysfs import Root

        root = Root.from_environment()
        replay = os.environ.get("AIFACTORY_NVML_REPLAY") or None
        if kind == "host-system":
            from aifactory_core.probes.host_system import probe
        else:
            from aifactory_core.probes.vm_monitor import probe
        sys.stdout.write(probe(root, replay, _budget()))
        sys.stdout.flush()
    except BaseException as error:  # noqa: BLE001 - the stream must stay valid whatever happens
        if kind == "host-system":
            text = " ".join(f"{type(error).__name__}: {error}".split())[:300].replace('"', "'").rstrip("\\")
            sys.stdout.write(f'AIF_PROBE=[ STATUS="FAILED", PROBLEMS="{text}" ]\n')
    return 0
