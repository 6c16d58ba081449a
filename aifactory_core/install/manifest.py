"""What to install, discovered from the source tree's layout (no list to keep in step by hand).

=================================================  ==============================================
source                                             target
=================================================  ==============================================
``drivers/vmm/kvm/<action>``                       ``/var/lib/one/remotes/vmm/kvm/<action>``; the
                                                   original is kept as ``<action>.one``
``drivers/im/<probes dir>/...``                    ``/var/lib/one/remotes/im/<probes dir>/...``;
                                                   ``kvm-probes.d`` also into ``qemu-probes.d``
``drivers/vnm/<driver>/<phase>.d/...``             ``/var/lib/one/remotes/vnm/<driver>/<phase>.d/...``
``drivers/sudoers/<name>``                         ``/etc/sudoers.d/<name>`` (0440, checked by visudo)
``drivers/{sudoers,systemd}/<name>``               ``/var/lib/one/remotes/aifactory/host/...``: synced
                                                   to the hosts for ``aifactory host-setup``
``hooks/<name>`` (executables)                     ``/var/lib/one/remotes/hooks/aifactory/<name>``
``hooks/templates/*.tmpl``                         registered with oned (``one.hook.allocate``)
``hooks/systemd/<unit>``                           ``/etc/systemd/system/<unit>`` (the optional
                                                   resident hook server; ``--enable-hook-server``)
(built in)                                         ``/etc/one/aifactory.conf`` if absent; state dir
=================================================  ==============================================

Python scripts get the interpreter of the environment that runs them: host-side scripts the host
environment (``/var/tmp/one/aifactory/venv`` once synced), hooks the frontend environment.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aifactory_core.errors import UsageError
from aifactory_core.install import layout

FILE = "file"          # copied; replaced when its content changes
WRAPPER = "wrapper"    # a VMM action: the file it replaces is kept as <action>.one
CONFIG = "config"      # written only when absent; never overwritten
SUDOERS = "sudoers"    # 0440, validated with visudo -cf before it is put in place
DIRECTORY = "dir"      # created with the owner and mode given
HOST_DATA = "host-data"  # not run by OpenNebula: synced to the hosts for `aifactory host-setup` (0644)

_PYTHON_SHEBANG = re.compile(rb"\A#!(?:/usr/bin/env(?: -S)? )?\S*python3(?P<flags>(?: -[A-Za-z]+)*)[ \t]*\n")
_SKIPPED = re.compile(r"(^README|^\.|\.pyc$|~$|\.orig$|\.rej$)")
_SAFE_NAME = re.compile(r"\A[A-Za-z0-9_.+-]+\Z")
_FRONTEND_DEFAULT_PYTHON = b"/opt/aifactory/venv/bin/python3"
KVM_PROBES = "kvm-probes.d/"
QEMU_PROBES = "qemu-probes.d/"

DEFAULT_CONFIG = """\
# aifactory configuration (TOML). Every key is optional; unknown keys are errors.
# Installed once by install.sh and never overwritten: edit freely.

[plugins]
# enabled = ["vfio", "nvidia_gpu", "pci_inventory", "numa"]   # default: every installed plugin
disabled = []

