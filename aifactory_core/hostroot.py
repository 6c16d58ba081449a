"""The one place that maps the host's paths.

Every path the suite reads or writes (``/sys``, ``/proc``, ``/dev/vfio``, its state directory)
is built here from a host root that stands for ``/``. Tests point it at a captured or generated
tree with ``--host-root DIR`` or ``AIFACTORY_HOST_ROOT``; production leaves it at ``/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from aifactory_core.errors import UsageError

ENV_HOST_ROOT = "AIFACTORY_HOST_ROOT"
ENV_STATE_DIR = "AIFACTORY_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/one/aifactory"


@dataclass(frozen=True)
class HostRoot:
    """A host file-system root; ``HostRoot(Path('/'))`` is the live machine."""

    root: Path
    state_dir_override: Path | None = None

    @classmethod
    def resolve(cls, option: str | None = None, state_dir: str | None = None) -> HostRoot:
        """Pick the root from the option, else ``AIFACTORY_HOST_ROOT``, else ``/``."""
        chosen = option or os.environ.get(ENV_HOST_ROOT) or "/"
        path = Path(chosen)
        if not path.is_dir():
            raise UsageError(f"host root {chosen!r} is not a directory")
        state = state_dir or os.environ.get(ENV_STATE_DIR)
        return cls(path.resolve(), Path(state) if state else None)

    @property
    def is_live(self) -> bool:
        """True when the root is the running machine's own ``/``."""
        return self.root == Path("/")

    def path(self, absolute: str) -> Path:
        """Map an absolute host path (``/sys/...``) under the root."""
        if not absolute.startswith("/"):
            raise ValueError(f"host path must be absolute: {absolute}")
        return self.root / absolute.lstrip("/")

    @property
    def sys(self) -> Path:
        return self.path("/sys")

    @property
    def proc(self) -> Path:
        return self.path("/proc")

    @property
    def dev(self) -> Path:
        return self.path("/dev")

    @property
    def pci_devices(self) -> Path:
        return self.path("/sys/bus/pci/devices")

    @property
    def pci_drivers(self) -> Path:
        return self.path("/sys/bus/pci/drivers")

    @property
    def state_dir(self) -> Path:
        """Where journals, locks and counters live (``/var/lib/one/aifactory`` by default)."""
        if self.state_dir_override is not None:
            return self.state_dir_override
        return self.path(DEFAULT_STATE_DIR)

    def read_text(self, absolute: str, default: str | None = None) -> str | None:
        """Read a small text file under the root, stripped; ``default`` when it cannot be read."""
        try:
            return self.path(absolute).read_text(errors="replace").strip()
        except OSError:
            return default
