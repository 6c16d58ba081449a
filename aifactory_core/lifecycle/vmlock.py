"""The per-VM lock: one VM's deploy, release, repair and reconciliation never overlap.

A deploy holds it from the prepare until OpenNebula's original ``deploy`` returned (the domain then
exists, or everything was given back); a release (``shutdown``/``cancel``/``save``/``migrate``)
from the original until the devices are back; the VNM hooks for their journal; ``repair`` and the
reconciliation (:mod:`aifactory_core.lifecycle.reconcile`) while they judge and undo a VM's
journals. Repair and reconciliation never wait for it: a VM whose lock is taken has an action in
flight, and is left alone.

The lock is an ``flock`` on ``<state dir>/locks/vm-<id>.lock``, opened ``O_NOFOLLOW | O_CLOEXEC``
one directory at a time (:func:`aifactory_core.lifecycle.atomic.open_lock`): a link planted there
is never followed, whoever opens it, and the lock goes with the process. Within one process the
lock is re-entrant for the thread holding it (a deploy whose original failed releases under the
lock it already holds); another thread of the same process opens its own descriptor, so it waits as
another process would.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from aifactory_core.errors import HostError

if TYPE_CHECKING:
    from aifactory_core.hostroot import HostRoot

ACTION_TIMEOUT_S = 300.0
"""How long a driver action waits for a repair or reconciliation of its VM to finish."""


class VmBusy(HostError):
    """The VM's lock is held by another operation."""

    code = "vm-busy"


_guard = threading.Lock()
_held: dict[tuple[str, int], tuple[int, int]] = {}
"""(lock path, thread id) -> (descriptor, depth) of the locks this process holds."""


def lock_path(host: HostRoot, vm: int) -> str:
    from aifactory_core.validate import vm_id

    return str(host.state_dir / "locks" / f"vm-{vm_id(vm)}.lock")


@contextmanager
def vm_lock(host: HostRoot, vm: int, timeout_s: float = ACTION_TIMEOUT_S) -> Iterator[None]:
    """Hold VM ``vm``'s lock; :class:`VmBusy` when another operation holds it past ``timeout_s``
    (``0``: do not wait)."""
    from pathlib import Path

    from aifactory_core.flocks import flock_within
    from aifactory_core.lifecycle.atomic import open_lock

    path = lock_path(host, vm)
    key = (path, threading.get_ident())
    with _guard:
        mine = _held.get(key)
        if mine is not None:
            _held[key] = (mine[0], mine[1] + 1)
    if mine is None:
        descriptor = open_lock(Path(path))
        if not flock_within(descriptor, timeout_s):
            os.close(descriptor)
            raise VmBusy(f"VM {vm} is busy: another operation holds its lock")
        with _guard:
            _held[key] = (descriptor, 1)
    try:
        yield
    finally:
        with _guard:
            descriptor, depth = _held[key]
            if depth > 1:
                _held[key] = (descriptor, depth - 1)
            else:
                del _held[key]
                os.close(descriptor)
