"""The tenant policy file (TOML), validated into frozen objects with errors naming key and line.

```toml
[opennebula]
version = "7.0"            # "6.10", "7.0", "7.2": which quota levers exist
zone = 0
infrastructure_admin_groups = ["oneadmin"]   # layer 4: not restricted by tenant policy

[tenant.alpha]
group = "tenant-a"         # the OpenNebula group (created by `tenant apply`)
group_id = 100             # optional: known id; the host gate matches gid first, then the name
vdc = "vdc-alpha"          # optional VDC holding the group and the clusters below
clusters = [101]
max_gpus = 4               # GPUs held at once by all the tenant's VMs
networks = [12, 13]        # virtual network ids the tenant may attach (NIC and PCI NIC)
vlans = ["100-199"]        # VLAN ids on 802.1Q networks
vnis = ["5000-5099"]       # VXLAN VNIs
ib_pkeys = ["0x8001"]      # InfiniBand partition keys
price_per_gpu_hour = 2.5
templates = [8]            # VM templates the group may instantiate
service_admins = [7]       # user ids: layer 3 (group admin of the tenant)
service_users = [9]        # user ids: layer 2 (automation acting for the tenant)

[[tenant.alpha.devices]]   # a device grant: "H100 on cluster 101"
name = "H100"
vendor = "10de"
device = "2330"
class = "0302"             # optional
clusters = [101]           # optional: only on these clusters
```

An empty or missing grant list grants nothing. Parsing never imports lxml or pyone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aifactory_core.errors import UsageError

MAX_ID = 2**31 - 1
_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_HEX4 = re.compile(r"\A(0x)?[0-9a-fA-F]{1,4}\Z")
_RANGE = re.compile(r"\A\s*(\d{1,9})\s*(?:-\s*(\d{1,9}))?\s*\Z")
VERSIONS = ("6.10", "7.0", "7.2", "7.4")


class PolicyError(UsageError):
    """The policy file is invalid: the message names the key and its line."""

    code = "policy-file"


@dataclass(frozen=True)
class IdRanges:
    """Inclusive integer ranges (VLAN ids, VNIs, pkeys)."""

    ranges: tuple[tuple[int, int], ...] = ()
    written: tuple[tuple[int, int], ...] = field(default=(), compare=False, repr=False)
    """pkeys only: each range as the policy wrote it (membership bit kept), shown in hex."""

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and any(low <= value <= high for low, high in self.ranges)

    def __str__(self) -> str:
        if self.written:
            return ",".join(f"{low:#06x}" if low == high else f"{low:#06x}-{high:#06x}" for low, high in self.written)
        return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in self.ranges) or "none"


@dataclass(frozen=True)
class DeviceGrant:
    """One kind of passthrough device a tenant may use, optionally only on some clusters."""

    name: str
    vendor: int
    device: int | None
    device_class: int | None
    clusters: frozenset[int] | None  # None: any cluster

    def matches(self, vendor: int | None, device: int | None, device_class: int | None) -> bool:
        if vendor != self.vendor:
            return False
        if self.device is not None and device != self.device:
            return False
        return self.device_class is None or device_class == self.device_class


@dataclass(frozen=True)
class Tenant:
    key: str
    group: str
    group_id: int | None
    vdc: str | None
    clusters: tuple[int, ...]
    max_gpus: int
    devices: tuple[DeviceGrant, ...]
    networks: frozenset[int]
    vlans: IdRanges
    vnis: IdRanges
    ib_pkeys: IdRanges
    price_per_gpu_hour: float
    templates: tuple[int, ...]
    service_admins: tuple[int, ...]
    service_users: tuple[int, ...]


@dataclass(frozen=True)
class Policy:
    version: str
    zone: int
    infrastructure_admin_groups: frozenset[str]
    infrastructure_admin_gids: frozenset[int]
    tenants: Mapping[str, Tenant]
    by_gid: Mapping[int, Tenant] = field(default_factory=dict, repr=False)
    by_group: Mapping[str, Tenant] = field(default_factory=dict, repr=False)

    def tenant_for(self, gid: int | None, gname: str | None) -> Tenant | None:
        if gid is not None and gid in self.by_gid:
            return self.by_gid[gid]
        if gname is not None:
            return self.by_group.get(gname)
        return None

    def is_infrastructure_admin(self, gid: int | None, gname: str | None) -> bool:
        return (gid is not None and gid in self.infrastructure_admin_gids) or (
            gname is not None and gname in self.infrastructure_admin_groups
        )


# --------------------------------------------------------------------------------------------
# Locating keys in the source text (tomllib reports no positions for valid documents).


class _Lines:
    _HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?")

    def __init__(self, text: str) -> None:
        self.sections: list[tuple[str, int, int]] = [("", 0, 0)]  # (table, occurrence, line)
        self.keys: list[list[tuple[str, int]]] = [[]]
        counts: dict[str, int] = {}
        for number, line in enumerate(text.splitlines(), 1):
            found = self._HEADER.match(line)
            if found:
                name = re.sub(r"\s*\.\s*", ".", found.group(2)).replace('"', "")
                occurrence = counts.get(name, 0)
                counts[name] = occurrence + 1
                self.sections.append((name, occurrence, number))
                self.keys.append([])
                continue
            key = re.match(r'^\s*"?([A-Za-z0-9_.-]+)"?\s*=', line)
            if key:
                self.keys[-1].append((key.group(1), number))

    def find(self, path: Sequence[str | int]) -> int | None:
        """1-based line of the key at ``path`` (ints index arrays of tables and arrays)."""
        for cut in range(len(path), -1, -1):
            prefix, rest = path[:cut], [part for part in path[cut:] if isinstance(part, str)]
            if prefix and isinstance(prefix[-1], int):
                name, occurrence = ".".join(str(p) for p in prefix[:-1] if isinstance(p, str)), prefix[-1]
            else:
                if any(isinstance(part, int) for part in prefix):
                    continue
                name, occurrence = ".".join(str(p) for p in prefix), 0
            for index, (table, seen, line) in enumerate(self.sections):
                if table != name or seen != occurrence:
                    continue
                if not rest:
                    return line or None
                for key, key_line in self.keys[index]:
                    if key == rest[0] or key == ".".join(rest):
                        return key_line
        return None


class _Reader:
    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source

    def fail(self, path: Sequence[str | int], message: str) -> PolicyError:
        dotted = ".".join(f"[{part}]" if isinstance(part, int) else part for part in path).replace(".[", "[")
        line = _Lines(self.text).find(path)  # located only when there is an error to report
        where = f"{self.source}:{line}" if line else self.source
        return PolicyError(f"{where}: {dotted}: {message}")

    def table(
        self, value: Any, path: Sequence[str | int], allowed: set[str], required: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, "must be a table")
        for key in value:
            if key not in allowed:
                raise self.fail([*path, key], f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for key in sorted(required):
            if key not in value:
                raise self.fail(path, f"missing required key {key!r}")
        return value

    def integer(self, value: Any, path: Sequence[str | int], low: int = 0, high: int = MAX_ID) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be an integer, not {type(value).__name__}")
        if not low <= value <= high:
            raise self.fail(path, f"{value} is outside {low}..{high}")
        return value

    def ints(self, value: Any, path: Sequence[str | int]) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise self.fail(path, "must be an array of integers")
        result = tuple(self.integer(item, [*path, index]) for index, item in enumerate(value))
        if len(set(result)) != len(result):
            raise self.fail(path, "lists an id twice")
        return result

    def name(self, value: Any, path: Sequence[str | int]) -> str:
        if not isinstance(value, str) or not _NAME.match(value):
            raise self.fail(path, "must be a name of letters, digits, '.', '_' or '-' (at most 128)")
        return value

    def hex4(self, value: Any, path: Sequence[str | int]) -> int:
        if not isinstance(value, str) or not _HEX4.match(value):
            raise self.fail(path, f"must be a hex id string such as \"10de\", not {value!r}")
        return int(value, 16)

    def ranges(self, value: Any, path: Sequence[str | int], high: int) -> IdRanges:
        if not isinstance(value, list):
            raise self.fail(path, 'must be an array of ids or "LOW-HIGH" ranges')
        result = []
        for index, item in enumerate(value):
            where = [*path, index]
            if isinstance(item, int) and not isinstance(item, bool):
                low = up = self.integer(item, where, 0, high)
            elif isinstance(item, str):
                text = item.strip()
                if text.lower().startswith("0x"):
                    parts = text.split("-")
                    try:
                        low, up = int(parts[0], 16), int(parts[-1], 16)
                    except ValueError:
                        raise self.fail(where, f"{item!r} is not a hex id or range") from None
                    if len(parts) > 2:
                        raise self.fail(where, f"{item!r} is not a range")
                else:
                    found = _RANGE.match(text)
                    if not found:
                        raise self.fail(where, f"{item!r} is not an id or a LOW-HIGH range")
                    low = int(found.group(1))
                    up = int(found.group(2) or low)
                if not 0 <= low <= up <= high:
                    raise self.fail(where, f"{item!r}: expected LOW <= HIGH within 0..{high}")
            else:
                raise self.fail(where, "must be an integer or a string range")
            result.append((low, up))
        return IdRanges(tuple(sorted(result)))


_TENANT_KEYS = {
    "group", "group_id", "vdc", "clusters", "max_gpus", "devices", "networks", "vlans", "vnis", "ib_pkeys",
    "price_per_gpu_hour", "templates", "service_admins", "service_users",
}  # fmt: skip
_DEVICE_KEYS = {"name", "vendor", "device", "class", "clusters"}


def _device(reader: _Reader, value: Any, path: list[str | int], tenant_clusters: tuple[int, ...]) -> DeviceGrant:
    table = reader.table(value, path, _DEVICE_KEYS, frozenset({"name", "vendor"}))
    clusters = None
    if "clusters" in table:
        ids = reader.ints(table["clusters"], [*path, "clusters"])
        stray = [item for item in ids if tenant_clusters and item not in tenant_clusters]
        if stray:
            raise reader.fail([*path, "clusters"], f"cluster {stray[0]} is not among the tenant's clusters")
        clusters = frozenset(ids)
    return DeviceGrant(
        name=reader.name(table["name"], [*path, "name"]),
        vendor=reader.hex4(table["vendor"], [*path, "vendor"]),
        device=None if "device" not in table else reader.hex4(table["device"], [*path, "device"]),
        device_class=None if "class" not in table else reader.hex4(table["class"], [*path, "class"]),
        clusters=clusters,
    )


def _pkeys(reader: _Reader, value: Any, path: list[str | int]) -> IdRanges:
    """Partition keys: 15-bit identity; the top (full-membership) bit is dropped."""
    ranges = reader.ranges(value, path, 0xFFFF)
    result = []
    for index, (low, high) in enumerate(ranges.ranges):
        if (low & 0x8000) != (high & 0x8000):
            raise reader.fail([*path, index], "a pkey range may not cross the membership bit 0x8000")
        result.append(((low & 0x7FFF, high & 0x7FFF), (low, high)))
    result.sort()
    return IdRanges(tuple(masked for masked, _ in result), written=tuple(written for _, written in result))


def _tenant(reader: _Reader, key: str, value: Any) -> Tenant:
    path: list[str | int] = ["tenant", key]
    table = reader.table(value, path, _TENANT_KEYS, frozenset({"group", "max_gpus"}))
    clusters = reader.ints(table.get("clusters", []), [*path, "clusters"])
    devices_raw = table.get("devices", [])
    if not isinstance(devices_raw, list):
        raise reader.fail([*path, "devices"], "must be an array of tables ([[tenant.NAME.devices]])")
    price = table.get("price_per_gpu_hour", 0.0)
    if isinstance(price, bool) or not isinstance(price, (int, float)) or not 0 <= price < 1e6:
        raise reader.fail([*path, "price_per_gpu_hour"], "must be a number in 0..1000000")
    vdc = table.get("vdc")
    return Tenant(
        key=key,
        group=reader.name(table["group"], [*path, "group"]),
        group_id=None if "group_id" not in table else reader.integer(table["group_id"], [*path, "group_id"]),
        vdc=None if vdc is None else reader.name(vdc, [*path, "vdc"]),
        clusters=clusters,
        max_gpus=reader.integer(table["max_gpus"], [*path, "max_gpus"], 0, 1_000_000),
        devices=tuple(
            _device(reader, item, [*path, "devices", index], clusters) for index, item in enumerate(devices_raw)
        ),
        networks=frozenset(reader.ints(table.get("networks", []), [*path, "networks"])),
        vlans=reader.ranges(table.get("vlans", []), [*path, "vlans"], 4094),
        vnis=reader.ranges(table.get("vnis", []), [*path, "vnis"], 2**24 - 1),
        ib_pkeys=_pkeys(reader, table.get("ib_pkeys", []), [*path, "ib_pkeys"]),
        price_per_gpu_hour=float(price),
        templates=reader.ints(table.get("templates", []), [*path, "templates"]),
        service_admins=reader.ints(table.get("service_admins", []), [*path, "service_admins"]),
        service_users=reader.ints(table.get("service_users", []), [*path, "service_users"]),
    )


def _check_disjoint(reader: _Reader, tenants: Mapping[str, Tenant]) -> None:
    """Two tenants may not share a group, a VLAN, a VNI or a pkey (the fabric isolates them)."""
    seen_groups: dict[str, str] = {}
    seen_gids: dict[int, str] = {}
    for key, tenant in tenants.items():
        if tenant.group in seen_groups:
            raise reader.fail(
                ["tenant", key, "group"], f"group {tenant.group!r} is already tenant {seen_groups[tenant.group]!r}"
            )
        seen_groups[tenant.group] = key
        if tenant.group_id is not None:
            if tenant.group_id in seen_gids:
                raise reader.fail(["tenant", key, "group_id"], f"already tenant {seen_gids[tenant.group_id]!r}")
            seen_gids[tenant.group_id] = key
    for attribute in ("vlans", "vnis", "ib_pkeys"):
        spans = sorted(
            (low, high, key) for key, tenant in tenants.items() for low, high in getattr(tenant, attribute).ranges
        )
        # Sorted by start: a span overlaps another tenant's iff some other tenant's ranges seen so far
        # reach its start. Keep the two highest reaches held by different tenants.
        best: tuple[int, str] = (-1, "")
        second: tuple[int, str] = (-1, "")
        for low, high, key in spans:
            other_high, other = second if best[1] == key else best
            if low <= other_high:
                raise reader.fail(
                    ["tenant", key, attribute],
                    f"{low}-{high} overlaps tenant {other!r} (up to {other_high}): fabric ids isolate tenants",
                )
            if key == best[1]:
                best = max(best, (high, key))
            elif high > best[0]:
                best, second = (high, key), best
            elif high > second[0] or key == second[1]:
                second = max(second, (high, key)) if key == second[1] else (high, key)


def parse_policy(text: str, source: str = "policy") -> Policy:
    """Parse and validate a policy document; :class:`PolicyError` names the key and line."""
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise PolicyError(f"{source}: not valid TOML: {error}") from None
    reader = _Reader(text, source)
    reader.table(data, [], {"opennebula", "tenant"}, frozenset({"tenant"}))
    one = reader.table(data.get("opennebula", {}), ["opennebula"], {"version", "zone", "infrastructure_admin_groups"})
    version = one.get("version", "7.0")
    if version not in VERSIONS:
        raise reader.fail(["opennebula", "version"], f"{version!r}: expected one of {', '.join(VERSIONS)}")
    admins_raw = one.get("infrastructure_admin_groups", ["oneadmin"])
    if not isinstance(admins_raw, list):
        raise reader.fail(["opennebula", "infrastructure_admin_groups"], "must be an array of group names")
    admins = frozenset(
        reader.name(item, ["opennebula", "infrastructure_admin_groups", index]) for index, item in enumerate(admins_raw)
    )
    keys = set(data["tenant"]) if isinstance(data["tenant"], dict) else set()
    tenants_raw = reader.table(data["tenant"], ["tenant"], keys)
    tenants: dict[str, Tenant] = {}
    for key, value in tenants_raw.items():
        reader.name(key, ["tenant", key])
        tenants[key] = _tenant(reader, key, value)
    _check_disjoint(reader, tenants)
    for key, tenant in tenants.items():
        if tenant.group in admins:
            raise reader.fail(["tenant", key, "group"], f"{tenant.group!r} is an infrastructure admin group")
    return Policy(
        version=version,
        zone=reader.integer(one.get("zone", 0), ["opennebula", "zone"]),
        infrastructure_admin_groups=admins,
        infrastructure_admin_gids=frozenset({0}) if "oneadmin" in admins else frozenset(),
        tenants=tenants,
        by_gid={tenant.group_id: tenant for tenant in tenants.values() if tenant.group_id is not None},
        by_group={tenant.group: tenant for tenant in tenants.values()},
    )


def load_policy(path: str) -> Policy:
    try:
        with open(path, "rb") as stream:
            raw = stream.read(8 * 1024 * 1024 + 1)
    except OSError as error:
        raise PolicyError(f"cannot read policy {path}: {error.strerror or error}") from None
    if len(raw) > 8 * 1024 * 1024:
        raise PolicyError(f"{path}: larger than 8 MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not UTF-8") from None
    return parse_policy(text, path)
