"""The only code that moves a PCI function between drivers (and resets it).

Binding uses ``driver_override`` + ``unbind`` + ``drivers_probe`` (never ``new_id``, which would
claim every device with the same ids). Every sysfs write has a deadline: an ``unbind`` that blocks
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
        """Put ``address`` on ``driver`` (``""``: no driver); idempotent and verified."""
        address = pci_address(address)
        if driver:
            driver_name(driver)
        directory = self.device_dir(address)
        current = self.driver_of(address)
        override = read_str(directory / "driver_override")
        if current == driver and (not driver or override in (driver, None, "", "(null)")):
            if driver == "vfio-pci":
                self._wait_vfio_node(address)
            return
        if driver and not (self.host.pci_drivers / driver).is_dir() and not self.dry_run:
            raise HostError(f"driver {driver} is not loaded on this host (modprobe {driver})")
        self.writer.write(directory / "driver_override", f"{driver}\n" if driver else "\n",
                          f"only {driver or 'no driver'} may claim {address}")
        if current:
            self.writer.write(directory / "driver" / "unbind", address, f"detach {address} from {current}")
        if driver:
            self.writer.write(self.host.path("/sys/bus/pci/drivers_probe"), address, f"let {driver} probe {address}")
            if driver != "vfio-pci":
                # Leave no override behind on host drivers: a later rescan must not be pinned.
                self.writer.write(directory / "driver_override", "\n", f"clear the override of {address}")
        if self.dry_run:
            return
        if driver and not _wait(lambda: self.driver_of(address) == driver, self.settle_timeout_s):
            raise HostError(f"{address} did not bind to {driver} (now: {self.driver_of(address) or 'no driver'})")
        if not driver and self.driver_of(address):
            raise HostError(f"{address} is still bound to {self.driver_of(address)}")
        if driver == "vfio-pci":
            self._wait_vfio_node(address)

    def _wait_vfio_node(self, address: str) -> None:
        group = self.iommu_group(address)
        if group is None:
            raise HostError(f"{address} has no IOMMU group: VFIO passthrough needs the IOMMU on")
        node = self.host.path(f"/dev/vfio/{group}")
        if not self.dry_run and not _wait(node.exists, self.settle_timeout_s):
            raise HostError(f"/dev/vfio/{group} did not appear for {address}")
