"""InfiniBand VFs: node/port GUIDs from a cluster-wide pool, pkey membership through the SM.

For a PCI NIC on a VF of an InfiniBand PF (``/sys/class/net/PF/type`` = 32) this plugin returns a
``vf_config`` action (MAC, spoof-check, rate, link state and the VF's node/port GUIDs; undone by a
scrub that also clears the GUIDs) and an ``ib_pkey`` action (the port GUID joins the tenant's
pkey, full or limited member as the grant says; undone by leaving it). The pkey comes from the
NIC's ``IB_PKEY`` (or ``PKEY``) attribute and must be in the tenant's grant.

``[plugin.infiniband]``: ``guid_prefix`` (4 hex digits, unique per cluster on a shared fabric),
``membership`` (``full``/``limited``), ``subnet_manager`` (``opensm``/``ufm``),
``partition_authority`` (argv reaching the fabric's partition authority on the SM's host; empty:
this host is it), and on the SM's host ``partitions_file``, ``opensm_reload`` (argv) and
``management_guids`` (ports kept full members of the default partition); ``ufm_url``,
``ufm_token_file``, ``ufm_username``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from aifactory_core.config import Config, check_plugin_keys
from aifactory_core.errors import UsageError
from aifactory_core.hookspecs import hookimpl
from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot
from aifactory_core.model import Action

AIFACTORY_API_VERSION = 1
NAME = "infiniband"
PKEY_KIND = "ib_pkey"
SETTINGS = {"guid_prefix", "membership", "subnet_manager", "partitions_file", "opensm_reload", "ufm_url",
            "ufm_token_file", "ufm_username", "partition_authority", "management_guids"}
SM_KEYS = SETTINGS - {"guid_prefix", "membership"}
DEFAULT_PREFIX = 0xA1F0
_sm_settings: dict[str, Any] = {}
"""The subnet manager's settings from the configuration: the pkey actions reach the SM only through
these, never through anything a journal holds."""


@hookimpl
def aifactory_configure(config: Config, name: str, section: Mapping[str, Any]) -> None:
    if name != NAME:
        return
    check_plugin_keys(NAME, section, SETTINGS)
    from aifactory_plugins.infiniband.guid import parse_prefix

    parse_prefix(section.get("guid_prefix", DEFAULT_PREFIX))
    configure_subnet_manager(section)


def configure_subnet_manager(section: Mapping[str, Any]) -> None:
    """Take the subnet manager's settings (back-end, partitions file, reload command, UFM URL and
    token file) from ``[plugin.infiniband]``; the pkey actions use nothing else."""
    global _sm_settings
    _sm_settings = {key: value for key, value in section.items() if key in SM_KEYS}


def pkey_action(port_guid: str, pkey: int, membership: str, vm: int) -> Action:
    value = json.dumps({"pkey": pkey, "membership": membership, "vm": vm}, sort_keys=True)
    return Action(PKEY_KIND, port_guid, value, None, f"port GUID {port_guid} joins pkey {pkey:#06x} ({membership})")


def _sm(host: HostRoot, action: Action) -> tuple[Any, str, int, str]:
    """The configured subnet manager, and the action's port GUID, pkey and membership, validated (a
    journal's ``sm``, from before commands and paths left the journals, is never read)."""
    from aifactory_core.errors import UsageError
    from aifactory_plugins.infiniband.partitions import port_guid
    from aifactory_plugins.infiniband.pkey import membership, pkey
    from aifactory_plugins.infiniband.sm import from_settings

    try:
        data = json.loads(action.value)
        port, key, member = port_guid(action.target), pkey(data["pkey"]), membership(data["membership"])
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"malformed {PKEY_KIND} action for {action.target[:24]!r}: {error}") from None
    return from_settings(_sm_settings, host.state_dir), port, key, member


def _pkey_do(host: HostRoot, action: Action, writer: Any) -> None:
    from aifactory_core.host.pcibind import RecordingWriter, SysfsWrite

    if isinstance(writer, RecordingWriter):
        writer.writes.append(SysfsWrite(f"subnet-manager:{action.target}", action.value, action.reason))
        return
    manager, port, key, member = _sm(host, action)
    manager.add_members(key, [port], member)


def _pkey_undo(host: HostRoot, action: Action, writer: Any) -> None:
    from aifactory_core.host.pcibind import RecordingWriter

    if isinstance(writer, RecordingWriter):
        return
    manager, port, key, _member = _sm(host, action)
    manager.remove_members(key, [port])


def register() -> None:
    from aifactory_core.lifecycle.executor import register_executor

    register_executor(PKEY_KIND, _pkey_do, _pkey_undo)


register()


def nic_pkey(attributes: Mapping[str, str]) -> int:
    from aifactory_plugins.infiniband.pkey import pkey

    for name in ("IB_PKEY", "PKEY"):
        if name in attributes:
            return pkey(attributes[name])
    raise UsageError("InfiniBand PCI NIC without IB_PKEY: every VF port must be in a tenant partition")


@hookimpl
def aifactory_network_setup(inventory: HostInventory, request: Any, nic: Any, config: Config,
                            grant: Any) -> Iterable[Action] | None:
    from aifactory_core.host.netlink_vf import guid
    from aifactory_core.vnm import vf
    from aifactory_core.vnm.plan import nic_vf_in_mode, vf_settings
    from aifactory_plugins.infiniband.guid import allocate, format_guid, parse_prefix

    where = nic_vf_in_mode(inventory.host, nic, "infiniband")
    if where is None:
        return None
    settings = config.plugin(NAME)
    prefix = parse_prefix(settings.get("guid_prefix", DEFAULT_PREFIX))
    nic_id = nic.nic_id if nic.nic_id is not None else 0
    node = guid(format_guid(allocate(prefix, request.vm_id, nic_id, "node")))
    port = guid(format_guid(allocate(prefix, request.vm_id, nic_id, "port")))
    key = nic_pkey(nic.attributes)
    member = grant.membership(key)
    wanted = vf_settings(nic, grant, node_guid=node, port_guid=port)
    return [vf.action(where.pf_netdev, where.vf, request.vm_id, wanted, infiniband=True),
            pkey_action(port, key, member, request.vm_id)]
