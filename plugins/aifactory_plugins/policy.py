"""Tenant policy on the host: the authoritative admission gate before any device is bound.

``aifactory_admit`` evaluates the tenant policy for the VM the VMM deploy wrapper is about to
start (the VmRequest read from OpenNebula's VM document: owner, PCI devices, NICs, cluster).
:func:`admit_domain` does the same from what the host has at hand in the deployment file: the
owner in ``<metadata><one:vm>`` and the ``<hostdev>`` functions, identified by the host's own
sysfs (the inventory) rather than by anything in the document.

Configuration ``[plugin.policy]``: ``file`` (default ``/etc/one/aifactory-policy.toml``),
``required`` (default: true when ``file`` is set — a missing or invalid policy then refuses every
VM; false: no policy file means no tenant policy on this host), ``cluster_id`` (this host's
OpenNebula cluster, for grants limited to clusters), ``on_refusal`` and ``accounting_dir``
(used by the frontend hooks).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from aifactory_core.config import Config, check_plugin_keys
from aifactory_core.errors import AifactoryError, ConfigError
from aifactory_core.hookspecs import hookimpl
from aifactory_core.host.inventory import HostInventory

if TYPE_CHECKING:
    from lxml import etree

    from aifactory_core.one.vm import VmRequest
    from aifactory_core.policy.schema import Policy

AIFACTORY_API_VERSION = 1
NAME = "policy"
DEFAULT_FILE = "/etc/one/aifactory-policy.toml"
_KEYS = {"file", "required", "cluster_id", "on_refusal", "accounting_dir"}
_NETWORK_CLASS = 0x02  # PCI base class "network controller" (Ethernet, InfiniBand)
_cache: dict[tuple[str, int, int], Policy] = {}


def _settings(config: Config) -> Mapping[str, Any]:
    return config.plugin(NAME)


@hookimpl
def aifactory_configure(config: Config, name: str, section: Mapping[str, Any]) -> None:
    if name != NAME:
        return
    check_plugin_keys(NAME, section, _KEYS)
    if "file" in section and not isinstance(section["file"], str):
        raise ConfigError("[plugin.policy] file: must be a path string")
    if "required" in section and not isinstance(section["required"], bool):
        raise ConfigError("[plugin.policy] required: must be true or false")
    cluster = section.get("cluster_id")
    if cluster is not None and (isinstance(cluster, bool) or not isinstance(cluster, int) or cluster < 0):
        raise ConfigError("[plugin.policy] cluster_id: must be a non-negative integer")
    if section.get("on_refusal", "hold") not in ("hold", "terminate"):
        raise ConfigError("[plugin.policy] on_refusal: expected \"hold\" or \"terminate\"")


def load_cached(path: str) -> Policy:
    """The policy at ``path``, re-read when the file changes (size or mtime)."""
    from aifactory_core.policy.schema import load_policy

    try:
        stat = os.stat(path)
        key = (path, stat.st_mtime_ns, stat.st_size)
    except OSError:
        return load_policy(path)  # raises the readable error
    if key not in _cache:
        _cache.clear()
        _cache[key] = load_policy(path)
    return _cache[key]


def policy_for(config: Config) -> Policy | None:
    """The configured policy; None when this host has no tenant policy. Raises when required."""
    settings = _settings(config)
    path = str(settings.get("file", DEFAULT_FILE))
    required = bool(settings.get("required", "file" in settings))
    if not required and not os.path.exists(path):
        return None
    return load_cached(path)


@hookimpl
def aifactory_admit(inventory: HostInventory, request: Any, config: Config) -> Iterable[str] | None:
    from aifactory_core.policy.decide import decide

    try:
        policy = policy_for(config)
    except AifactoryError as error:
        return [f"policy rule policy-file: {error.message}"]  # fail closed: no VM without a readable policy
    if policy is None:
        return None
    cluster = _settings(config).get("cluster_id")
    vm: VmRequest = request
    if vm.cluster_id is None and cluster is not None:
        from dataclasses import replace

        vm = replace(vm, cluster_id=cluster)
    return [str(refusal) for refusal in decide(policy, vm).refusals]


def admit_domain(
    domain_root: etree._Element, policy: Policy, inventory: HostInventory | None = None,
    cluster_id: int | None = None,
) -> list[str]:  # fmt: skip
    """Refusal reasons for the deployment file's VM (empty: admitted).

    Owner: ``<one:vm>`` uid/gid/gname. Devices: each PCI ``<hostdev>``, identified by the host's
    sysfs through ``inventory`` (a function the host does not have is refused); without an
    inventory, by OpenNebula's ``<one:pci_devices>`` list, which must name as many devices.
    Network functions are checked by the frontend and VNM path (the domain has no network ids);
    here: device grants, clusters and the GPU cap of a single VM.
    """
    from aifactory_core.domain import one_metadata, pci_hostdevs
    from aifactory_core.policy.decide import decide

    hostdevs = [ref for _, ref in pci_hostdevs(domain_root)]
    meta = one_metadata(domain_root)
    if meta is None:
        if not hostdevs:
            return []
        return ["policy rule tenant: the deployment file has no <one:vm> metadata, so the owner is unknown"]
    models: list[tuple[int, int, int]] = []
    if inventory is not None:
        for ref in hostdevs:
            function = inventory.pci.get(ref.address)
            if function is None:
                return [f"policy rule devices: hostdev {ref.address} is not a PCI function of this host"]
            models.append((function.vendor_id, function.device_id, function.class_code >> 8))
    else:
        if len(meta.pci_devices) != len(hostdevs):
            listed = len(meta.pci_devices)
            return [f"policy rule devices: {len(hostdevs)} hostdevs but <one:pci_devices> names {listed}"]
        for item in meta.pci_devices:
            try:
                vendor, device, device_class = (int(part, 16) for part in item.split(":"))
            except ValueError:
                return [f"policy rule devices: <one:pci_devices> entry {item[:30]!r} is not VENDOR:DEVICE:CLASS"]
            models.append((vendor, device, device_class))
    request = _domain_request(meta.uid, meta.gid, meta.gname, cluster_id, models)
    return [str(refusal) for refusal in decide(policy, request).refusals]


def _domain_request(
    uid: int | None, gid: int | None, gname: str | None, cluster_id: int | None, models: list[tuple[int, int, int]]
) -> VmRequest:
    from aifactory_core.one.vm import PciRequest, VmRequest

    pci = tuple(
        PciRequest(
            pci_id=index, type=None, address=None, short_address=None, vendor=vendor, device=device,
            device_class=device_class, numa_node=None, nic_id=None, network=None, network_id=None, vlan_id=None,
            mac=None, phydev=None, vn_mad=None, vm_address=None, vm_bus=None, vm_bus_index=None, uuid=None,
            profile=None, mdev_mode=None,
        )
        for index, (vendor, device, device_class) in enumerate(models)
        if device_class >> 8 != _NETWORK_CLASS
    )  # fmt: skip
    return VmRequest(
        vm_id=-1, name=None, uid=uid, gid=gid, uname=None, gname=gname, state=None, lcm_state=None, deploy_id=None,
        host=None, host_id=None, cluster_id=cluster_id, pci=pci, nics=(), topology=None, numa_nodes=(), vcpu=None,
        cpu=None, memory_mib=None, hugepage_size=None, template_id=None,
    )  # fmt: skip
