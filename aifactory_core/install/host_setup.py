"""What a KVM host needs beyond the synced remotes, as one transaction (run as root on the host).

* ``/usr/local/lib/aifactory/venv``: a root-owned copy of the synced host environment
  (``/var/tmp/one/aifactory/venv``, which ``oneadmin`` can write, so root never runs from it); its
  scripts are pointed at the copy's own interpreter; re-copied only when its content differs.
* ``/etc/sudoers.d/aifactory`` (0440), checked with ``visudo -cf`` before it is put in place.
* ``/etc/systemd/system/aifactory-repair.service``, enabled: ``aifactory repair --boot`` before libvirt.

The sudoers snippet and the unit come from ``drivers/{sudoers,systemd}`` of a source tree, or from
their synced copy (``/var/tmp/one/aifactory/host/{sudoers,systemd}``). What this run installed is
recorded in ``/usr/local/lib/aifactory/host-setup.json`` for idempotence and ``--uninstall``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from aifactory_core.errors import UsageError
from aifactory_core.install import layout, stage, systemd
from aifactory_core.install.manifest import FILE, Entry
from aifactory_core.install.stage import InstallError, Transaction

ROOT_DIR = "/usr/local/lib/aifactory"
ROOT_ENV = f"{ROOT_DIR}/venv"
RECORD = f"{ROOT_DIR}/host-setup.json"
SYNCED_FILES = layout.HOST_FILES_ON_HOSTS
UNIT_NAME = "aifactory-repair.service"
UNIT = f"/etc/systemd/system/{UNIT_NAME}"
SUDOERS_NAME = "aifactory"
SYSTEM_LINK_TARGETS = ("/usr/bin/", "/usr/lib/", "/usr/lib64/", "/bin/", "/lib/", "/lib64/")
"""Where an environment's absolute links may point (the base interpreter and its library)."""
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


@dataclass(frozen=True)
class Sources:
    environment: Path
    """The synced host environment to copy (its scripts name ``environment_path``)."""
    environment_path: str
    """Where the environment's scripts believe it lives (the path written in their first lines)."""
    sudoers: Path
    unit: Path


def find_sources(target: layout.Layout, files_dir: Path | None, environment: Path | None) -> Sources:
    """The files to install: ``files_dir`` holds ``sudoers/`` and ``systemd/`` (a source tree's
    ``drivers``, or the synced copy under the target root by default)."""
    directory = files_dir if files_dir is not None else target.path(SYNCED_FILES)
    env = environment if environment is not None else target.path(layout.HOST_ENV_ON_HOSTS)
    sources = Sources(env, layout.HOST_ENV_ON_HOSTS, directory / "sudoers" / SUDOERS_NAME,
                      directory / "systemd" / UNIT_NAME)
    for path in (sources.sudoers, sources.unit):
        if not path.is_file():
            raise UsageError(f"{path} not found: run 'onehost sync --force' on the frontend, or give --source "
                             "a suite checkout")
    if not (env / "bin" / "aifactory-root-helper").is_file():
        raise UsageError(f"{env} is not the suite's host environment (no bin/aifactory-root-helper): "
                         "run 'onehost sync --force' on the frontend")
    return sources


def _rewritten(content: bytes, old: str, new: str) -> bytes:
    """A script of ``bin/`` pointed at the copy: every mention of the old location replaced."""
    if b"\0" in content:
        return content
    return content.replace(old.encode(), new.encode())


def _walk(top: Path) -> list[Path]:
    found: list[Path] = []
    for directory, subdirs, names in os.walk(top):
        subdirs.sort()
        base = Path(directory)
        found.extend(base / name for name in subdirs)
        found.extend(base / name for name in sorted(names))
    return found


def environment_digest(top: Path, rewrite: tuple[str, str] | None = None) -> str:
    """Digest of a tree's names, kinds, executable bits, link targets and contents (``bin/``
    scripts as they are after ``rewrite``)."""
    digest = hashlib.sha256()
    for path in _walk(top):
        relative = path.relative_to(top).as_posix()
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            digest.update(f"L {relative} {os.readlink(path)}\n".encode())
            continue
        if stat.S_ISDIR(info.st_mode):
            digest.update(f"D {relative}\n".encode())
            continue
        content = path.read_bytes()
        if rewrite is not None and relative.startswith("bin/"):
            content = _rewritten(content, *rewrite)
        executable = bool(info.st_mode & stat.S_IXUSR)
        digest.update(f"F {relative} {executable} {hashlib.sha256(content).hexdigest()}\n".encode())
    return digest.hexdigest()


