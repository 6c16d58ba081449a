"""Bundled host samples, so the suite shows what it does on a machine without a GPU.

``--host-root sample:NAME`` extracts ``NAME.tar.gz`` into a per-user cache directory and uses it
as the host root; ``--nvml-replay sample:NAME`` replays ``NAME.nvml.json``; ``plan --vm
sample:NAME`` reads the VM document ``NAME.vm.xml``.

* ``h100-sxm5-vm``: a real capture (2026-11-26): sysfs/procfs of a KVM guest with one H100 80GB
  HBM3 SXM5 passed through (no IOMMU inside that guest), and its NVML recording.
* ``dgx-h100``: SYNTHETIC, written by ``tests/fixtures/make_dgx_sample.py`` from the test suite's
  host generator: a DGX-H100-shaped host (2 sockets, 8 H100 SXM5, 4 NVSwitches, 8 ConnectX-7,
  IOMMU groups, vfio-pci loaded), the real NVML recording copied per GPU with a synthetic
  NVSwitch fabric registration, and a VM document with one GPU and one NIC for ``plan``.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from pathlib import Path

from aifactory_core.errors import UsageError

PREFIX = "sample:"
_HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(path.name[: -len(".tar.gz")] for path in _HERE.glob("*.tar.gz"))


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aifactory" / "samples"


def _safe_members(archive: tarfile.TarFile, dest: Path) -> list[tarfile.TarInfo]:
    members = []
    for member in archive.getmembers():
        target = (dest / member.name).resolve()
        if not str(target).startswith(str(dest.resolve()) + os.sep):
            raise UsageError(f"sample archive entry {member.name!r} escapes its directory")
        if member.issym():
            link_target = (target.parent / member.linkname).resolve()
            if not str(link_target).startswith(str(dest.resolve()) + os.sep) and link_target != dest:
                raise UsageError(f"sample archive link {member.name!r} points outside")
        elif not (member.isdir() or member.isfile()):
            raise UsageError(f"sample archive entry {member.name!r} is not a file, dir or link")
        members.append(member)
    return members


def extract_sample(name: str) -> Path:
    """Extract a bundled capture once (content-addressed) and return its root directory."""
    archive_path = _HERE / f"{name}.tar.gz"
    if not archive_path.is_file():
        raise UsageError(f"unknown sample {name!r}; available: {', '.join(available())}")
    digest = hashlib.sha256(archive_path.read_bytes()).hexdigest()[:16]
    dest = _cache_dir() / f"{name}-{digest}"
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
    with tarfile.open(archive_path, "r:gz") as archive:
        members = _safe_members(archive, staging)
        if hasattr(tarfile, "data_filter"):
            archive.extractall(staging, members=members, filter="data")
        else:  # Python without extraction filters: members were checked above
            archive.extractall(staging, members=members)  # noqa: S202
    (staging / ".complete").write_text(digest + "\n")
    try:
        staging.rename(dest)
    except OSError:  # another process won the race; use its copy
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return dest


def vm_document(name: str) -> Path:
    """The VM document bundled with sample ``name`` (``NAME.vm.xml``)."""
    path = _HERE / f"{name}.vm.xml"
    if name not in available() or not path.is_file():
        with_vm = [sample for sample in available() if (_HERE / f"{sample}.vm.xml").is_file()]
        raise UsageError(f"no VM document in sample {name!r}; available: {', '.join(with_vm)}")
    return path


def resolve_host_root_option(option: str | None) -> str | None:
    """Map ``sample:NAME`` to the extracted sample; pass anything else through."""
    if option and option.startswith(PREFIX):
        return str(extract_sample(option[len(PREFIX):]))
    env = os.environ.get("AIFACTORY_HOST_ROOT")
    if option is None and env and env.startswith(PREFIX):
        return str(extract_sample(env[len(PREFIX):]))
    return option
