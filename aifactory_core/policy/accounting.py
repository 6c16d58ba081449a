"""GPU-seconds per VM and tenant, from the VM documents state hooks receive.

Every state event (RUNNING, POWEROFF, UNDEPLOYED, DONE, FAILURE...) carries the whole VM with all
its ``HISTORY_RECORDS``; each ``HISTORY`` is one stay on a host with ``RSTIME``/``RETIME`` (when
the VM started and stopped *running* there; 0 while still running). The ledger keeps, per VM,
the running intervals keyed by history ``SEQ`` and replaces them with whatever the newest
document says. So a missed event loses nothing (the next document holds the same history) and a
repeated or out-of-order event counts nothing twice (an interval is stored once per SEQ, and a
closed interval is never reopened by an older document).

The ledger is one JSON file, rewritten atomically (temporary file, fsync, rename) under an
exclusive ``flock`` because the hook manager runs hooks concurrently.

:func:`showback_of` derives, from the ledger alone, the totals written back into the VM's
``USER_TEMPLATE`` (:data:`SHOWBACK_ATTRIBUTES`): the GPU-seconds of its *finished* running stays,
so the same ledger always gives the same values however often an event is delivered.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aifactory_core.errors import AifactoryError, DocumentError, UsageError

if TYPE_CHECKING:
    from lxml import etree

    from aifactory_core.policy.schema import Policy

LEDGER_VERSION = 1
_INT = re.compile(r"\A[0-9]{1,12}\Z")


@dataclass(frozen=True)
class Interval:
    seq: int
    start: int
    end: int | None  # None: still running


@dataclass(frozen=True)
class VmUsage:
    vm_id: int
    gid: int | None
    gname: str | None
    gpus: int
    intervals: tuple[Interval, ...]


def _int(element: etree._Element, tag: str, path: str) -> int:
    text = (element.findtext(tag) or "").strip()
    if not _INT.match(text):
        raise DocumentError(f"{path}/{tag} {text[:20]!r}: not a non-negative integer")
    return int(text)


def vm_usage_from_element(root: etree._Element) -> VmUsage:
    """The running intervals and GPU count of a ``<VM>`` document."""
    from aifactory_core.one.vm import vm_from_element

    vm = vm_from_element(root)
    intervals = []
    for index, history in enumerate(root.iterfind("HISTORY_RECORDS/HISTORY")):
        path = f"VM/HISTORY_RECORDS/HISTORY[{index}]"
        start, end = _int(history, "RSTIME", path), _int(history, "RETIME", path)
        if start == 0:
            continue  # never reached RUNNING on that host
        if end and end < start:
            raise DocumentError(f"{path}: RETIME {end} is before RSTIME {start}")
        intervals.append(Interval(_int(history, "SEQ", path), start, end or None))
    return VmUsage(vm.vm_id, vm.gid, vm.gname, len(vm.gpus), tuple(intervals))


class Ledger:
    """The persisted GPU-time ledger (``ledger.json`` under ``directory``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "ledger.json"

    @contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write under an exclusive lock; the write happens only on a clean exit."""
        import fcntl

        from aifactory_core.lifecycle.atomic import write_atomic

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = open(self.directory / ".ledger.lock", "a+b")  # noqa: SIM115 (closed below)
        except OSError as error:
            raise AifactoryError(f"GPU ledger {self.directory}: {error.strerror or error}") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.read()
            before = json.dumps(data, sort_keys=True)
            yield data
            after = json.dumps(data, sort_keys=True)
            if after != before:
                try:
                    write_atomic(self.path, (after + "\n").encode())
                except OSError as error:
                    raise AifactoryError(f"GPU ledger {self.path}: {error.strerror or error}") from None

    def read(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return {"version": LEDGER_VERSION, "vms": {}}
        except (OSError, ValueError) as error:
            raise UsageError(f"GPU ledger {self.path} is unreadable: {error}") from None
        if (not isinstance(data, dict) or data.get("version") != LEDGER_VERSION or not isinstance(data.get("vms"), dict)
                or not all(isinstance(entry, dict) and isinstance(entry.get("intervals"), dict)
                           for entry in data["vms"].values())):
            raise UsageError(f"GPU ledger {self.path} has an unknown format")
        return data

    def record(self, usage: VmUsage) -> dict[str, Any]:
        """Fold ``usage`` in; returns the VM's ledger entry as written."""
        with self.locked() as data:
            merge(data, usage)
            entry: dict[str, Any] = json.loads(json.dumps(data["vms"][str(usage.vm_id)]))
            return entry


def merge(data: dict[str, Any], usage: VmUsage) -> None:
    """Fold one VM document's intervals into the ledger (idempotent, order-insensitive)."""
    entry = data["vms"].setdefault(str(usage.vm_id), {"intervals": {}})
    entry["gid"], entry["gname"] = usage.gid, usage.gname
    entry["gpus"] = usage.gpus  # the VM's passthrough devices (PCI requests that are not NICs)
    for interval in usage.intervals:
        key = str(interval.seq)
        known = entry["intervals"].get(key)
        if known is not None and known[1] is not None and interval.end is None:
            continue  # an older document: never reopen a closed interval
        entry["intervals"][key] = [interval.start, interval.end]


@dataclass(frozen=True)
class UsageLine:
    tenant: str
    vm_id: int
    gpu_seconds: int
    cost: float


def report(data: dict[str, Any], policy: Policy | None, start: int, end: int, now: int) -> list[UsageLine]:
    """GPU-seconds per VM within [start, end) (open intervals run to ``now``), priced per tenant."""
    lines = []
    for vm_key, entry in sorted(data["vms"].items(), key=lambda item: int(item[0])):
        seconds = 0
        for interval_start, interval_end in entry["intervals"].values():
            stop = min(end, interval_end if interval_end is not None else now)
            seconds += max(0, stop - max(start, interval_start))
        gpu_seconds = seconds * int(entry.get("gpus", 0))
        if not gpu_seconds:
            continue
        tenant = None if policy is None else policy.tenant_for(entry.get("gid"), entry.get("gname"))
        name = tenant.key if tenant is not None else f"group:{entry.get('gname') or entry.get('gid')}"
        price = tenant.price_per_gpu_hour if tenant is not None else 0.0
        lines.append(UsageLine(name, int(vm_key), gpu_seconds, round(gpu_seconds / 3600 * price, 4)))
    return lines


SHOWBACK_SECONDS = "AIFACTORY_GPU_SECONDS"
SHOWBACK_HOURS = "AIFACTORY_GPU_HOURS"
SHOWBACK_COST = "AIFACTORY_GPU_COST"
SHOWBACK_ATTRIBUTES = (SHOWBACK_SECONDS, SHOWBACK_HOURS, SHOWBACK_COST)


@dataclass(frozen=True)
class Showback:
    """A VM's GPU time from its finished running stays; ``cost`` None: no price known."""

    vm_id: int
    gpu_seconds: int
    cost: float | None

    def template(self) -> str:
        """The ``one.vm.update`` text (merged into USER_TEMPLATE), formatted as ``aifactory usage --csv``."""
        lines = [f'{SHOWBACK_SECONDS}="{self.gpu_seconds}"', f'{SHOWBACK_HOURS}="{self.gpu_seconds / 3600:.4f}"']
        if self.cost is not None:
            lines.append(f'{SHOWBACK_COST}="{self.cost:.4f}"')
        return "\n".join(lines)


def showback_of(vm_id: int, entry: dict[str, Any], policy: Policy | None) -> Showback | None:
    """The VM's totals over all time from its ledger ``entry``, open stays left out (they are
    counted once they close); None when the VM has no GPUs. Priced as :func:`report` prices."""
    if not int(entry.get("gpus", 0)):
        return None
    closed = {key: value for key, value in entry["intervals"].items() if value[1] is not None}
    single = {"version": LEDGER_VERSION, "vms": {str(vm_id): {**entry, "intervals": closed}}}
    lines = report(single, policy, 0, 2**62, 0)
    seconds = sum(line.gpu_seconds for line in lines)
    if policy is None or policy.tenant_for(entry.get("gid"), entry.get("gname")) is None:
        return Showback(vm_id, seconds, None)
    return Showback(vm_id, seconds, round(sum(line.cost for line in lines), 4))


def totals(lines: Iterable[UsageLine]) -> dict[str, tuple[int, float]]:
    result: dict[str, tuple[int, float]] = {}
    for line in lines:
        seconds, cost = result.get(line.tenant, (0, 0.0))
        result[line.tenant] = (seconds + line.gpu_seconds, round(cost + line.cost, 4))
    return result


def default_directory() -> Path:
    return Path(os.environ.get("AIFACTORY_ACCOUNTING_DIR", "/var/lib/one/aifactory/accounting"))
