"""What each tenant holds on this host, for the host gate's GPU cap.

Two records of the suite's own: :mod:`aifactory_core.lifecycle.ownership` says which VM holds
which PCI function (claimed at deploy, given back at release), and the tenancy record the host gate
writes for each VM it admits with devices (``<state dir>/tenancy/<vm>.json``: the VM's group id
and name) says whose VM that is. A VM deployed before tenancy records existed is attributed through
the ``vm.xml`` in its directory beside the deploying VM's (``<system datastore>/<vm>/vm.xml``);
a VM neither names is nobody's (its devices count for no tenant).

A held device counts as a GPU unless the host's sysfs says it is a network function (PCI base class
0x02), the same rule :func:`aifactory_core.policy.decide.gpu_count` applies to a request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from aifactory_core.lifecycle import ownership
from aifactory_core.lifecycle.atomic import write_atomic

if TYPE_CHECKING:
    from aifactory_core.hostroot import HostRoot
    from aifactory_core.policy.decide import Usage
    from aifactory_core.policy.schema import Policy

Owner = tuple["int | None", "str | None"]  # group id, group name
MAX_RECORD = 4096


def tenancy_dir(host: HostRoot) -> Path:
    return host.state_dir / "tenancy"


def record_tenancy(host: HostRoot, vm: int, gid: int | None, gname: str | None) -> None:
    """Remember whose VM ``vm`` is for as long as it holds devices on this host."""
    data = json.dumps({"vm": vm, "gid": gid, "gname": gname}, sort_keys=True).encode()
    write_atomic(tenancy_dir(host) / f"{int(vm)}.json", data)


def _recorded_owner(host: HostRoot, vm: int) -> Owner | None:
    try:
        with open(tenancy_dir(host) / f"{int(vm)}.json", "rb") as stream:
            data = json.loads(stream.read(MAX_RECORD))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("vm") != vm:
        return None
    gid, gname = data.get("gid"), data.get("gname")
    return (gid if isinstance(gid, int) else None, gname if isinstance(gname, str) else None)


def _documented_owner(documents: Path | None, vm: int) -> Owner | None:
    """The owner in ``documents/<vm>/vm.xml`` (the VM directories of one system datastore)."""
    from aifactory_core.errors import AifactoryError
    from aifactory_core.one.vm import parse_vm

    if documents is None:
        return None
    path = documents / str(vm) / "vm.xml"
    try:
        document = parse_vm(path.read_bytes(), str(path))
    except (OSError, AifactoryError):
        return None
    return (document.gid, document.gname) if document.vm_id == vm else None


def usage_of(held: Mapping[str, int], owner_of: Callable[[int], Owner | None], policy: Policy,
             is_gpu: Callable[[str], bool]) -> Usage:
    """The GPUs each tenant's VMs hold: ``held`` (PCI address -> VM), each VM's owner, the policy."""
    from aifactory_core.policy.decide import Usage

    counts: dict[int, int] = {}
    for address, vm in held.items():
        if is_gpu(address):
            counts[vm] = counts.get(vm, 0) + 1
    usage = Usage()
    for vm, gpus in counts.items():
        owner = owner_of(vm)
        tenant = None if owner is None else policy.tenant_for(*owner)
        if tenant is not None:
            usage.set(vm, tenant.key, gpus)
    return usage


def held_usage(host: HostRoot, policy: Policy, is_gpu: Callable[[str], bool],
               documents: Path | None = None) -> Usage:
    """The GPUs each tenant's VMs hold on this host now (vm id -> tenant, count)."""
    return usage_of(ownership.held_devices(host), lambda vm: _recorded_owner(host, vm) or _documented_owner(
        documents, vm), policy, is_gpu)


def forget_released(host: HostRoot, keep: int) -> None:
    """Drop the tenancy records of VMs that hold nothing any more (``keep``: the VM being decided)."""
    holders = set(ownership.held_devices(host).values()) | {keep}
    try:
        names = [path for path in tenancy_dir(host).iterdir() if path.suffix == ".json"]
    except FileNotFoundError:
        return
    for path in names:
        if path.stem.isdigit() and int(path.stem) not in holders:
            path.unlink(missing_ok=True)
