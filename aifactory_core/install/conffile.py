"""OpenNebula configuration files the installer edits in place (``oned.conf``, the hosts'
``pci.conf``): read without following a link, regular files only (a FIFO would hold the install),
bounded; replaced through a fresh file in the same directory whose owner and mode are set on its
descriptor, never by name, since the directory may be ``oneadmin``'s and the name swapped for a link."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from aifactory_core.install.stage import InstallError


def read(path: Path, limit: int) -> tuple[str, os.stat_result] | None:
    """``path``'s text (undecodable bytes kept as they are) and its stat; None when it is missing."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise InstallError(f"{path}: {error.strerror or error} (a link or something else stands there?)") from None
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InstallError(f"{path} is not a regular file")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise InstallError(f"{path} is larger than {limit} bytes")
    return data.decode("utf-8", "surrogateescape"), info


def replace(path: Path, text: str, info: os.stat_result) -> None:
    """Write ``text`` through a new file beside ``path`` (O_EXCL, no link followed) and rename it
    over ``path``, with ``info``'s owner and permission bits (never a set-id bit)."""
    temporary = path.with_name(f".{path.name}.aifactory-new")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(text.encode("utf-8", "surrogateescape"))
            if os.geteuid() == 0:
                os.fchown(handle.fileno(), info.st_uid, info.st_gid)
            os.fchmod(handle.fileno(), info.st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