def unsafe_paths(top: Path) -> list[str]:
    """Paths in ``top`` (itself included) that are not root's or that group or others may write."""
    problems = []
    for path in [top, *_walk(top)]:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            continue
        if info.st_uid != 0 or info.st_gid != 0 or info.st_mode & _WRITABLE_BY_OTHERS:
            problems.append(str(path))
    return problems


def _safe_link(relative: Path, link: str) -> bool:
    """A link the root-owned copy may keep: inside the environment, or to a root-owned system path."""
    if os.path.isabs(link):
        return os.path.normpath(link).startswith(SYSTEM_LINK_TARGETS)
    return not os.path.normpath(os.path.join(os.path.dirname(relative), link)).startswith("..")


def _copy_environment(source: Sources, destination: Path, final_path: str) -> None:
    """Copy the environment to ``destination`` owned by root (when root), no group/other write;
    nothing is left behind when it fails."""
    try:
        _copy_tree(source, destination, final_path)
    except BaseException:
        shutil.rmtree(destination, ignore_errors=True)
        raise


def _copy_tree(source: Sources, destination: Path, final_path: str) -> None:
    as_root = os.geteuid() == 0
    destination.mkdir(mode=0o755)
    for path in _walk(source.environment):
        relative = path.relative_to(source.environment)
        copy = destination / relative
        if path.is_symlink():
            link = os.readlink(path)
            if not _safe_link(relative, link):
                raise InstallError(f"{path}: a link out of the environment to {link} (only system paths "
                                   f"{', '.join(SYSTEM_LINK_TARGETS)} may be linked)")
            copy.symlink_to(link)
            if as_root:
                os.lchown(copy, 0, 0)
            continue
        if path.is_dir():
            copy.mkdir(mode=0o755)
        else:
            content = path.read_bytes()
            if relative.parts[0] == "bin":
                content = _rewritten(content, source.environment_path, final_path)
            copy.write_bytes(content)
            os.chmod(copy, 0o755 if os.access(path, os.X_OK) else 0o644)
            # The source's times: the compiled modules beside it stay valid (a copy stamped now
            # would have every first import recompile the environment).
            times = path.stat()
            os.utime(copy, ns=(times.st_atime_ns, times.st_mtime_ns))
        if as_root:
            os.chown(copy, 0, 0)
    os.chmod(destination, 0o755)
    if as_root:
        os.chown(destination, 0, 0)


def install_environment(tx: Transaction, target: layout.Layout, sources: Sources, notes: list[str]) -> None:
    path = target.path(ROOT_ENV)
    wanted = environment_digest(sources.environment, (sources.environment_path, ROOT_ENV))
    if path.exists():
        safe = os.geteuid() != 0 or not unsafe_paths(path)
        if safe and environment_digest(path) == wanted:
            return
    new = path.with_name(f".{path.name}.aifactory-new")
    old = path.with_name(f".{path.name}.aifactory-old")
    for scratch in (new, old):
        if scratch.exists() and not tx.dry_run:
            shutil.rmtree(scratch)
    tx.step(f"copy {sources.environment} to {new} (root-owned)", partial(_copy_environment, sources, new, ROOT_ENV),
            partial(shutil.rmtree, new, ignore_errors=True))
    if path.exists():
        tx.step(f"set the previous {path} aside", partial(os.replace, path, old), partial(os.replace, old, path))
        tx.after_commit.append(partial(shutil.rmtree, old, ignore_errors=True))
    tx.step(f"install {path}", partial(os.replace, new, path), partial(os.replace, path, new))
    if os.geteuid() != 0:
        notes.append(f"not root: {path} is owned by uid {os.geteuid()}, not root")


def enable_unit(tx: Transaction, target: layout.Layout, unit_changed: bool, notes: list[str]) -> bool:
    """``systemctl enable`` the unit; False (with a note) where systemd does not run or when staged."""
    if not systemd.running(target):
        where = "a staged tree" if target.staged else "this machine does not run systemd"
        notes.append(f"{UNIT_NAME} not enabled ({where}): enable it with 'systemctl enable {UNIT_NAME}' "
                     "or have the init system run 'aifactory repair --boot' before libvirtd")
        return False
    if unit_changed:
        systemd.reload_step(tx)
    if tx.dry_run or not systemd.succeeds("is-enabled", "--quiet", UNIT_NAME):
        tx.step(f"systemctl enable {UNIT_NAME}", partial(systemd.checked, "enable", UNIT_NAME),
                partial(systemd.quiet, "disable", UNIT_NAME))
    return True


