"""Which VM holds which device: per-device fcntl locks and owner files under the state dir.

``claim`` takes the device's lock (so two deploys racing for one GPU are serialised), then reads
the owner file: a device owned by another VM is refused with "device held by VM N"; otherwise the
owner file is written before anything is changed. The owner file outlives the process: the device
belongs to the VM until ``release`` gives it back.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aifactory_core.errors import AifactoryError, HostError
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle.atomic import names, open_lock, read_text, remove, write_atomic
from aifactory_core.validate import pci_address

LOCK_TIMEOUT_S = 30.0
ADMIN_VM = 2**31 - 1
"""The owner of devices an administrator took by hand (``aifactory device bind`` without ``--vm``):
no domain ever runs for it, and reconciliation leaves what it holds."""


class DeviceHeld(HostError):
    """A device (or VF) another VM holds; ``owner``: that VM."""

    code = "device-held"

    def __init__(self, message: str, owner: int | None = None) -> None:
        super().__init__(message)
        self.owner = owner


def _owners(host: HostRoot) -> Path:
    return host.state_dir / "owners"


@contextmanager
def device_lock(host: HostRoot, address: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    from aifactory_core.flocks import flock_within

    fd = open_lock(host.state_dir / "locks" / f"{pci_address(address)}.lock")
    try:
        if not flock_within(fd, timeout_s):
            raise HostError(f"device {address} is locked by another operation")
        yield
    finally:
        os.close(fd)


def owner_of(host: HostRoot, address: str) -> int | None:
    text = read_text(_owners(host) / pci_address(address))
    return int(text) if text is not None and text.isdigit() else None


def claim(host: HostRoot, address: str, vm: int) -> None:
    """Make ``vm`` the owner of ``address`` or raise :class:`DeviceHeld`."""
    from aifactory_core.host.sanitize import quarantined

    with device_lock(host, address):
        owner = owner_of(host, address)
        if owner is not None and owner != vm:
            raise DeviceHeld(f"device {address} held by VM {owner}", owner)
        reason = quarantined(host).get(pci_address(address))
        if reason is not None:
            raise HostError(f"device {address} is quarantined ({reason}); check it, then "
                            f"'aifactory device clear {address}'")
        if owner is None:
            write_atomic(_owners(host) / pci_address(address), f"{vm}\n".encode())


def disown(host: HostRoot, address: str, vm: int) -> None:
    with device_lock(host, address):
        if owner_of(host, address) == vm:
            remove(_owners(host) / pci_address(address))


def held_devices(host: HostRoot) -> dict[str, int]:
    """Every device some VM holds: PCI address -> VM id."""
    held = {}
    for name in names(_owners(host)):
        if name.startswith("."):
            continue
        try:
            owner = owner_of(host, name)
        except AifactoryError:  # a stray file that is not a PCI address
            continue
        if owner is not None:
            held[name] = owner
    return held