[host]
# reserved_cpus = "0-1"             # CPUs kept for the host, never given to VMs
# reserved_memory_mib = 512         # memory of each NUMA node kept for the host
# host_devices = ["0000:c1:00.0"]   # functions the host itself uses (boot NIC, storage)
"""


@dataclass(frozen=True)
class Entry:
    """One thing the installer puts in place; ``destination`` is the absolute target path."""

    kind: str
    destination: str
    mode: int
    content: bytes = b""
    source: str = ""

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass(frozen=True)
class HookTemplate:
    """A hook template file; ``name`` is its NAME attribute."""

    name: str
    text: str
    source: str


def _files(top: Path) -> Iterator[Path]:
    if not top.is_dir():
        return
    for directory, subdirs, names in os.walk(top):
        subdirs[:] = sorted(d for d in subdirs if not _SKIPPED.search(d) and d != "__pycache__")
        for name in sorted(names):
            path = Path(directory) / name
            if _SKIPPED.search(name) or path.is_symlink() or not path.is_file():
                continue
            for part in path.relative_to(top).parts:
                if not _SAFE_NAME.match(part):
                    raise UsageError(f"{path}: unexpected file name (letters, digits, _.+- only)")
            yield path


def with_interpreter(content: bytes, python: str) -> bytes:
    """A Python script's first line pointed at ``python``, its flags kept.

    The interpreter is a virtual environment's. On Python 3.11 ``-S`` leaves ``sys.prefix`` at the
    base interpreter (``site`` applies the environment), so only scripts that find the
    environment's packages themselves start with it: the IM probes, which add the site-packages of
    the environment their interpreter belongs to (its ``pyvenv.cfg``) and save ``site``'s start-up.
    """
    match = _PYTHON_SHEBANG.match(content)
    if match is None:
        return content
    flags = match.group("flags").split()
    return b" ".join([b"#!" + python.encode(), *flags]) + b"\n" + content[match.end():]


def _mode(path: Path) -> int:
    return 0o755 if os.access(path, os.X_OK) else 0o644


def _entry(kind: str, source: Path, root: Path, destination: str, python: str | None = None,
           content: bytes | None = None, mode: int | None = None) -> Entry:
    data = source.read_bytes() if content is None else content
    if python is not None:
        data = with_interpreter(data, python)
    return Entry(kind, destination, _mode(source) if mode is None else mode, data, str(source.relative_to(root)))


def discover(source: Path, prefix: str = layout.DEFAULT_PREFIX, target: layout.Layout | None = None) -> list[Entry]:
    """Every file the source tree provides, with its target (``target``'s OpenNebula layout), in install order."""
    where = target if target is not None else layout.Layout()
    host_python = f"{layout.HOST_ENV_ON_HOSTS}/bin/python3"
    frontend_python = f"{prefix}/venv/bin/python3"
    entries: list[Entry] = []
    drivers = source / "drivers"
    for path in _files(drivers / "vmm" / "kvm"):
        if path.parent != drivers / "vmm" / "kvm":
            raise UsageError(f"{path}: VMM actions are files directly under drivers/vmm/kvm")
        entries.append(_entry(WRAPPER, path, source, f"{where.remotes}/vmm/kvm/{path.name}", host_python))
    for area in ("im", "vnm"):
        for path in _files(drivers / area):
            relative = path.relative_to(drivers / area).as_posix()
            entries.append(_entry(FILE, path, source, f"{where.remotes}/{area}/{relative}", host_python))
            if area == "im" and relative.startswith(KVM_PROBES):
                # A host created with the qemu IM driver (-i qemu) runs qemu-probes.d, a copy of the
                # kvm one in OpenNebula's remotes: the suite's probes go into both.
                twin = QEMU_PROBES + relative.removeprefix(KVM_PROBES)
                entries.append(_entry(FILE, path, source, f"{where.remotes}/im/{twin}", host_python))
    for path in _files(drivers / "sudoers"):
        entries.append(_entry(SUDOERS, path, source, f"/etc/sudoers.d/{path.name}", mode=0o440))
    for area in ("sudoers", "systemd"):  # for `aifactory host-setup` on each host, after `onehost sync`
        for path in _files(drivers / area):
            entries.append(_entry(HOST_DATA, path, source, f"{where.host_files}/{area}/{path.name}", mode=0o644))
    hooks = source / "hooks"
    for path in _files(hooks):
        if path.parent == hooks and os.access(path, os.X_OK):
            data = with_interpreter(path.read_bytes(), frontend_python)
            if prefix != layout.DEFAULT_PREFIX:
                data = data.replace(_FRONTEND_DEFAULT_PYTHON, frontend_python.encode())
            entries.append(_entry(FILE, path, source, f"{where.hooks_dir}/{path.name}", content=data))
    for path in _files(hooks / "systemd"):
        unit = path.read_bytes().replace(b"/opt/aifactory/venv/", f"{prefix}/venv/".encode())
        entries.append(_entry(FILE, path, source, f"/etc/systemd/system/{path.name}", content=unit, mode=0o644))
    entries.append(Entry(CONFIG, where.config, 0o640, DEFAULT_CONFIG.encode(), "(built in)"))
    entries.append(Entry(DIRECTORY, where.state_dir, 0o750))
    return entries


def hook_templates(source: Path) -> list[HookTemplate]:
    """The hook templates under ``hooks/templates``, each with its NAME."""
    from aifactory_core.one.template import parse_template

    templates: list[HookTemplate] = []
    for path in sorted((source / "hooks" / "templates").glob("*.tmpl")):
        text = path.read_text(encoding="utf-8")
        names = [value for key, value in parse_template(text, str(path)) if key == "NAME" and isinstance(value, str)]
        if len(names) != 1:
            raise UsageError(f"{path}: a hook template needs exactly one NAME")
        templates.append(HookTemplate(names[0], text, str(path.relative_to(source))))
    return templates
