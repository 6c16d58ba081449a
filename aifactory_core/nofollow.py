"""Opening paths one component at a time, through directory descriptors, without following a link
another user planted.

Root touches directories others can write: the state directory belongs to ``oneadmin``. A path
opened by name is resolved afresh by the kernel at every call, so a directory swapped for a link
between two calls sends root elsewhere. Here every component is opened relative to the descriptor
of the one before it with ``O_NOFOLLOW``; a link is followed only when root or this process's own
user owns it (no one else can make such a link), and the last component is never followed. Every
descriptor is opened ``O_CLOEXEC`` and ``O_NOCTTY``.

Imports only the standard library and :mod:`aifactory_core.errors`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from aifactory_core.errors import HostError

FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | FLAGS
MAX_LINKS = 40

DirectoryCheck = Callable[[int, str], None]
"""Called with each directory's descriptor and path as the walk opens it (``/`` first)."""


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def _follow_link(parent: int, name: str, where: str) -> str:
    """The target of link ``name`` in ``parent`` when root or this user owns it; HostError otherwise."""
    info = os.stat(name, dir_fd=parent, follow_symlinks=False)
    if not stat.S_ISLNK(info.st_mode):
        raise HostError(f"{where} is not a directory")
    if info.st_uid not in (0, os.geteuid()):
        raise HostError(f"{where} is a link owned by uid {info.st_uid}: not following it")
    return os.readlink(name, dir_fd=parent)


def _make_directory(parent: int, name: str, mode: int) -> None:
    try:
        os.mkdir(name, mode, dir_fd=parent)
    except FileExistsError:
        return
    give_to_directory_owner_at(parent, name)


def give_to_directory_owner_at(parent: int, name: str) -> None:
    """Root made ``name`` in ``parent``: give it to the directory's owner (no-op otherwise)."""
    if os.geteuid() != 0:
        return
    owner = os.fstat(parent)
    if owner.st_uid != 0:
        os.chown(name, owner.st_uid, owner.st_gid, dir_fd=parent, follow_symlinks=False)


def give_to_directory_owner(descriptor: int, parent: int) -> None:
    """Root made the file open on ``descriptor`` in ``parent``: give it to the directory's owner."""
    if os.geteuid() != 0:
        return
    owner = os.fstat(parent)
    if owner.st_uid != 0:
        os.fchown(descriptor, owner.st_uid, owner.st_gid)


def open_directory(path: str | Path, *, create: bool = False, mode: int = 0o777,
                   check: DirectoryCheck | None = None) -> int:
    """A descriptor of directory ``path``, opened component by component from ``/``.

    ``create`` makes missing components (``mode`` less the umask; made by root in a directory
    another user owns, each is given to that user). ``check`` may refuse a directory on the way.
    Raises FileNotFoundError when a component is missing, HostError on a link not to follow."""
    text = os.fspath(path)
    if not text.startswith("/"):
        text = os.path.join(os.getcwd(), text)
    pending = _components(text)
    current = os.open("/", DIRECTORY_FLAGS)
    where = "/"
    links = 0
    try:
        if check is not None:
            check(current, where)
        while pending:
            name = pending.pop(0)
            where = os.path.join(where, name)
            try:
                child = os.open(name, DIRECTORY_FLAGS, dir_fd=current)
            except FileNotFoundError:
                if not create:
                    raise
                _make_directory(current, name, mode)
                child = os.open(name, DIRECTORY_FLAGS, dir_fd=current)
            except OSError as error:
                if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                links += 1
                if links > MAX_LINKS:
                    raise HostError(f"{text}: too many links") from None
                target = _follow_link(current, name, where)
                pending[:0] = _components(target)
                if target.startswith("/"):
                    os.close(current)
                    current = os.open("/", DIRECTORY_FLAGS)
                    where = "/"
                else:
                    where = os.path.dirname(where)
                continue
            os.close(current)
            current = child
            if check is not None:
                check(current, where)
        return current
    except BaseException:
        os.close(current)
        raise


def open_file(path: str | Path, flags: int, mode: int = 0o600, *, create_parents: bool = False,
              check: DirectoryCheck | None = None) -> int:
    """A descriptor of file ``path``: its directory through :func:`open_directory`, the file itself
    with ``O_NOFOLLOW``. A file root creates in another user's directory is given to that user."""
    parent_path, name = os.path.split(os.fspath(path))
    parent = open_directory(parent_path or "/", create=create_parents, check=check)
    try:
        created = False
        try:
            if flags & os.O_CREAT and not flags & os.O_EXCL:
                try:  # made here, or there before: only a file made here is given away
                    descriptor = os.open(name, flags | os.O_EXCL | FLAGS, mode, dir_fd=parent)
                    created = True
                except FileExistsError:
                    descriptor = os.open(name, (flags & ~os.O_CREAT) | FLAGS, dir_fd=parent)
            else:
                descriptor = os.open(name, flags | FLAGS, mode, dir_fd=parent)
                created = bool(flags & os.O_CREAT)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise HostError(f"{os.fspath(path)} is a link: not following it") from None
            raise
        try:
            if created:
                give_to_directory_owner(descriptor, parent)
            else:
                refuse_foreign_hard_link(descriptor, parent, path)
        except BaseException:
            os.close(descriptor)
            raise
        return descriptor
    finally:
        os.close(parent)


def refuse_foreign_hard_link(descriptor: int, parent: int, path: str | Path) -> None:
    """HostError, for root, when the file open on ``descriptor`` has another name and belongs to
    someone other than the owner of ``parent``: a hard link planted to another user's file, which
    root would otherwise read, lock or change on that user's behalf."""
    if os.geteuid() != 0:
        return
    info = os.fstat(descriptor)
    if info.st_nlink > 1 and stat.S_ISREG(info.st_mode) and info.st_uid != os.fstat(parent).st_uid:
        raise HostError(f"{os.fspath(path)} is a hard link to a file of uid {info.st_uid}: not using it")


def read_bytes(path: str | Path, limit: int = 1 << 20) -> bytes:
    """The first ``limit`` bytes of regular file ``path`` (never a link, a FIFO or a device).

    Root refuses a file with more than one name that the directory's owner does not own: a hard
    link someone made to another user's file (where the kernel allows it: no
    ``fs.protected_hardlinks``), which root would otherwise read on that user's behalf."""
    parent_path, name = os.path.split(os.fspath(path))
    parent = open_directory(parent_path or "/")
    try:
        try:
            descriptor = os.open(name, os.O_RDONLY | os.O_NONBLOCK | FLAGS, dir_fd=parent)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise HostError(f"{os.fspath(path)} is a link: not following it") from None
            raise
        try:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                raise HostError(f"{os.fspath(path)} is not a regular file")
            refuse_foreign_hard_link(descriptor, parent, path)
            return read_descriptor(descriptor, limit)
        finally:
            os.close(descriptor)
    finally:
        os.close(parent)


def read_descriptor(descriptor: int, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``descriptor``, to its end."""
    chunks = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(descriptor, min(remaining, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def remove(path: str | Path) -> bool:
    """Unlink ``path`` (never through a link in its directories); False when it was not there."""
    parent_path, name = os.path.split(os.fspath(path))
    try:
        parent = open_directory(parent_path or "/")
    except FileNotFoundError:
        return False
    try:
        os.unlink(name, dir_fd=parent)
    except FileNotFoundError:
        return False
    finally:
        os.close(parent)
    return True
