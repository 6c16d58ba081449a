"""What the test host looks like: CPUs, NUMA nodes, memory, PCI devices, udev mode.

A :class:`GuestConfig` is frozen and hashable, so the pytest plugin can group realkernel tests
by the guest they ask for (``@pytest.mark.realkernel(guest=SOME_CONFIG)``) and boot once per
distinct config; all tests that ask for nothing share :data:`DEFAULT_GUEST`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

UdevMode = Literal["off", "pci", "full"]

DEFAULT_CACHE_DIR = Path("/var/cache/aifactory-testhost")
ENV_KVER = "AIFACTORY_TESTHOST_KVER"
ENV_CACHE = "AIFACTORY_TESTHOST_CACHE"
ENV_TIMEOUT = "AIFACTORY_TESTHOST_TIMEOUT"
ENV_BOOT_TIMEOUT = "AIFACTORY_TESTHOST_BOOT_TIMEOUT"


class Device(Protocol):
    """A PCI device the guest gets; ``numa_node`` set means behind a pxb-pcie on that node."""

    id: str
    numa_node: int | None

    def qemu_args(self, bus: str | None) -> list[str]: ...


def _bus(bus: str | None) -> str:
    # Always explicit: once a pxb-pcie exists, QEMU would pick it as the default bus.
    return f",bus={bus or 'pcie.0'}"


@dataclass(frozen=True)
class E1000e:
    """Intel 82574L NIC (8086:10d3); the vfio-pci bind/unbind and hostdev target."""

    id: str = "nic0"
    numa_node: int | None = None

    def qemu_args(self, bus: str | None) -> list[str]:
        return ["-device", f"e1000e,id={self.id}{_bus(bus)}"]


@dataclass(frozen=True)
class NvmeSriov:
    """NVMe controller with PCI SR-IOV (``sriov_numvfs``); VFs can be bound to vfio-pci."""

    id: str = "nvme0"
    max_vfs: int = 2
    serial: str = "deadbeef"
    numa_node: int | None = None

    def qemu_args(self, bus: str | None) -> list[str]:
        # SR-IOV needs an nvme-subsys, and flexible queue/interrupt resources for the VFs.
        return [
            "-device", f"nvme-subsys,id={self.id}-subsys",
            "-device",
            f"nvme,id={self.id},serial={self.serial},subsys={self.id}-subsys,sriov_max_vfs={self.max_vfs},"
            f"sriov_vq_flexible={2 * self.max_vfs},sriov_vi_flexible={self.max_vfs}{_bus(bus)}",
        ]  # fmt: skip


@dataclass(frozen=True)
class RawDevice:
    """Any other QEMU ``-device`` spec, e.g. ``RawDevice('vnet0', 'virtio-net-pci')``."""

    id: str
    spec: str
    numa_node: int | None = None

    def qemu_args(self, bus: str | None) -> list[str]:
        return ["-device", f"{self.spec},id={self.id}{_bus(bus)}"]


@dataclass(frozen=True)
class GuestConfig:
    """One test-host shape.  ``cpus`` and ``memory_mib`` are split evenly over ``numa_nodes``."""

    cpus: int = 4
    numa_nodes: int = 2
    memory_mib: int = 2048
    devices: tuple[Device, ...] = (E1000e(numa_node=1), NvmeSriov())
    udev: UdevMode = "pci"
    kernel_version: str | None = None  # None: AIFACTORY_TESTHOST_KVER, else newest Debian kernel
    boot_timeout_s: float = 180.0  # kernel start until the guest init says TESTHOST-READY
    session_timeout_s: float = 600.0  # the whole boot + pytest session
    extra_append: tuple[str, ...] = ()
    extra_qemu: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.numa_nodes < 1 or self.cpus < self.numa_nodes or self.cpus % self.numa_nodes:
            raise ValueError(f"{self.cpus} CPUs cannot be split evenly over {self.numa_nodes} NUMA nodes")
        if self.memory_mib % self.numa_nodes or self.memory_mib // self.numa_nodes < 128:
            raise ValueError(f"{self.memory_mib} MiB cannot give {self.numa_nodes} NUMA nodes 128+ MiB each")
        if self.udev not in ("off", "pci", "full"):
            raise ValueError(f"udev must be off, pci or full, not {self.udev!r}")
        ids = [d.id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"device ids must be unique: {ids}")
        for dev in self.devices:
            if dev.numa_node is not None and not 0 <= dev.numa_node < self.numa_nodes:
                raise ValueError(f"device {dev.id} is on NUMA node {dev.numa_node}, guest has {self.numa_nodes}")

    def with_env_overrides(self) -> GuestConfig:
        """Apply the time-out environment overrides (CI machines may be slower)."""
        changes: dict[str, float] = {}
        for env, name in ((ENV_TIMEOUT, "session_timeout_s"), (ENV_BOOT_TIMEOUT, "boot_timeout_s")):
            if os.environ.get(env):
                try:
                    changes[name] = float(os.environ[env])
                except ValueError:
                    raise ValueError(f"{env} must be a number of seconds, not {os.environ[env]!r}") from None
        return replace(self, **changes) if changes else self  # type: ignore[arg-type]

    def machine_args(self) -> list[str]:
        """CPU, NUMA and memory options: one socket per node (nodes must not split a socket)."""
        per_node_cpus = self.cpus // self.numa_nodes
        per_node_mib = self.memory_mib // self.numa_nodes
        args = [
            "-machine", "q35,kernel-irqchip=split",
            "-cpu", "max",
            "-smp", f"{self.cpus},sockets={self.numa_nodes},cores={per_node_cpus},threads=1",
            "-m", f"{self.memory_mib}M",
        ]  # fmt: skip
        for node in range(self.numa_nodes):
            first = node * per_node_cpus
            args += ["-object", f"memory-backend-ram,id=mem{node},size={per_node_mib}M"]
            args += ["-numa", f"node,nodeid={node},cpus={first}-{first + per_node_cpus - 1},memdev=mem{node}"]
        return args

    def device_args(self) -> list[str]:
        """The vIOMMU first, then devices; node-local ones sit behind a pxb-pcie root port."""
        args = ["-device", "intel-iommu,intremap=on"]
        expanders: set[int] = set()
        for chassis, dev in enumerate(self.devices, start=1):
            if dev.numa_node is None:
                args += dev.qemu_args(None)
                continue
            pxb = f"pxb{dev.numa_node}"
            if dev.numa_node not in expanders:
                expanders.add(dev.numa_node)
                bus_nr = 0x80 + 0x10 * dev.numa_node
                args += ["-device", f"pxb-pcie,id={pxb},bus_nr={bus_nr},numa_node={dev.numa_node},bus=pcie.0"]
            port = f"rp-{dev.id}"
            args += ["-device", f"pcie-root-port,id={port},bus={pxb},chassis={chassis},slot=0"]
            args += dev.qemu_args(port)
        return args


DEFAULT_GUEST = GuestConfig()
"""Serves every acceptance test in one boot: 2 nodes x 2 CPUs, e1000e on node 1, SR-IOV NVMe."""

FOUR_NODES = GuestConfig(cpus=4, numa_nodes=4, memory_mib=2048)
"""For tests that need more than two NUMA nodes (costs its own boot)."""


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or DEFAULT_CACHE_DIR)


def netdevsim_path(kver: str) -> Path:
    """Where ``.ci/install-testhost.sh`` puts the out-of-tree netdevsim module."""
    return cache_dir() / f"netdevsim-{kver}.ko"


def find_kernel_version(requested: str | None = None) -> str | None:
    """The guest kernel: requested, else $AIFACTORY_TESTHOST_KVER, else the newest with modules."""
    wanted = requested or os.environ.get(ENV_KVER)
    if wanted:
        return wanted
    candidates = [
        p.name
        for p in Path("/lib/modules").glob("*")
        if (p / "modules.dep").is_file() and Path(f"/boot/vmlinuz-{p.name}").is_file()
    ]
    return max(candidates, key=_version_key) if candidates else None


def _version_key(kver: str) -> tuple[tuple[int, str], ...]:
    parts = kver.replace("-", ".").split(".")
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in parts)
