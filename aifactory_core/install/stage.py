"""Apply the manifest as one transaction: every change is journaled and undone on failure.

A :class:`Transaction` collects reversible steps; :meth:`Transaction.commit` drops the undo data,
:meth:`Transaction.rollback` undoes the applied steps in reverse. In a dry run each step is printed
and none is applied. What was installed is recorded in ``install-manifest.json`` so that a second
run changes nothing and ``--uninstall`` removes exactly that.

The manifest lives in OpenNebula's state directory, which ``oneadmin`` owns: it is read only when
the user running the installer (root) owns it and no one else may write it (``oneadmin`` can remove
root's file there but not forge one), never through a link; and ``--uninstall`` removes only what
this installer places (:func:`trusted_record`), whatever the manifest lists. Temporary files are
created ``O_EXCL | O_NOFOLLOW``: a name planted beside the target is never written through.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from aifactory_core.errors import AifactoryError, UsageError
from aifactory_core.install import layout
from aifactory_core.install.manifest import CONFIG, DIRECTORY, SUDOERS, WRAPPER, Entry


class InstallError(AifactoryError):
    """The installation could not be completed; what was done has been undone."""

    code = "install"


@dataclass
class Transaction:
    dry_run: bool = False
    out: Any = field(default=sys.stdout)
    undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    changes: int = 0
    after_commit: list[Callable[[], None]] = field(default_factory=list)

    def step(self, description: str, apply: Callable[[], None], undo: Callable[[], None] | None = None) -> None:
        self.changes += 1
        self.out.write(("would " if self.dry_run else "") + description + "\n")
        if self.dry_run:
            return
        try:
            apply()
        except OSError as error:
            raise InstallError(f"{description}: {error.strerror or error}") from None
        if undo is not None:
            self.undo.append((description, undo))

    def tell(self, description: str) -> None:
        """Count and print a change made outside :meth:`step` (its text already says 'would')."""
        self.changes += 1
        self.out.write(description + "\n")

    def rollback(self) -> list[str]:
        """Undo every applied step in reverse; returns the steps that could not be undone."""
        failed: list[str] = []
        while self.undo:
            description, undo = self.undo.pop()
            try:
                undo()
            except Exception as error:  # noqa: BLE001 - every undo is tried; failures are reported
                failed.append(f"{description}: {error}")
        return failed

    def commit(self) -> None:
        self.undo.clear()
        for action in self.after_commit:
            action()
        self.after_commit.clear()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise InstallError(f"{path}: {error.strerror or error}") from None


def _write(path: Path, content: bytes, mode: int) -> None:
    """Write through a new temporary file (``O_EXCL | O_NOFOLLOW``: never an existing name or a
    link someone planted) and rename, so a reader never sees half a file."""
    import secrets

    temporary = path.with_name(f".{path.name}.aifactory-new-{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(descriptor, view):]
            os.fchmod(descriptor, mode)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _restore(path: Path, content: bytes | None, mode: int) -> Callable[[], None]:
    def undo() -> None:
        if content is None:
            path.unlink(missing_ok=True)
        else:
            _write(path, content, mode)
    return undo


def load_record(target: layout.Layout) -> dict[str, Any]:
    """The install manifest; UsageError when someone other than this user could have written it."""
    path = target.path(target.manifest)
    data = _read_own(path)
    if data is None:
        return {}
    try:
        record = json.loads(data)
    except ValueError:
        raise UsageError(f"{path}: not a valid install manifest") from None
    if not isinstance(record, dict) or record.get("format") != 1:
        raise UsageError(f"{path}: not a valid install manifest")
    return record


def _read_own(path: Path) -> bytes | None:
    """``path``'s bytes when it is a regular file of this user that no one else may write (opened
    without following a link); None when missing."""
    import stat

    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise UsageError(f"{path}: not trusted as the install manifest ({error.strerror or error})") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise UsageError(f"{path}: not trusted as the install manifest (owner uid {info.st_uid}, mode "
                             f"{stat.S_IMODE(info.st_mode):04o}; the installer writes it as uid {os.geteuid()}, "
                             "closed to others)")
        with os.fdopen(os.dup(descriptor), "rb") as stream:
            return stream.read(16 << 20)
    finally:
        os.close(descriptor)


def trusted_record(record: dict[str, Any], files: set[str], environments: set[str],
                   notes: list[str]) -> dict[str, Any]:
    """``record`` with only what this installer places: files among ``files`` (a wrapper's saved
    original beside it, as ``<path>.one``), environments among ``environments``, directories that
    hold one of those; everything else is left alone, with a note."""
    kept_files = []
    for item in record.get("files", []):
        path = item.get("path") if isinstance(item, dict) else None
        original = item.get("original") if isinstance(item, dict) else None
        if (not isinstance(path, str) or path not in files or not isinstance(item.get("kind"), str)
                or (item.get("kind") == WRAPPER and original != f"{path}.one")
                or not isinstance(item.get("mode", 0o644), int)):
            notes.append(f"left {str(path)[:200]!r} alone: not a file this installer places")
            continue
        kept_files.append(item)
    kept_environments = []
    for tree in record.get("environments", []):
        if tree in environments:
            kept_environments.append(tree)
        else:
            notes.append(f"left {str(tree)[:200]!r} alone: not an environment this installer builds")
    placed = [item["path"] for item in kept_files] + kept_environments
    kept_directories = []
    for directory in record.get("directories", []):
        if isinstance(directory, str) and os.path.normpath(directory) == directory and (directory in files or any(
                path.startswith(directory.rstrip("/") + "/") for path in placed)):
            kept_directories.append(directory)
        else:
            notes.append(f"left directory {str(directory)[:200]!r} alone: it holds nothing this installer places")
    return {**record, "files": kept_files, "environments": kept_environments, "directories": kept_directories}


def make_dirs(tx: Transaction, target: layout.Layout, absolute: str, created: list[str], mode: int = 0o755) -> None:
    """Create ``absolute`` and missing parents, remembering each one created."""
    missing: list[str] = []
    current = absolute
    while current != "/" and not target.path(current).exists():
        missing.append(current)
        current = os.path.dirname(current)
    for directory in reversed(missing):
        path = target.path(directory)
        if directory in created:
            continue
        created.append(directory)
        tx.step(f"create directory {path}", partial(path.mkdir, mode=mode), path.rmdir)


VISUDO_PATHS = ("/usr/sbin/visudo", "/sbin/visudo")
"""Where visudo lives when ``sbin`` is not on ``PATH`` (a user's shell)."""


def validate_sudoers(content: bytes, where: Path, staged: bool) -> None:
    """``visudo -cf`` on the snippet before it is put in place; refused when visudo is missing on a
    live host (a broken snippet locks sudo), skipped for a staged tree without it."""
    visudo = shutil.which("visudo") or next((p for p in VISUDO_PATHS if os.access(p, os.X_OK)), None)
    if visudo is None:
        if staged:
            return
        raise InstallError("visudo not found: cannot validate the sudoers snippet (apt-get install sudo)")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="aifactory-sudoers-") as scratch_dir:
        scratch = Path(scratch_dir) / where.name
        _write(scratch, content, 0o440)
        result = subprocess.run([visudo, "-cf", str(scratch)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        message = " ".join((result.stderr or result.stdout).split())
        raise InstallError(f"sudoers snippet {where.name} refused by visudo -cf: {message}")


def _is_ours(current: bytes, entry: Entry, recorded: dict[str, Any]) -> bool:
    import hashlib

    digest = hashlib.sha256(current).hexdigest()
    return current == entry.content or digest == recorded.get("sha256")


def install_entry(tx: Transaction, target: layout.Layout, entry: Entry, previous: dict[str, Any],
                  created: list[str], notes: list[str]) -> dict[str, Any] | None:
    """Put one entry in place; returns what the manifest records for it (None: not ours)."""
    path = target.path(entry.destination)
    make_dirs(tx, target, os.path.dirname(entry.destination), created)
    record: dict[str, Any] = {"path": entry.destination, "kind": entry.kind, "sha256": entry.digest,
                              "mode": entry.mode, "source": entry.source}
    if entry.kind == DIRECTORY:
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            # the state directory's parent is oneadmin's: root chmods and chowns only a real directory
            raise InstallError(f"{path} is not a directory (a link or a file stands there): refusing to "
                               "chmod or chown it; remove it and run install.sh again")
        if not path.exists():
            created.append(entry.destination)
            tx.step(f"create directory {path} (mode {entry.mode:o})", lambda: path.mkdir(mode=entry.mode),
                    lambda: path.rmdir())
        elif (path.stat().st_mode & 0o7777) != entry.mode:
            old = path.stat().st_mode & 0o7777
            tx.step(f"chmod {entry.mode:o} {path}", lambda: os.chmod(path, entry.mode), lambda: os.chmod(path, old))
        _set_owner(tx, target, path, notes)
        return None
    current = _read(path)
    mode = (path.stat().st_mode & 0o7777) if current is not None else entry.mode
    if entry.kind == CONFIG:
        if current is None:
            tx.step(f"write {path} (default configuration)", lambda: _write(path, entry.content, entry.mode),
                    _restore(path, None, entry.mode))
            _set_reader_group(tx, path, notes)
            return record
        if previous:  # installed by us earlier: stays ours for uninstall, content stays the admin's
            _set_reader_group(tx, path, notes)  # installs before 0.1.0's real-oned tests left it root:root
            return {**record, "sha256": previous.get("sha256")}
        notes.append(f"kept the existing {entry.destination}")
        return None
    if entry.kind == SUDOERS and current != entry.content:
        validate_sudoers(entry.content, path, target.staged)
    if entry.kind == WRAPPER:
        original = target.path(entry.destination + ".one")
        if current is not None and not _is_ours(current, entry, previous):
            old_original = _read(original)
            old_mode = (original.stat().st_mode & 0o7777) if old_original is not None else 0o755
            def put_back(original: Path = original, old: bytes | None = old_original, mode: int = old_mode) -> None:
                os.replace(original, path)
                if old is not None:
                    _write(original, old, mode)

            tx.step(f"keep OpenNebula's {path.name} as {original}", partial(os.replace, path, original), put_back)
            current = None
        elif not original.exists():
            if not target.staged:
                raise InstallError(f"{path} has no OpenNebula original ({original.name}): is OpenNebula installed?")
            notes.append(f"{entry.destination}: no OpenNebula original to wrap in the staged tree")
        record["original"] = entry.destination + ".one"
    if current != entry.content:
        verb = "install" if current is None else "update"
        tx.step(f"{verb} {path}", lambda: _write(path, entry.content, entry.mode), _restore(path, current, mode))
    elif mode != entry.mode:
        tx.step(f"chmod {entry.mode:o} {path}", lambda: os.chmod(path, entry.mode), lambda: os.chmod(path, mode))
    return record


def _oneadmin(path: Path, change: str, notes: list[str]) -> tuple[int, int] | None:
    """oneadmin's (uid, gid) when root may hand ``path`` to it; else None and a note why not."""
    import pwd

    try:
        user = pwd.getpwnam(layout.OWNER)
    except KeyError:
        notes.append(f"user {layout.OWNER} does not exist: {change} {path} skipped")
        return None
    if os.getuid() != 0:
        notes.append(f"not root: {change} {path} skipped")
        return None
    return user.pw_uid, user.pw_gid


def _set_reader_group(tx: Transaction, path: Path, notes: list[str]) -> None:
    """root:oneadmin: the hooks and drivers (oneadmin) read the file, only root changes it."""
    ids = _oneadmin(path, f"chgrp {layout.OWNER}", notes)
    if ids is None or (path.exists() and not path.is_symlink() and path.stat().st_gid == ids[1]):
        return
    # lchown: a link swapped in after the write changes nothing it points to
    tx.step(f"chgrp {layout.OWNER} {path}", lambda: os.chown(path, 0, ids[1], follow_symlinks=False), lambda: None)


def _set_owner(tx: Transaction, target: layout.Layout, path: Path, notes: list[str]) -> None:
    ids = _oneadmin(path, f"chown {layout.OWNER}", notes)
    if ids is None:
        return
    uid, gid = ids
    if path.exists():
        info = path.stat()
        if (info.st_uid, info.st_gid) == (uid, gid):
            return
        old = (info.st_uid, info.st_gid)
    else:
        old = (0, 0)
    tx.step(f"chown {layout.OWNER}:{gid} {path}", lambda: os.chown(path, uid, gid), lambda: os.chown(path, *old))


def write_record(tx: Transaction, target: layout.Layout, record: dict[str, Any], previous: dict[str, Any]) -> None:
    comparable = {key: value for key, value in record.items()}
    if comparable == previous:
        return
    path = target.path(target.manifest)
    content = (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()
    old = _read(path)
    tx.step(f"record the installation in {path}", lambda: _write(path, content, 0o644), _restore(path, old, 0o644))


def uninstall_files(tx: Transaction, target: layout.Layout, record: dict[str, Any], notes: list[str]) -> None:
    """Remove what the manifest lists, restoring the originals the wrappers replaced."""
    import hashlib

    for item in reversed(record.get("files", [])):
        path = target.path(item["path"])
        current = _read(path)
        ours = current is not None and hashlib.sha256(current).hexdigest() == item.get("sha256")
        if item["kind"] == WRAPPER:
            original = target.path(item["original"])
            if ours and original.exists():
                tx.step(f"restore OpenNebula's {path.name} from {original}",
                        partial(os.replace, original, path), _restore(path, current, item["mode"]))
                continue
            if not ours and original.exists():
                saved = _read(original)
                tx.step(f"remove stale {original} ({path.name} is no longer the wrapper)", original.unlink,
                        _restore(original, saved, 0o755))
                continue
        if current is None:
            continue
        if not ours and item["kind"] == CONFIG:
            notes.append(f"kept {item['path']}: edited since it was installed")
            continue
        mode = path.stat().st_mode & 0o7777
        tx.step(f"remove {path}", path.unlink, _restore(path, current, mode))
    for tree in reversed(record.get("environments", [])):
        path = target.path(tree)
        if path.exists():
            scratch = path.with_name(f".{path.name}.aifactory-removed")
            tx.step(f"remove environment {path}", partial(os.replace, path, scratch),
                    partial(os.replace, scratch, path))
            tx.after_commit.append(partial(shutil.rmtree, scratch, ignore_errors=True))
    manifest = target.path(target.manifest)
    old = _read(manifest)
    if old is not None:
        tx.step(f"remove {manifest}", manifest.unlink, _restore(manifest, old, 0o644))
    scratch_names = {f".{Path(tree).name}.aifactory-removed" for tree in record.get("environments", [])}
    emptied: set[Path] = set()  # directories this run removes
    deferring = False  # once one directory waits for the environments to go, its parents wait too
    for directory in reversed(record.get("directories", [])):
        path = target.path(directory)
        if not path.is_dir():
            continue
        left = {entry for entry in path.iterdir()} - emptied
        if {entry.name for entry in left} - scratch_names:
            notes.append(f"kept {directory}: not empty")
            continue
        emptied.add(path)
        if left or deferring:  # removed after commit, once the environments are gone
            deferring = True
            tx.out.write(("would " if tx.dry_run else "") + f"remove directory {path}\n")
            tx.after_commit.append(partial(_remove_empty, path))
            continue
        mode = path.stat().st_mode & 0o7777
        tx.step(f"remove directory {path}", path.rmdir, partial(path.mkdir, mode=mode))


def _remove_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
