"""The fabric's one partition authority: it runs where the subnet manager runs, owns the partition
state of every host's VMs, writes OpenSM's ``partitions.conf`` from it and reloads OpenSM.

Every KVM host reaches it through one place, ``[plugin.infiniband] partition_authority`` (an argv,
e.g. ``["ssh", "-o", "BatchMode=yes", "oneadmin@sm-node", "/var/tmp/one/aifactory/venv/bin/python3",
"-m", "aifactory_plugins.infiniband.authority"]``), sending one change as JSON on stdin::

    {"op": "add", "host": "gpu-node-01", "pkey": 16, "guids": ["0xa1f0..."], "membership": "full"}
    {"op": "remove", "host": "gpu-node-01", "pkey": 16, "guids": ["0xa1f0..."]}

Without that setting the host is the SM's host and the change is made in its own process. A change
is made under an exclusive lock on the authority's state (``<state dir>/ib-partitions.lock``):
read the state, change the sending host's entries only, write the state and the file (each
atomically), reload OpenSM. Its settings are the SM host's own ``[plugin.infiniband]``:
``partitions_file``, ``opensm_reload`` (argv, no shell) and ``management_guids`` (ports kept full
members of the default partition). Bad input: one line on stderr, exit 2; a failure: exit 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aifactory_core.errors import AifactoryError, ConfigError, HostError, UsageError
from aifactory_plugins.infiniband.partitions import FabricPartitions, host_name, port_guid, render
from aifactory_plugins.infiniband.pkey import membership as check_membership
from aifactory_plugins.infiniband.pkey import pkey as check_pkey

DEFAULT_PARTITIONS_FILE = "/etc/opensm/partitions.conf"
STATE_FILE = "ib-partitions.json"
LOCK_FILE = "ib-partitions.lock"
LOCK_TIMEOUT_S = 60.0
MAX_CHANGE = 64 * 1024
MAX_GUIDS = 256  # port GUIDs in one change
OPS = ("add", "remove")


@dataclass(frozen=True)
class Change:
    """One host's change to the fabric's partitions."""

    op: str
    host: str
    pkey: int
    guids: tuple[str, ...]
    membership: str = "full"

    def to_json(self) -> str:
        return json.dumps({"op": self.op, "host": self.host, "pkey": self.pkey, "guids": list(self.guids),
                           "membership": self.membership}, sort_keys=True)  # fmt: skip

    @classmethod
    def parse(cls, text: str | bytes) -> Change:
        try:
            data = json.loads(text)
        except ValueError:
            raise UsageError("partition change is not JSON") from None
        if not isinstance(data, dict) or set(data) - {"op", "host", "pkey", "guids", "membership"}:
            raise UsageError("partition change must be an object with op, host, pkey, guids[, membership]")
        if data.get("op") not in OPS:
            raise UsageError(f"partition change op {str(data.get('op'))[:20]!r}: expected add or remove")
        guids = data.get("guids")
        if not isinstance(guids, list) or not guids or len(guids) > MAX_GUIDS:
            raise UsageError(f"partition change guids must be a list of 1 to {MAX_GUIDS} port GUIDs")
        return cls(op=data["op"], host=host_name(data.get("host")), pkey=check_pkey(data.get("pkey")),
                   guids=tuple(port_guid(str(guid)) for guid in guids),
                   membership=check_membership(data.get("membership", "full")))  # fmt: skip


@dataclass
class PartitionAuthority:
    state_dir: Path
    partitions_file: Path
    reload: Sequence[str] = ()
    management_guids: Sequence[str] = ()
    runner: Any = field(default=subprocess.run, repr=False)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], state_dir: Path) -> PartitionAuthority:
        reload = settings.get("opensm_reload", [])
        if not isinstance(reload, list) or not all(isinstance(arg, str) for arg in reload):
            raise ConfigError("[plugin.infiniband] opensm_reload must be a list of strings (argv)")
        management = settings.get("management_guids", [])
        if not isinstance(management, list):
            raise ConfigError("[plugin.infiniband] management_guids must be a list of port GUIDs")
        try:
            guids = tuple(port_guid(str(guid)) for guid in management)
        except UsageError as error:
            raise ConfigError(f"[plugin.infiniband] management_guids: {error.message}") from None
        return cls(state_dir, Path(str(settings.get("partitions_file", DEFAULT_PARTITIONS_FILE))), tuple(reload),
                   guids)  # fmt: skip

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def _load(self) -> FabricPartitions:
        from aifactory_core.lifecycle.atomic import read_json

        try:
            data = read_json(self.state_file)
        except FileNotFoundError:
            return FabricPartitions()
        except (OSError, ValueError) as error:
            raise HostError(f"unreadable partition state {self.state_file}: {error}") from None
        try:
            return FabricPartitions.from_json(data)
        except (UsageError, ValueError) as error:
            raise HostError(f"partition state {self.state_file}: {error}") from None

    def apply(self, change: Change) -> bool:
        """Make ``change`` under the lock; True when the partitions changed (file written, SM reloaded)."""
        from aifactory_core.lifecycle.atomic import write_atomic

        with state_lock(self.state_dir):
            table = self._load()
            if change.op == "add":
                changed = table.add(change.host, change.pkey, change.guids, change.membership)
            else:
                changed = table.remove(change.host, change.pkey, change.guids)
            if not changed:
                return False
            try:
                write_atomic(self.state_file, json.dumps(table.to_json(), indent=1, sort_keys=True).encode())
                write_atomic(self.partitions_file, render(table.merged(), self.management_guids).encode(), 0o644)
            except OSError as error:
                raise HostError(f"OpenSM partitions not written: {error.filename or ''} {error.strerror}") from None
            self._reload()
            return True

    def _reload(self) -> None:
        if not self.reload:
            return
        try:
            result = self.runner(list(self.reload), capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as error:
            raise HostError(f"OpenSM reload {' '.join(self.reload)} could not run: {error}") from None
        if result.returncode != 0:
            raise HostError(f"OpenSM reload {' '.join(self.reload)} failed: {(result.stderr or '').strip()[:200]}")



@contextmanager
def state_lock(state_dir: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive hold of ``<state dir>/ib-partitions.lock`` for one read-change-write (bounded wait;
    the lock goes with the descriptor, so a killed authority never leaves it taken)."""
    import os

    from aifactory_core.flocks import flock_within
    from aifactory_core.lifecycle.atomic import open_lock

    path = state_dir / LOCK_FILE  # root's on the SM host: opened without following any link
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise HostError(f"partition lock {path}: {error.strerror or error}") from None
    descriptor = open_lock(path)
    try:
        if not flock_within(descriptor, timeout_s):
            raise HostError(f"partition lock {path} still held after {timeout_s:g}s")
        yield
    finally:
        os.close(descriptor)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aifactory_plugins.infiniband.authority``: one change on stdin, made here."""
    from aifactory_core.config import load_config
    from aifactory_core.hostroot import HostRoot

    try:
        if list(sys.argv[1:] if argv is None else argv):
            raise UsageError("usage: python -m aifactory_plugins.infiniband.authority < CHANGE.json")
        data = sys.stdin.buffer.read(MAX_CHANGE + 1)
        if len(data) > MAX_CHANGE:
            raise UsageError(f"partition change is larger than {MAX_CHANGE} bytes")
        change = Change.parse(data)
        settings = load_config(None).plugin("infiniband")
        authority = PartitionAuthority.from_settings(settings, HostRoot.resolve().state_dir)
        changed = authority.apply(change)
    except AifactoryError as error:
        sys.stderr.write(f"aifactory partition authority: {error.message}\n")
        return error.exit_status
    verb = "joins" if change.op == "add" else "leaves"
    print(f"{change.host}: {len(change.guids)} port(s) {verb} pkey {change.pkey:#06x}"
          f"{'' if changed else ' (no change)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
