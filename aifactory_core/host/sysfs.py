"""Tolerant readers for sysfs attribute files (missing or unreadable gives ``None``).

:func:`link_name` is the probes' rule, defined in :mod:`aifactory_core.probes.sysfs` (which imports
only ``os``) so that the probes' start-up does not load the host model's package."""

from __future__ import annotations

import os

from aifactory_core.probes.sysfs import link_name as link_name  # re-exported: one rule for both readers

TYPE_CHECKING = False  # typing is not loaded; mypy reads the name
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


def list_dir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []
