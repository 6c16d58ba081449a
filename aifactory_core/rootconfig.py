"""The configuration root decides by: read only from a file that root owns and no one else can write.

The root helper (``oneadmin`` runs it through sudo) and root's own device changes take
``[host] host_devices`` and ``[host] vf_pools`` from here: from :data:`ROOT_CONFIG_PATH`, never from
a path or a variable the caller chose. The file and every directory above it must belong to root
and be closed to writing by group and others; a root-owned directory with the sticky bit (``/tmp``)
also holds, since no one else can replace root's entry in it. A link on the way is followed only
when root owns it. A missing file means the built-in defaults: no host devices listed, no VF pools.
"""

from __future__ import annotations

import os
import stat

from aifactory_core.config import DEFAULT_PATH, MAX_CONFIG_BYTES, Config, parse_config_bytes
from aifactory_core.errors import ConfigError, HostError

ROOT_CONFIG_PATH = DEFAULT_PATH


def _writable_by_others(info: os.stat_result) -> bool:
    return info.st_uid != 0 or bool(info.st_mode & 0o022)


def _refuse_open_directory(descriptor: int, where: str) -> None:
    info = os.fstat(descriptor)
    if _writable_by_others(info) and not (info.st_uid == 0 and info.st_mode & stat.S_ISVTX):
        raise ConfigError(f"{where} (above the root config) is writable by uid {info.st_uid} or others: "
                          "refusing the config")


def load_root_config(path: str | None = None) -> Config:
    """The configuration at ``path`` (:data:`ROOT_CONFIG_PATH`), refused (ConfigError) unless only
    root can have written it."""
    from aifactory_core.nofollow import open_file, read_descriptor

    path = path or ROOT_CONFIG_PATH
    try:
        descriptor = open_file(path, os.O_RDONLY | os.O_NONBLOCK, check=_refuse_open_directory)
    except FileNotFoundError:
        return Config()
    except HostError as error:
        raise ConfigError(f"root config: {error.message}") from None
    except OSError as error:
        raise ConfigError(f"root config {path} unreadable: {error.strerror}") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"root config {path} is not a regular file")
        if _writable_by_others(info):
            raise ConfigError(f"root config {path} is writable by uid {info.st_uid} or others "
                              f"(mode {stat.S_IMODE(info.st_mode):04o}): refusing it")
        raw = read_descriptor(descriptor, MAX_CONFIG_BYTES + 1)
    finally:
        os.close(descriptor)
    return parse_config_bytes(raw, path)
