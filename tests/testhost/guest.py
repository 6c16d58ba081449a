"""Small helpers for tests that run inside the test host (real sysfs, real drivers)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

PCI = Path("/sys/bus/pci/devices")
T = TypeVar("T")


def sh(*argv: str, timeout: float = 120) -> str:
    """Run a command; return stdout, or fail with its stderr in one line."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        err = " ".join(proc.stderr.split()) or " ".join(proc.stdout.split())
        raise AssertionError(f"{' '.join(argv)} -> exit {proc.returncode}: {err}")
    return proc.stdout


def write(path: Path | str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def read(path: Path | str) -> str:
    return Path(path).read_text().strip()


def wait_for(check: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def modprobe(*modules: str) -> None:
    sh("modprobe", "-a", *modules)


def driver_of(bdf: str) -> str | None:
    link = PCI / bdf / "driver"
    return os.path.basename(os.readlink(link)) if link.exists() else None


def iommu_group(bdf: str) -> str:
    return os.path.basename(os.readlink(PCI / bdf / "iommu_group"))


def find_pci(vendor: str, device: str | None = None, class_prefix: str | None = None) -> list[str]:
    """BDFs matching vendor (``0x8086``), optional device id and class prefix (``0x0108``)."""
    found = []
    for dev in sorted(PCI.iterdir()):
        if read(dev / "vendor") != vendor:
            continue
        if device is not None and read(dev / "device") != device:
            continue
        if class_prefix is not None and not read(dev / "class").startswith(class_prefix):
            continue
        found.append(dev.name)
    return found


def bind(bdf: str, driver: str | None) -> None:
    """Bind ``bdf`` to ``driver`` via driver_override; ``None`` returns it to its default driver."""
    if driver == "vfio-pci":
        modprobe("vfio-pci")
    write(PCI / bdf / "driver_override", driver or "\n")
    if driver_of(bdf) is not None:
        write(PCI / bdf / "driver" / "unbind", bdf)
    write("/sys/bus/pci/drivers_probe", bdf)
    if driver is not None:
        wait_for(lambda: driver_of(bdf) == driver, f"{bdf} to bind to {driver}", timeout=15)


class Virsh:
    """``virsh -c qemu:///system`` against the guest's real libvirtd."""

    uri = "qemu:///system"

    def __call__(self, *args: str, timeout: float = 120) -> str:
        return sh("virsh", "-c", self.uri, *args, timeout=timeout)

    def qemu_pid(self, domain: str) -> int:
        return int(read(f"/run/libvirt/qemu/{domain}.pid"))
