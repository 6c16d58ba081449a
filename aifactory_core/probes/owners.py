"""Whose VM holds a device, for the ``vm_id``/``tenant`` labels of ``aifactory metrics``.

The VM comes from the lifecycle engine's ownership records (``snapshot["held"]``); its tenant — the
OpenNebula group that owns the VM — from, in order:

1. the tenancy record the host gate writes when it admits a VM with devices
   (``<state dir>/tenancy/<vm>.json``, the group taken from the deployment file's ``<one:vm>``
   metadata and checked against ``vm.xml``);
2. the deployment file oned wrote for the VM (``<datastores>/<ds>/<vm>/deployment.<n>``, the newest):
   its ``<metadata><one:vm><one:gname>``;
3. the VM document OpenNebula writes beside it (``<datastores>/<ds>/<vm>/vm.xml``): ``GNAME``.

Empty when none names it. Documents are parsed hardened (:mod:`aifactory_core.one.xmlsafe`); a label
decides nothing, so an unreadable or hostile file costs only the label. Not used by the IM probes
(their start-up cannot pay for lxml).
"""

from __future__ import annotations

import json
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from aifactory_core.probes.sysfs import Root

DATASTORES = "/var/lib/one/datastores"
MAX_DOCUMENT = 4 * 1024 * 1024


def _read(path: str, limit: int = MAX_DOCUMENT) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def _recorded(root: Root, vm: int) -> str | None:
    data = _read(os.path.join(root.state_dir, "tenancy", f"{vm}.json"), 4096)
    try:
        record = json.loads(data) if data else None
    except ValueError:
        return None
    if isinstance(record, dict) and record.get("vm") == vm and isinstance(record.get("gname"), str):
        return str(record["gname"])
    return None


def _vm_directories(root: Root, vm: int) -> list[str]:
    base = root.path(DATASTORES)
    try:
        datastores = sorted(name for name in os.listdir(base) if name.isdigit())
    except OSError:
        return []
    return [path for path in (os.path.join(base, name, str(vm)) for name in datastores) if os.path.isdir(path)]


def _from_deployment(directory: str) -> str | None:
    from aifactory_core.domain import load_domain, one_metadata
    from aifactory_core.errors import AifactoryError

    try:
        names = [name for name in os.listdir(directory)
                 if name.startswith("deployment.") and name[len("deployment."):].isdigit()]
    except OSError:
        return None
    for name in sorted(names, key=lambda item: int(item[len("deployment."):]), reverse=True):
        data = _read(os.path.join(directory, name))
        if not data:
            continue
        try:
            metadata = one_metadata(load_domain(data, name))
        except AifactoryError:
            continue
        if metadata is not None and metadata.gname:
            return metadata.gname
    return None


def _from_vm_document(directory: str, vm: int) -> str | None:
    from aifactory_core.errors import AifactoryError
    from aifactory_core.one.vm import parse_vm

    data = _read(os.path.join(directory, "vm.xml"))
    if not data:
        return None
    try:
        document = parse_vm(data, "vm.xml")
    except AifactoryError:
        return None
    return document.gname if document.vm_id == vm and document.gname else None


def tenant_of(root: Root, vm: int) -> str:
    """The group owning ``vm`` (see the module's docstring), or ``""``."""
    found = _recorded(root, vm)
    for directory in [] if found else _vm_directories(root, vm):
        found = _from_deployment(directory) or _from_vm_document(directory, vm)
        if found:
            break
    return found or ""


def tenants(root: Root, vms: Iterable[int]) -> dict[int, str]:
    """``tenant_of`` for each VM."""
    return {vm: tenant_of(root, vm) for vm in sorted(set(vms))}
