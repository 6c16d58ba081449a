"""Where OpenNebula expects things on a frontend, optionally under a staging root (``DESTDIR``).

The remotes layout follows OpenNebula's own ``install.sh`` (``VAR_LOCATION=/var/lib/one``):
``src/vmm_mad/remotes/kvm`` -> ``/var/lib/one/remotes/vmm/kvm``,
``src/im_mad/remotes/kvm-probes.d/<dir>`` -> ``/var/lib/one/remotes/im/kvm-probes.d/<dir>``,
``src/vnm_mad/remotes/<driver>`` (with ``pre.d post.d clean.d``) -> ``/var/lib/one/remotes/vnm/<driver>``,
``share/hooks/<name>`` -> ``/var/lib/one/remotes/hooks/<name>`` (onehem's ``:hook_base_path``).
``onehost sync`` copies ``/var/lib/one/remotes`` to ``/var/tmp/one`` on every host.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REMOTES = "/var/lib/one/remotes"
HOST_REMOTES = "/var/tmp/one"
HOOKS_DIR = f"{REMOTES}/hooks/aifactory"
HOST_ENV = f"{REMOTES}/aifactory/venv"
HOST_ENV_ON_HOSTS = f"{HOST_REMOTES}/aifactory/venv"
HOST_FILES = f"{REMOTES}/aifactory/host"
HOST_FILES_ON_HOSTS = f"{HOST_REMOTES}/aifactory/host"
CONFIG = "/etc/one/aifactory.conf"
SUDOERS = "/etc/sudoers.d/aifactory"
STATE_DIR = "/var/lib/one/aifactory"
MANIFEST = f"{STATE_DIR}/install-manifest.json"
ONED_CONF = "/etc/one/oned.conf"
MONITORD_CONF = "/etc/one/monitord.conf"
DEFAULT_PREFIX = "/opt/aifactory"
OWNER = "oneadmin"


@dataclass(frozen=True)
class Layout:
    """Target paths: ``destdir`` stands for ``/`` (empty = the live machine); ``prefix`` holds the frontend venv."""

    destdir: Path = Path("/")
    prefix: str = DEFAULT_PREFIX

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
