"""The ``vf_config`` action kind: set a VF's tenant settings before it is bound to vfio-pci.

Target ``PF_NETDEV/VF`` (``ens1f0np0/3``); value: JSON ``{"vm": ID, "settings": {...}}``;
undo_value ``clean`` or ``clean-ib``. ``do`` takes the VF's owner token (a VF owned by another VM
is refused, so a release and an acquire cannot race on it), sets everything in one netlink request
and reads it back; ``undo`` scrubs the VF to the clean state, verifies it, and gives the token back.
``undo`` is idempotent: a VF whose PF or pool is gone has nothing left to leak.

Registered with :func:`aifactory_core.lifecycle.executor.register_executor` on import
(:func:`register`).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aifactory_core.errors import HostError, UsageError
from aifactory_core.host import netlink_vf
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle.atomic import names, open_lock, read_text, remove, write_atomic
from aifactory_core.model import Action
from aifactory_core.validate import ifname, int_in_range, vm_id

KIND = "vf_config"
MAX_VF = 4095
_netlink_lock = threading.Lock()
_netlink: Any = None


def target(pf_netdev: str, vf: int) -> str:
    return f"{ifname(pf_netdev)}/{int_in_range(vf, 0, MAX_VF, 'VF index')}"


def parse_target(text: str) -> tuple[str, int]:
    pf, _, vf = text.rpartition("/")
    return ifname(pf), int_in_range(vf, 0, MAX_VF, "VF index")


def action(pf_netdev: str, vf: int, vm: int, wanted: netlink_vf.VfSettings, *, infiniband: bool = False) -> Action:
    value = json.dumps({"vm": vm_id(vm), "settings": asdict(wanted)}, sort_keys=True)
    return Action(KIND, target(pf_netdev, vf), value, "clean-ib" if infiniband else "clean",
                  f"VF {vf} of {pf_netdev}: MAC {wanted.mac} VLAN {wanted.vlan} for VM {vm}")


def decode(action_: Action) -> tuple[str, int, int, netlink_vf.VfSettings]:
    pf, vf = parse_target(action_.target)
    try:
        data = json.loads(action_.value)
        wanted = netlink_vf.settings(**data["settings"])
        owner = vm_id(data["vm"])
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"malformed {KIND} action for {action_.target}: {error}") from None
    return pf, vf, owner, wanted


def _connection() -> Any:
    """One netlink socket per process, shared (under :data:`_netlink_lock`) by every action."""
    global _netlink
    if _netlink is None:
        _netlink = netlink_vf.open_netlink()
    return _netlink


def pool_size(host: HostRoot, pf: str) -> int | None:
    """The PF's current VF count from sysfs (cheaper than decoding a full VF dump)."""
    text = host.read_text(f"/sys/class/net/{pf}/device/sriov_numvfs")
    return int(text) if text and text.isdigit() else None


def ifindex(host: HostRoot, pf: str) -> int | None:
    text = host.read_text(f"/sys/class/net/{pf}/ifindex")
    return int(text) if text and text.isdigit() else None


# ---- owner tokens -------------------------------------------------------------------------------

def _token_path(host: HostRoot, pf: str, vf: int) -> Path:
    return host.state_dir / "vf-owners" / f"{ifname(pf)}.{vf}"


@contextmanager
def _token_lock(host: HostRoot, pf: str, vf: int) -> Iterator[Path]:
    path = _token_path(host, pf, vf)
    fd = open_lock(path.with_suffix(path.suffix + ".lock"))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)


def owner(host: HostRoot, pf: str, vf: int) -> int | None:
    text = read_text(_token_path(host, pf, vf))
    return int(text) if text is not None and text.isdigit() else None


def vf_owners(host: HostRoot) -> dict[str, int]:
    """Every VF some VM holds: ``PF/VF`` -> VM id."""
    directory = host.state_dir / "vf-owners"
    held = {}
    for name in names(directory):
        text = None if name.endswith(".lock") or name.startswith(".") else read_text(directory / name)
        if text is not None and text.isdigit():
            pf, _, vf = name.rpartition(".")
            held[f"{pf}/{vf}"] = int(text)
    return held


def vf_owners_indices(host: HostRoot, pf: str) -> set[int]:
    """The VF indices of ``pf`` some VM holds (for pool resizing)."""
    prefix = f"{ifname(pf)}/"
    return {int(key[len(prefix):]) for key in vf_owners(host) if key.startswith(prefix)}


