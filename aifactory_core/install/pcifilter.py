"""The PCI devices OpenNebula's hosts report: ``[frontend] pci_filter`` into ``pci.conf``.

A host's PCI list (what oned schedules ``PCI = [...]`` requests against) is what upstream's
``pci.rb`` probe finds through the ``:filter:`` of ``remotes/etc/im/<type>-probes.d/pci.conf``;
upstream ships ``'0:0'`` (no device). install.sh adds the configured ``vendor:device[:class]``
filters to the ``pci.conf`` of both ``kvm`` and ``qemu`` host types (a ``qemu``-type host reads
its own), keeps every filter the operator put there, and records what it added so that
``--uninstall`` takes exactly that out again (back to ``'0:0'`` when nothing else is left).
``onehost sync`` then carries the file to the hosts.

The files are oneadmin's: they are read without following a link and replaced through a new file
made in their directory (never a name oneadmin could have planted), owned as the original was.
"""

from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path

from aifactory_core.install import conffile, layout
from aifactory_core.install.stage import InstallError, Transaction

HOST_TYPES = ("kvm", "qemu")
RECORD_KEY = "pci_filter"
NO_DEVICES = "0:0"
MAX_BYTES = 1 << 20
_KEY = re.compile(r"^:filter:[ \t]*(?P<value>[^\n#]*?)[ \t]*(?:#[^\n]*)?$", re.MULTILINE)
_ITEM = re.compile(r"^[ \t]+-[ \t]*(?P<value>[^\n#]*?)[ \t]*(?:#[^\n]*)?$")
_FILTER = re.compile(r"^(?:[0-9A-Fa-f]{1,4}|\*)?:(?:[0-9A-Fa-f]{1,4}|\*)?(?::[0-9A-Fa-f]{1,4})?$")


def pci_conf(target: layout.Layout, host_type: str) -> str:
    """The absolute path of ``host_type``'s ``pci.conf`` in the frontend's remotes."""
    return f"{target.remotes}/etc/im/{host_type}-probes.d/pci.conf"


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def parse(text: str) -> tuple[list[str], int, int]:
    """The filters of the ``:filter:`` key and the span of text (start, end) the key takes."""
    found = _KEY.search(text)
    if found is None:
        raise ValueError("no ':filter:' key")
    start, end = found.start(), found.end()
    scalar = _unquote(found.group("value"))
    filters: list[str] = []
    if scalar:
        filters = [item.strip() for item in scalar.split(",") if item.strip()]
    else:  # a block list on the following lines
        rest = text[end:]
        offset = end
        for line in rest.split("\n")[1:]:
            listed = _ITEM.match(line)
            if listed is None:
                break
            filters.append(_unquote(listed.group("value")))
            offset += 1 + len(line)
        end = offset
    for item in filters:
        if not _FILTER.match(item):
            raise ValueError(f"unexpected filter {item[:40]!r}")
    return filters, start, end


def render(text: str, filters: list[str]) -> str:
    """``text`` with its ``:filter:`` key set to ``filters`` (``'0:0'`` when empty)."""
    _old, start, end = parse(text)
    if not filters or filters == [NO_DEVICES]:
        block = f":filter: '{NO_DEVICES}'"
    else:
        block = ":filter:\n" + "\n".join(f"  - '{item}'" for item in filters)
    return text[:start] + block + text[end:]


def _change(tx: Transaction, path: Path, text: str, info: os.stat_result, new: str, what: str) -> None:
    tx.step(f"{what} in {path}", partial(conffile.replace, path, new, info),
            partial(conffile.replace, path, text, info))


def apply(tx: Transaction, target: layout.Layout, wanted: tuple[str, ...], previous: dict[str, list[str]],
          notes: list[str]) -> dict[str, list[str]]:
    """Bring each host type's ``pci.conf`` to hold ``wanted`` (and what the operator has there):
    filters this suite added before and no longer wants are taken out. Returns, per file, the
    filters the suite added, for the install record."""
    added: dict[str, list[str]] = {}
    for host_type in HOST_TYPES:
        absolute = pci_conf(target, host_type)
        path = target.path(absolute)
        found = conffile.read(path, MAX_BYTES)
        ours_before = previous.get(absolute, [])
        if found is None:
            if wanted:
                notes.append(f"{absolute} not found: [frontend] pci_filter not applied to {host_type} hosts")
            continue
        text, info = found
        try:
            current = parse(text)[0]
        except ValueError as error:
            raise InstallError(f"{path}: {error}: cannot apply [frontend] pci_filter") from None
        operators = [item for item in current if item != NO_DEVICES and item not in ours_before]
        ours = [item for item in wanted if item not in operators]
        result = operators + ours
        if ours:
            added[absolute] = ours
        if [item for item in current if item != NO_DEVICES] != result:
            what = f"PCI filter {', '.join(result) or NO_DEVICES!r} for {host_type} hosts"
            _change(tx, path, text, info, render(text, result), what)
    return added


def remove(tx: Transaction, target: layout.Layout, recorded: dict[str, list[str]], notes: list[str]) -> None:
    """Take the filters the record says the suite added out of each ``pci.conf``."""
    for absolute, ours in sorted(recorded.items()):
        path = target.path(absolute)
        found = conffile.read(path, MAX_BYTES)
        if found is None:
            continue
        text, info = found
        try:
            current = parse(text)[0]
        except ValueError as error:
            notes.append(f"kept {absolute}: {error}")
            continue
        left = [item for item in current if item not in ours]
        if left != current:
            _change(tx, path, text, info, render(text, left), f"remove PCI filter {', '.join(ours)}")
