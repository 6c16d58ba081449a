"""Crash-safe small files in directories another user may write (the state directory is
``oneadmin``'s; root's commands and the boot repair touch it too).

A write goes to a new temporary file (``O_EXCL``), is fsynced, renamed over the name and the
directory fsynced. Every open goes through :mod:`aifactory_core.nofollow`: the directory by
descriptors, one component at a time, never through a link another user planted, the file itself
``O_NOFOLLOW | O_CLOEXEC | O_NOCTTY``; reads take regular files only and never block on a FIFO. A
file or directory root creates in another user's directory is given to that user at creation, so
the unprivileged drivers and probes can still read and replace it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from aifactory_core import nofollow


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    directory = nofollow.open_directory(path.parent, create=True)
    try:
        temporary = f".{path.name}.{secrets.token_hex(6)}"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow.FLAGS, mode,
                             dir_fd=directory)
        try:
            try:
                os.fchmod(descriptor, mode)
                nofollow.give_to_directory_owner(descriptor, directory)
                view = memoryview(data)
                while view:
                    view = view[os.write(descriptor, view):]
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            os.replace(temporary, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            try:
                os.unlink(temporary, dir_fd=directory)
            except OSError:
                pass
            raise
        os.fsync(directory)
    finally:
        os.close(directory)


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(nofollow.read_bytes(path).decode("utf-8"))


def read_bytes_at_most(path: Path, limit: int) -> bytes:
    """A state file's bytes; HostError when it holds more than ``limit`` (never cut short)."""
    from aifactory_core.errors import HostError

    data = nofollow.read_bytes(path, limit + 1)
    if len(data) > limit:
        raise HostError(f"{path} is larger than {limit} bytes")
    return data


def read_text(path: Path) -> str | None:
    """A small state file's text, stripped; None when it is not there."""
    try:
        return nofollow.read_bytes(path, 1 << 16).decode("utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None


def remove(path: Path) -> bool:
    """Unlink a state file; False when it was not there."""
    return nofollow.remove(path)


def names(directory: Path) -> list[str]:
    """The entries of a state directory, sorted; none when it is not there."""
    try:
        descriptor = nofollow.open_directory(directory)
    except FileNotFoundError:
        return []
    try:
        return sorted(os.listdir(descriptor))
    finally:
        os.close(descriptor)


def open_lock(path: Path) -> int:
    """A descriptor for ``flock`` on lock file ``path`` (created when missing; never a link)."""
    import stat

    from aifactory_core.errors import HostError

    descriptor = nofollow.open_file(path, os.O_RDWR | os.O_CREAT, 0o600, create_parents=True)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise HostError(f"lock {path} is not a regular file")
    return descriptor