# ---- executor -----------------------------------------------------------------------------------

def _unprivileged(host: HostRoot) -> bool:
    """Setting a VF needs CAP_NET_ADMIN (reading it back does not)."""
    from aifactory_core.roothelper import needed

    return needed(host)


def _judge(host: HostRoot, pf: str, vf: int) -> None:
    """A VF change made here, not through the root helper, passes the helper's rule for the VF's
    own function (the pools bound what oneadmin may ask of root; root's own changes are its own)."""
    from aifactory_core.host.hostuse import check_vf_function
    from aifactory_core.rootconfig import load_root_config

    check_vf_function(host, pf, vf, load_root_config().host.host_devices)


def _through_root_helper(verb: str, pf: str, vf: int, *rest: str) -> None:
    from aifactory_core.roothelper import run_privileged

    run_privileged(verb, pf, str(vf), *rest)


def do(host: HostRoot, action_: Action, writer: Any) -> None:
    pf, vf, vm, wanted = decode(action_)
    from aifactory_core.host.pcibind import RecordingWriter, SysfsWrite

    if isinstance(writer, RecordingWriter):
        writer.writes.append(SysfsWrite(f"netlink:{action_.target}", json.dumps(asdict(wanted)), action_.reason))
        return
    index = ifindex(host, pf)
    if index is None:
        raise HostError(f"no interface {pf}")
    with _token_lock(host, pf, vf) as token:
        holder = owner(host, pf, vf)
        if holder is not None and holder != vm:
            from aifactory_core.lifecycle.ownership import DeviceHeld

            raise DeviceHeld(f"VF {vf} of {pf} is held by VM {holder}", holder)
        write_atomic(token, f"{vm}\n".encode())
        with _netlink_lock:
            ipr = _connection()
            if _unprivileged(host):
                from aifactory_core.roothelper import vf_arguments

                _through_root_helper("vf-set", pf, vf, *vf_arguments(wanted))
            else:
                _judge(host, pf, vf)
                netlink_vf.apply(ipr, index, vf, wanted, pool_size=pool_size(host, pf))
            netlink_vf.verify(ipr, index, vf, wanted)


def _owner_of_action(action_: Action) -> int | None:
    """The VM an action was made for (``None`` when its value is unreadable: scrub regardless)."""
    try:
        return vm_id(json.loads(action_.value)["vm"])
    except (ValueError, KeyError, TypeError, UsageError):
        return None


SCRUBS = ("clean", "clean-ib")


def undo(host: HostRoot, action_: Action, writer: Any) -> None:
    pf, vf = parse_target(action_.target)
    scrub_kind = action_.undo_value or "clean"
    if scrub_kind not in SCRUBS:
        raise UsageError(f"malformed {KIND} action for {action_.target}: undo {scrub_kind[:20]!r}")
    vm = _owner_of_action(action_)
    from aifactory_core.host.pcibind import RecordingWriter, SysfsWrite

    if isinstance(writer, RecordingWriter):
        writer.writes.append(SysfsWrite(f"netlink:{action_.target}", action_.undo_value or "clean", "scrub"))
        return
    with _token_lock(host, pf, vf) as token:
        holder = owner(host, pf, vf)
        if holder is not None and vm is not None and holder != vm:
            return  # another VM holds it now: this VM's settings are long gone
        index = ifindex(host, pf)
        if index is not None:
            with _netlink_lock:
                ipr = _connection()
                size = pool_size(host, pf)
                infiniband = scrub_kind == "clean-ib"
                if size is not None and vf >= size:
                    pass  # the pool shrank past this VF: nothing left to scrub
                elif _unprivileged(host):
                    _through_root_helper("vf-scrub", pf, vf, "ib" if infiniband else "eth")
                    netlink_vf.verify(ipr, index, vf, netlink_vf.CLEAN_IB if infiniband else netlink_vf.CLEAN)
                else:
                    _judge(host, pf, vf)
                    netlink_vf.scrub(ipr, index, vf, infiniband=infiniband, pool_size=size)
        remove(token)


def register() -> None:
    from aifactory_core.lifecycle.executor import register_executor

    register_executor(KIND, do, undo, parallel=True)


register()
