"""Where OpenNebula expects things on a frontend, optionally under a staging root (``DESTDIR``).

The remotes layout follows OpenNebula's own ``install.sh`` (``VAR_LOCATION=/var/lib/one``):
``src/vmm_mad/remotes/kvm`` -> ``/var/lib/one/remotes/vmm/kvm``,
``src/im_mad/remotes/kvm-probes.d/<dir>`` -> ``/var/lib/one/remotes/im/kvm-probes.d/<dir>``,
``src/vnm_mad/remotes/<driver>`` (with ``pre.d post.d clean.d``) -> ``/var/lib/one/remotes/vnm/<driver>``,
``share/hooks/<name>`` -> ``/var/lib/one/remotes/hooks/<name>`` (onehem's ``:hook_base_path``).
``onehost sync`` copies ``/var/lib/one/remotes`` to ``/var/tmp/one`` on every host.

A self-contained OpenNebula (its ``install.sh -d ONE_LOCATION``; every OpenNebula command then runs
with ``$ONE_LOCATION`` set) keeps the same tree under one directory: ``ONE_LOCATION/etc`` for
``/etc/one``, ``ONE_LOCATION/var`` for ``/var/lib/one`` and ``ONE_LOCATION/var/remotes`` for the
remotes. The hosts' side (``/var/tmp/one``, ``/etc/sudoers.d``) is the same in both.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_HOOK_BASE_PATH = re.compile(r"""^:hook_base_path:[ \t]*(['"]?)(/[^'"\s#]+)\1[ \t]*(?:#.*)?$""", re.MULTILINE)

HOST_REMOTES = "/var/tmp/one"  # where `onehost sync` puts the remotes on every host
HOST_ENV_ON_HOSTS = f"{HOST_REMOTES}/aifactory/venv"
HOST_FILES_ON_HOSTS = f"{HOST_REMOTES}/aifactory/host"
DEFAULT_PREFIX = "/opt/aifactory"
OWNER = "oneadmin"
# The frontend's paths (remotes, config, state, manifest, oned.conf) are Layout's properties.


@dataclass(frozen=True)
class Layout:
    """Target paths: ``destdir`` stands for ``/`` (empty = the live machine); ``prefix`` holds the frontend venv."""

    destdir: Path = Path("/")
    prefix: str = DEFAULT_PREFIX
    one_location: str = ""  # a self-contained OpenNebula's ONE_LOCATION; empty: the packaged layout

    def __post_init__(self) -> None:
        if self.one_location and (not self.one_location.startswith("/") or "\n" in self.one_location):
            raise ValueError(f"ONE_LOCATION must be an absolute path: {self.one_location!r}")

    def path(self, absolute: str) -> Path:
        """An absolute target path mapped under the staging root."""
        if not absolute.startswith("/"):
            raise ValueError(f"target path must be absolute: {absolute}")
        return self.destdir / absolute.lstrip("/")

    @property
    def staged(self) -> bool:
        return self.destdir != Path("/")

    @property
    def frontend_python(self) -> str:
        return f"{self.prefix}/venv/bin/python3"

    @property
    def etc(self) -> str:
        """OpenNebula's configuration directory (``/etc/one``)."""
        return f"{self.one_location}/etc" if self.one_location else "/etc/one"

    @property
    def var(self) -> str:
        """OpenNebula's state directory (``/var/lib/one``)."""
        return f"{self.one_location}/var" if self.one_location else "/var/lib/one"

    @property
    def remotes(self) -> str:
        return f"{self.var}/remotes"

    @property
    def hooks_dir(self) -> str:
        """Where the hook manager finds a hook whose COMMAND is relative: ``:hook_base_path:`` in
        ``onehem-server.conf`` (a self-contained OpenNebula ships it pointing at ``/var/lib/one``
        too), else the remotes' ``hooks``."""
        return f"{self.hook_base_path()}/aifactory"

    def hook_base_path(self) -> str:
        try:
            text = self.path(f"{self.etc}/onehem-server.conf").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return f"{self.remotes}/hooks"
        found = _HOOK_BASE_PATH.search(text)
        if not found:
            return f"{self.remotes}/hooks"
        path = found.group(2).rstrip("/")
        # onehem-server.conf may be oneadmin's (a self-contained install): root writes hooks only
        # under OpenNebula's remotes, whatever it names.
        allowed = (f"{self.remotes}/", "/var/lib/one/remotes/")
        if os.path.normpath(path) != path or not any(path.startswith(prefix) for prefix in allowed):
            from aifactory_core.errors import UsageError

            raise UsageError(f"onehem-server.conf: :hook_base_path: {path} is not under {self.remotes} "
                             "or /var/lib/one/remotes: refusing to install hooks there")
        return path

    @property
    def host_env(self) -> str:
        """The hosts' Python environment as staged in the remotes (synced to ``HOST_ENV_ON_HOSTS``)."""
        return f"{self.remotes}/aifactory/venv"

    @property
    def host_files(self) -> str:
        return f"{self.remotes}/aifactory/host"

    @property
    def config(self) -> str:
        return f"{self.etc}/aifactory.conf"

    @property
    def state_dir(self) -> str:
        return f"{self.var}/aifactory"

    @property
    def manifest(self) -> str:
        return f"{self.state_dir}/install-manifest.json"

    @property
    def oned_conf(self) -> str:
        return f"{self.etc}/oned.conf"

    @property
    def monitord_conf(self) -> str:
        return f"{self.etc}/monitord.conf"
