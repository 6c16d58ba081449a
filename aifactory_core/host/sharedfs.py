"""Filesystems a PCI function serves without a block device: a virtio-9p share (the mount's source
is the device's ``mount_tag``) or a virtiofs share (``/sys/fs/virtiofs/<n>/tag``). A machine whose
root is such a share (a test host, a VM booted from its host's tree) has no block device under
``/``, yet moving that function pulls its root away.
"""

from __future__ import annotations

from aifactory_core.host.blockuse import _unescape
from aifactory_core.host.pcipath import pci_function_of
from aifactory_core.host.sysfs import list_dir, read_str
from aifactory_core.hostroot import HostRoot

SHARED_TYPES = ("9p", "virtiofs")


def shared_mounts(host: HostRoot) -> dict[str, str]:
    """``fstype:tag`` -> the first mount point of a 9p or virtiofs share."""
    found: dict[str, str] = {}
    for line in (host.read_text("/proc/self/mountinfo") or "").splitlines():
        fields = line.split()
        if len(fields) < 7 or "-" not in fields[6:]:
            continue
        after = fields[fields.index("-", 6) + 1:]
        if len(after) >= 2 and after[0] in SHARED_TYPES:
            found.setdefault(f"{after[0]}:{_unescape(after[1])}", _unescape(fields[4]))
    return found


def _tags(host: HostRoot) -> dict[str, str]:
    """``fstype:tag`` -> the PCI function of the virtio device exporting it."""
    tags: dict[str, str] = {}
    devices = host.path("/sys/bus/virtio/devices")
    for name in list_dir(devices):
        tag = (read_str(devices / name / "mount_tag") or "").strip("\0").strip()
        address = pci_function_of(devices / name)
        if tag and address:
            tags.setdefault(f"9p:{tag}", address)
    shares = host.path("/sys/fs/virtiofs")
    for name in list_dir(shares):
        tag = (read_str(shares / name / "tag") or "").strip("\0").strip()
        address = pci_function_of(shares / name / "device")
        if tag and address:
            tags.setdefault(f"virtiofs:{tag}", address)
    return tags


def shared_fs_uses(host: HostRoot) -> dict[str, str]:
    """PCI address -> why: a share it exports is mounted."""
    mounts = shared_mounts(host)
    if not mounts:
        return {}
    uses: dict[str, str] = {}
    for key, address in _tags(host).items():
        if key in mounts and address not in uses:
            kind, _, tag = key.partition(":")
            uses[address] = f"its {kind} share {tag} is mounted on {mounts[key]}"
    return uses
