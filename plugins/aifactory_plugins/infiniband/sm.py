"""Subnet Manager back-ends: the host cannot enforce partitions, only the SM can.

A VF's port GUID joins the tenant's pkey at prepare and leaves it at release. Two back-ends:

* :class:`OpenSM` hands each change to the fabric's one partition authority
  (:mod:`aifactory_plugins.infiniband.authority`), which keeps every host's memberships on the SM's
  host, regenerates ``partitions.conf`` from all of them and reloads OpenSM. It is reached through
  one place, ``[plugin.infiniband] partition_authority`` (an argv, e.g. ``ssh`` to the SM's host;
  the change travels as JSON on stdin, nothing of it in argv); without that setting this host is
  the SM's host and the change is made in this process.
* :class:`Ufm` calls UFM Enterprise's REST API: ``POST /ufmRest/resources/pkeys`` with
  ``{"pkey", "guids", "membership", "index0", "ip_over_ib"}`` to add GUIDs, and
  ``DELETE /ufmRest/resources/pkeys/<pkey>/guids/<guid,...>`` to remove them (UFM is the fabric's
  authority itself).

Both are idempotent (adding a present member or removing an absent one succeeds), as the
lifecycle's undo requires.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aifactory_core.errors import ConfigError, HostError
from aifactory_plugins.infiniband.authority import MAX_GUIDS, Change, PartitionAuthority
from aifactory_plugins.infiniband.partitions import FabricPartitions, host_name, port_guid
from aifactory_plugins.infiniband.pkey import membership as check_membership
from aifactory_plugins.infiniband.pkey import pkey as check_pkey

AUTHORITY_TIMEOUT_S = 120.0
LEGACY_STATE = "opensm-partitions.json"


class SubnetManager(Protocol):
    def add_members(self, pkey: int, guids: Sequence[str], membership: str) -> None: ...

    def remove_members(self, pkey: int, guids: Sequence[str]) -> None: ...


@dataclass
class OpenSM:
    """OpenSM through the fabric's partition authority, for the VMs of KVM host ``host``.

    ``legacy_state``: the memberships this host kept itself before the authority existed
    (``<state dir>/opensm-partitions.json``, pkey -> GUID -> membership); they are handed to the
    authority before this host's first change, so the VMs running across the upgrade keep their
    partitions, and the file is renamed ``*.migrated``."""

    host: str
    authority: Sequence[str] = ()
    local: PartitionAuthority | None = None
    runner: Any = field(default=subprocess.run, repr=False)
    legacy_state: Path | None = None

    def _send(self, change: Change) -> None:
        self._hand_over_legacy_state()
        self._deliver(change)

    def _hand_over_legacy_state(self) -> None:
        from aifactory_core.errors import UsageError
        from aifactory_core.lifecycle.atomic import read_json

        path = self.legacy_state
        if path is None:
            return
        try:
            table = FabricPartitions.from_json({self.host: read_json(path)})
        except FileNotFoundError:
            return
        except (OSError, ValueError, UsageError) as error:
            raise HostError(f"earlier OpenSM membership state {path}: {error}") from None
        for key, members in table.hosts.get(self.host, {}).items():
            for member in ("full", "limited"):
                guids = sorted(guid for guid, kind in members.items() if kind == member)
                for start in range(0, len(guids), MAX_GUIDS):
                    self._deliver(Change("add", self.host, key, tuple(guids[start:start + MAX_GUIDS]), member))
        try:
            path.rename(path.with_name(path.name + ".migrated"))
        except OSError as error:
            raise HostError(f"earlier OpenSM membership state {path} not retired: {error.strerror}") from None

    def _deliver(self, change: Change) -> None:
        if not self.authority:
            if self.local is None:
                raise ConfigError("[plugin.infiniband] partition_authority is empty and no local authority is set up")
            self.local.apply(change)
            return
        try:
            result = self.runner(list(self.authority), input=change.to_json(), capture_output=True, text=True,
                                 timeout=AUTHORITY_TIMEOUT_S, check=False)  # fmt: skip
        except (OSError, subprocess.SubprocessError) as error:
            raise HostError(f"partition authority {self.authority[0]} could not run: {error}") from None
        if result.returncode != 0:
            lines = (result.stderr or "").strip().splitlines() or [f"exit status {result.returncode}"]
            raise HostError(f"partition authority ({' '.join(self.authority)[:120]}): {lines[-1][:300]}")

    def add_members(self, pkey: int, guids: Sequence[str], membership: str) -> None:
        self._send(Change("add", self.host, check_pkey(pkey), tuple(port_guid(g) for g in guids),
                          check_membership(membership)))  # fmt: skip

    def remove_members(self, pkey: int, guids: Sequence[str]) -> None:
        self._send(Change("remove", self.host, check_pkey(pkey), tuple(port_guid(g) for g in guids)))


@dataclass
class Ufm:
    """UFM Enterprise REST (``base_url`` e.g. ``https://ufm.example/ufmRest``)."""

    base_url: str
    token: str | None = None
    username: str | None = None
    password: str | None = None
    timeout_s: float = 20.0

    def _call(self, method: str, path: str, body: Any = None) -> None:
        import base64
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url.rstrip("/") + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Basic {self.token}")
        elif self.username is not None:
            pair = base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode()
            request.add_header("Authorization", f"Basic {pair}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 (URL from config)
                response.read()
        except urllib.error.HTTPError as error:
            if method == "DELETE" and error.code == 404:
                return  # already absent
            detail = error.read()[:200].decode(errors="replace")
            raise HostError(f"UFM {method} {path}: HTTP {error.code} {detail}") from None
        except (urllib.error.URLError, OSError) as error:
            raise HostError(f"UFM {method} {path}: {error}") from None

    def add_members(self, pkey: int, guids: Sequence[str], membership: str) -> None:
        body = {"pkey": f"{check_pkey(pkey):#06x}", "guids": [port_guid(g)[2:] for g in guids],
                "membership": check_membership(membership), "index0": False, "ip_over_ib": True}
        self._call("POST", "/resources/pkeys", body)

    def remove_members(self, pkey: int, guids: Sequence[str]) -> None:
        listed = ",".join(port_guid(g)[2:] for g in guids)
        self._call("DELETE", f"/resources/pkeys/{check_pkey(pkey):#06x}/guids/{listed}")


def from_settings(settings: Mapping[str, Any], state_dir: Path) -> SubnetManager:
    """The back-end named by ``[plugin.infiniband] subnet_manager`` (``opensm`` or ``ufm``)."""
    kind = settings.get("subnet_manager", "opensm")
    if kind == "opensm":
        authority = settings.get("partition_authority", [])
        if not isinstance(authority, list) or not all(isinstance(arg, str) and arg for arg in authority):
            raise ConfigError("[plugin.infiniband] partition_authority must be a list of strings (argv)")
        local = None if authority else PartitionAuthority.from_settings(settings, state_dir)
        return OpenSM(host_name(os.uname().nodename), tuple(authority), local, legacy_state=state_dir / LEGACY_STATE)
    if kind == "ufm":
        url = settings.get("ufm_url")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise ConfigError("[plugin.infiniband] ufm_url must be an http(s) URL")
        token = None
        token_file = settings.get("ufm_token_file")
        if token_file:
            try:
                token = Path(str(token_file)).read_text().strip()
            except OSError as error:
                raise ConfigError(f"[plugin.infiniband] ufm_token_file: {error}") from None
        return Ufm(url, token=token, username=settings.get("ufm_username"))
    raise ConfigError(f"[plugin.infiniband] subnet_manager = {kind!r}: expected opensm or ufm")
