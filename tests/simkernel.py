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


class KernelWriter:
    """A sysfs writer for a generated tree that answers as the kernel's driver core would, so the
    real ``pci_driver`` executor, :class:`~aifactory_core.host.pcibind.PciBinder` and the reset
    and health check of :func:`~aifactory_core.host.sanitize.sanitize` run unchanged: an
    ``unbind`` drops the ``driver`` link, ``drivers_probe`` binds the pinned driver (vfio-pci, and
    then its ``/dev/vfio/<group>`` node appears) or else the driver the function had when this
    writer was made (the kernel's own match), ``reset`` is recorded. Orchestration only: the
    real binding is proven on the real-kernel test host."""

    def __init__(self, host: HostRoot) -> None:
        from aifactory_core.host.sysfs import link_name

        self.host = host
        self.native = {device.name: link_name(device / "driver") or "" for device in host.pci_devices.iterdir()}
        self.resets: list[str] = []
        self.writes: list[tuple[str, str]] = []

    def write(self, path: Path, value: str, why: str) -> None:
        self.writes.append((str(path), value))
        if path.name == "unbind":
            (path.parent.parent / "driver").unlink()
        elif path.name == "drivers_probe":
            self._probe(value.strip())
        elif path.name == "reset":
            self.resets.append(path.parent.name)
        else:
            path.write_text(value)

    def _probe(self, address: str) -> None:
        from aifactory_core.host.sysfs import link_name

        device = self.host.pci_devices / address
        override = (device / "driver_override").read_text().strip()
        driver = override if override not in ("", "(null)") else self.native.get(address, "")
        if not driver:
            return
        link = device / "driver"
        if link.is_symlink():
            link.unlink()
        (self.host.pci_drivers / driver).mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(self.host.pci_drivers / driver, os.path.realpath(device)))
        if driver == "vfio-pci":
            group = link_name(device / "iommu_group")
            node = self.host.path(f"/dev/vfio/{group}")
            node.parent.mkdir(parents=True, exist_ok=True)
            node.touch()
