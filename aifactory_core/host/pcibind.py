"""The only code that moves a PCI function between drivers (and resets it).

Binding to vfio-pci uses ``driver_override`` + ``unbind`` + ``drivers_probe`` (never ``new_id``,
which would claim every device with the same ids); giving a function back to a host driver clears
the override and lets the kernel's own match bind it. Every sysfs write has a deadline: an ``unbind`` that blocks
(the NVIDIA driver waits for every ``/dev/nvidiaN`` holder) fails the action instead of hanging the
deploy. All paths come from the host root; every address and driver name is validated first.

``SysfsWriter`` performs writes; ``RecordingWriter`` only records them, which gives ``--dry-run``
the exact writes in order.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aifactory_core.errors import HostError
from aifactory_core.host.sysfs import link_name, read_str
from aifactory_core.hostroot import HostRoot
from aifactory_core.validate import driver_name, pci_address

NO_DRIVER = ""
VFIO_DRIVER = "vfio-pci"
DEFAULT_WRITE_TIMEOUT_S = 20.0
DEFAULT_SETTLE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class SysfsWrite:
    path: str
    value: str
    why: str


class SysfsWriter:
    """Writes one value to one sysfs file, giving up after ``timeout_s``."""

    def __init__(self, timeout_s: float = DEFAULT_WRITE_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s

    def write(self, path: Path, value: str, why: str) -> None:
        outcome: list[BaseException | None] = []

        def attempt() -> None:
            try:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, value.encode())
                finally:
                    os.close(fd)
                outcome.append(None)
            except BaseException as error:  # handed to the waiting thread
                outcome.append(error)

        worker = threading.Thread(target=attempt, name=f"sysfs-write {path.name}", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            raise HostError(f"writing {value.strip() or 'newline'} to {path} did not finish within "
                            f"{self.timeout_s:.0f}s ({why}); something still holds the device")
        error = outcome[0] if outcome else None
        if error is not None:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise HostError(f"writing {value.strip() or 'newline'} to {path} failed: {reason} ({why})")


@dataclass
class RecordingWriter:
    """Records writes instead of making them (dry run)."""

    writes: list[SysfsWrite] = field(default_factory=list)

    def write(self, path: Path, value: str, why: str) -> None:
        self.writes.append(SysfsWrite(str(path), value, why))


Writer = SysfsWriter | RecordingWriter


def _wait(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


class PciBinder:
    """Moves functions between drivers under one host root."""

    def __init__(self, host: HostRoot, writer: Writer | None = None,
                 settle_timeout_s: float = DEFAULT_SETTLE_TIMEOUT_S) -> None:
        self.host = host
        self.writer: Writer = writer if writer is not None else SysfsWriter()
        self.settle_timeout_s = settle_timeout_s

    @property
    def dry_run(self) -> bool:
        return isinstance(self.writer, RecordingWriter)

    def device_dir(self, address: str) -> Path:
        directory = self.host.pci_devices / pci_address(address)
        if not (directory / "vendor").exists():
            raise HostError(f"PCI device {address} is not on this host")
        return directory

    def driver_of(self, address: str) -> str:
        return link_name(self.device_dir(address) / "driver") or NO_DRIVER

    def iommu_group(self, address: str) -> int | None:
        group = link_name(self.device_dir(address) / "iommu_group")
        return int(group) if group and group.isdigit() else None

    def set_driver(self, address: str, driver: str) -> None:
        """Put ``address`` on ``driver`` (``""``: no driver); idempotent and verified.

        Only vfio-pci is pinned through ``driver_override`` (it claims no device by its own id
        table). Any other driver gets a function only by the kernel's own match: the pin is cleared
        and the kernel probes the function, and the driver it chose must be ``driver``. No caller
        forces a driver onto a function that driver does not claim."""
        address = pci_address(address)
        if driver:
            driver_name(driver)
        directory = self.device_dir(address)
        current = self.driver_of(address)
        override = read_str(directory / "driver_override")
        pinned = override not in (None, "", "(null)")
        if current == driver and (driver == VFIO_DRIVER or not pinned or override == driver):
            if driver == VFIO_DRIVER:
                self._wait_vfio_node(address)
            return
        if driver and not (self.host.pci_drivers / driver).is_dir() and not self.dry_run:
            raise HostError(f"driver {driver} is not loaded on this host (modprobe {driver})")
        if driver == VFIO_DRIVER:
            self.writer.write(directory / "driver_override", f"{driver}\n", f"only {driver} may claim {address}")
        else:
            self.writer.write(directory / "driver_override", "\n", f"no driver pinned on {address}")
        if current and current != driver:
            self.writer.write(directory / "driver" / "unbind", address, f"detach {address} from {current}")
        if driver and current != driver:
            why = f"let {driver} probe {address}" if driver == VFIO_DRIVER else \
                f"let the kernel's own match take {address} (expected: {driver})"
            self.writer.write(self.host.path("/sys/bus/pci/drivers_probe"), address, why)
        if self.dry_run:
            return
        if driver and not _wait(lambda: self.driver_of(address) != NO_DRIVER, self.settle_timeout_s):
            raise HostError(f"{address} did not bind to {driver} (now: no driver)")
        if self.driver_of(address) != driver:
            bound = self.driver_of(address) or "no driver"
            raise HostError(f"{address} is on {bound}, not {driver}" if not driver or driver == VFIO_DRIVER
                            else f"the kernel's own match put {address} on {bound}, not {driver}")
        if driver == VFIO_DRIVER:
            self._wait_vfio_node(address)

    def _wait_vfio_node(self, address: str) -> None:
        group = self.iommu_group(address)
        if group is None:
            raise HostError(f"{address} has no IOMMU group: VFIO passthrough needs the IOMMU on")
        node = self.host.path(f"/dev/vfio/{group}")
        if not self.dry_run and not _wait(node.exists, self.settle_timeout_s):
            raise HostError(f"/dev/vfio/{group} did not appear for {address}")
