"""A stand-in for the kernel's driver core on a generated sysfs tree, for orchestration tests.

Writes to a generated tree only change plain files, so the real ``pci_driver`` executor cannot be
verified there; this double moves the ``driver`` symlinks the way the kernel would. It exercises
ordering, journaling, ownership and rollback only — the real binding is proven by the real-kernel
tests (``tests/realkernel/test_vfio_transaction.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import executor
from aifactory_core.model import Action


class SimulatedDriverCore:
    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.calls: list[tuple[str, str]] = []

    def set_driver(self, host: HostRoot, address: str, driver: str) -> None:
        from aifactory_core.errors import HostError

        self.calls.append((address, driver))
        if self.fail_on == f"{address}->{driver}":
            raise HostError(f"simulated failure binding {address} to {driver}")
        device = host.pci_devices / address
        link = device / "driver"
        real_device = Path(os.path.realpath(device))
        if link.is_symlink():
            link.unlink()
        if driver:
            (host.pci_drivers / driver).mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(host.pci_drivers / driver, real_device))
        (device / "driver_override").write_text(f"{driver}\n" if driver == "vfio-pci" else "(null)\n")

    def install(self, monkeypatch: object) -> None:
        def do(host: HostRoot, action: Action, writer: object) -> None:
            self.set_driver(host, action.target, action.value)

        def undo(host: HostRoot, action: Action, writer: object) -> None:
            self.set_driver(host, action.target, action.undo_value or "")

        monkeypatch.setitem(executor.EXECUTORS, "pci_driver",  # type: ignore[attr-defined]
                            executor.ActionExecutor(do, undo, claims_target=True, parallel=True))