def setup(target: layout.Layout, sources: Sources, tx: Transaction) -> list[str]:
    """Install (or bring up to date) everything; returns the notes for the admin."""
    notes: list[str] = []
    previous = load_record(target)
    recorded = {item["path"]: item for item in previous.get("files", [])}
    created: list[str] = list(previous.get("directories", []))
    stage.make_dirs(tx, target, ROOT_DIR, created)
    install_environment(tx, target, sources, notes)
    sudoers = Entry(FILE, f"/etc/sudoers.d/{SUDOERS_NAME}", 0o440, sources.sudoers.read_bytes(), str(sources.sudoers))
    unit = Entry(FILE, UNIT, 0o644, sources.unit.read_bytes(), str(sources.unit))
    stage.validate_sudoers(sudoers.content, target.path(sudoers.destination), staged=False)
    files: list[dict[str, Any]] = []
    unit_changed = False
    for entry in (sudoers, unit):
        if entry.destination not in recorded and stage._read(target.path(entry.destination)) == entry.content:
            notes.append(f"{entry.destination} already in place (not installed by host-setup: left to its owner)")
            continue  # e.g. the frontend installer's, on a host that is also the frontend
        before = tx.changes
        item = stage.install_entry(tx, target, entry, recorded.get(entry.destination, {}), created, notes)
        unit_changed |= entry is unit and tx.changes != before
        if item is not None:
            files.append(item)
    enabled = enable_unit(tx, target, unit_changed, notes) or bool(previous.get("enabled"))
    record = {"format": 1, "files": files, "directories": created, "environment": ROOT_ENV, "enabled": enabled}
    if record != previous:
        path = target.path(RECORD)
        content = (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()
        old = stage._read(path)
        tx.step(f"record the host setup in {path}", partial(stage._write, path, content, 0o644),
                stage._restore(path, old, 0o644))
    return notes


def uninstall(target: layout.Layout, tx: Transaction) -> list[str]:
    """Remove exactly what the record lists (a file edited since is removed only if still ours)."""
    record = load_record(target)
    if not record:
        raise UsageError(f"nothing to uninstall: no {target.path(RECORD)}")
    notes: list[str] = []
    if record.get("enabled") and systemd.running(target):
        tx.step(f"systemctl disable {UNIT_NAME}", partial(systemd.checked, "disable", UNIT_NAME),
                partial(systemd.quiet, "enable", UNIT_NAME))
    for item in reversed(record.get("files", [])):
        path = target.path(item["path"])
        current = stage._read(path)
        if current is None:
            continue
        if hashlib.sha256(current).hexdigest() != item.get("sha256"):
            notes.append(f"kept {item['path']}: changed since host-setup installed it")
            continue
        tx.step(f"remove {path}", path.unlink, stage._restore(path, current, item["mode"]))
    if systemd.running(target):
        tx.after_commit.append(partial(systemd.quiet, "daemon-reload"))
    environment = target.path(record.get("environment", ROOT_ENV))
    if environment.exists():
        scratch = environment.with_name(f".{environment.name}.aifactory-removed")
        tx.step(f"remove environment {environment}", partial(os.replace, environment, scratch),
                partial(os.replace, scratch, environment))
        tx.after_commit.append(partial(shutil.rmtree, scratch, ignore_errors=True))
    path = target.path(RECORD)
    old = stage._read(path)
    tx.step(f"remove {path}", path.unlink, stage._restore(path, old, 0o644))
    for directory in reversed(record.get("directories", [])):
        tx.after_commit.append(partial(_remove_if_empty, target.path(directory), notes))
        tx.out.write(("would " if tx.dry_run else "") + f"remove directory {target.path(directory)} if empty\n")
    return notes


def load_record(target: layout.Layout) -> dict[str, Any]:
    data = stage._read(target.path(RECORD))
    if data is None:
        return {}
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if not isinstance(record, dict) or record.get("format") != 1:
        raise UsageError(f"{target.path(RECORD)}: not a valid host-setup record")
    return record


def _remove_if_empty(path: Path, notes: list[str]) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        notes.append(f"kept {path}: not empty")
