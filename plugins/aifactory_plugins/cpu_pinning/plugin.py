"""The ``cpu_pinning`` plugin: plan the VM's placement at deploy and write it into the domain.

Config ``[plugin.cpu_pinning]``: ``conflict`` = ``warn`` | ``refuse`` (oned's allocation against
device locality: never silently moved), ``thread_policy`` = ``prefer`` | ``isolate`` |
``require``, ``emulator_policy`` = ``share`` | ``isolate``, ``plan_unpinned`` = ``with_devices``
| ``all`` | ``none`` (which VMs oned did not pin get a plan of their own), ``record`` = true (write
what the VM holds to ``<state_dir>/pinning/<vmid>.json`` for later plans).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from aifactory_core.errors import ConfigError, DocumentError, HostError
from aifactory_core.hookspecs import hookimpl
from aifactory_core.model import DeployRequest

if TYPE_CHECKING:
    from aifactory_core.config import Config
    from aifactory_core.host.inventory import HostInventory
    from aifactory_plugins.cpu_pinning.held import HeldCpus
    from aifactory_plugins.cpu_pinning.planner import Placement, VmSpec
    from aifactory_plugins.cpu_pinning.spec import Policies
    from aifactory_plugins.cpu_pinning.topology import HostTopology

AIFACTORY_API_VERSION = 1
NAME = "cpu_pinning"
_KEYS = {"conflict", "thread_policy", "emulator_policy", "plan_unpinned", "record"}
UNPINNED_SCOPES = ("with_devices", "all", "none")
log = logging.getLogger("aifactory.cpu_pinning")


def policies_from(section: Mapping[str, Any]) -> Policies:
    """Validate the plugin's config table into :class:`Policies` (errors name the key)."""
    from aifactory_plugins.cpu_pinning.planner import EMULATOR_POLICIES, THREAD_POLICIES
    from aifactory_plugins.cpu_pinning.spec import Policies

    for key in section:
        if key not in _KEYS:
            raise ConfigError(f"unknown config key 'plugin.{NAME}.{key}' (allowed: {', '.join(sorted(_KEYS))})")
    checks = (
        ("conflict", ("warn", "refuse"), "warn"),
        ("thread_policy", THREAD_POLICIES, "prefer"),
        ("emulator_policy", EMULATOR_POLICIES, "share"),
        ("plan_unpinned", UNPINNED_SCOPES, "with_devices"),
    )
    values: dict[str, str] = {}
    for key, allowed, default in checks:
        value = section.get(key, default)
        if value not in allowed:
            raise ConfigError(f"config key 'plugin.{NAME}.{key}' must be one of {', '.join(allowed)}")
        values[key] = value
    if not isinstance(section.get("record", True), bool):
        raise ConfigError(f"config key 'plugin.{NAME}.record' must be true or false")
    return Policies(cast(Any, values["thread_policy"]), cast(Any, values["emulator_policy"]), values["conflict"])


def place_vm(topology: HostTopology, held: HeldCpus, spec: VmSpec, policies: Policies) -> Placement:
    """Plan ``spec`` against what the other VMs hold: a request that can never fit this host is a
    :class:`DocumentError`, one that does not fit now a :class:`HostError`."""
    from aifactory_plugins.cpu_pinning.held import usage_of
    from aifactory_plugins.cpu_pinning.planner import PlanInputError, Unplaced, plan

    try:
        result = plan(topology, usage_of(held, exclude_vm=spec.vm_id), spec, policies.conflict)
    except PlanInputError as error:
        raise DocumentError(str(error)) from None
    if isinstance(result, Unplaced):
        raise HostError(result.reason)
    return result


@hookimpl
def aifactory_configure(config: Config, name: str, section: Mapping[str, Any]) -> None:
    if name == NAME:
        policies_from(section)


@hookimpl
def aifactory_domain_xml(inventory: HostInventory, request: Any, domain: Any, config: Config) -> None:
    """Plan against what the other pinned VMs hold and rewrite the deployment file."""
    if not isinstance(request, DeployRequest):
        return
    from aifactory_core.domain import pci_hostdevs
    from aifactory_plugins.cpu_pinning.domain_rewrite import rewrite_domain
    from aifactory_plugins.cpu_pinning.held import StateFileHeld
    from aifactory_plugins.cpu_pinning.spec import spec_from_domain
    from aifactory_plugins.cpu_pinning.topology import HostTopology

    section = config.plugin(NAME)
    policies = policies_from(section)
    topology = HostTopology.from_inventory(
        inventory, config.host.reserved_cpus, config.host.reserved_memory_mib * 1024
    )
    addresses = [ref.address for _, ref in pci_hostdevs(domain)]
    classes = {address: device.class_code for address, device in inventory.pci.items()}
    spec = spec_from_domain(domain, request.vm_id, addresses, classes, policies)
    scope = section.get("plan_unpinned", "with_devices")
    if not spec.oned_cells and (scope == "none" or (scope == "with_devices" and not spec.devices)):
        return
    held = StateFileHeld(inventory.host)
    result = place_vm(topology, held, spec, policies)
    for note in result.notes:
        log.warning("VM %s: %s", request.vm_id, note)
    for note in rewrite_domain(domain, result):
        log.warning("VM %s: %s", request.vm_id, note)
    if section.get("record", True):
        held.record(result)
