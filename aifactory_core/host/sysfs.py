"""Tolerant readers for sysfs attribute files (missing or unreadable gives ``None``).

Imports only ``os``: the probes share :func:`link_name` on their start-up path."""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing is not loaded at the probes' start-up; mypy reads the name
if TYPE_CHECKING:
    from pathlib import Path


def read_str(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(65536).strip()
    except OSError:
        return None


def read_int(path: Path, base: int = 10) -> int | None:
    text = read_str(path)
    if text is None or text == "":
        return None
    try:
        return int(text, base)
    except ValueError:
        return None


def read_hex(path: Path) -> int | None:
    return read_int(path, 16)


def link_name(path: Path | str) -> str | None:
    """The last component of a symlink's target (``driver`` -> ``nvidia``), or None; also the
    probes' rule (:meth:`aifactory_core.probes.sysfs.Root.link_name`). A target ending in ``/`` or
    ``..`` is resolved as the kernel would, not reported as ``''`` or ``'..'``."""
    try:
        target = os.readlink(path)
    except OSError:  # absent or not a link
        return None
    name = os.path.basename(target.rstrip("/"))
    if name in ("", ".", ".."):
        name = os.path.basename(os.path.realpath(path))
    return name or None


def list_dir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []
