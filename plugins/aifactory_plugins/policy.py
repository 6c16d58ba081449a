"""Tenant policy on the host: the authoritative admission gate before any device is bound.

``aifactory_admit`` evaluates the tenant policy for the VM the VMM deploy wrapper is about to
start. The wrapper passes what the host has (a :class:`~aifactory_core.model.DeployRequest`: the
deployment file's ``<one:vm>`` owner and ``<hostdev>`` functions, and where ``vm.xml`` is);
:mod:`aifactory_core.policy.hostgate` reads it into the request the frontend decides on, with
every device identified by this host's sysfs, and runs the frontend's own decision on it.

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
    from aifactory_core.one.vm import VmRequest
    from aifactory_core.policy.schema import Policy

AIFACTORY_API_VERSION = 1
NAME = "policy"
DEFAULT_FILE = "/etc/one/aifactory-policy.toml"
_KEYS = {"file", "required", "cluster_id", "on_refusal", "accounting_dir"}
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
    """At deploy (a :class:`~aifactory_core.model.DeployRequest`): the host gate on the deployment
    file, ``vm.xml`` and this host's sysfs; given the frontend's ``VmRequest``: the same decision on it."""
    from aifactory_core.model import DeployRequest
    from aifactory_core.policy.decide import decide

    try:
        policy = policy_for(config)
    except AifactoryError as error:
        return [f"policy rule policy-file: {error.message}"]  # fail closed: no VM without a readable policy
    if policy is None:
        return None
    cluster = _settings(config).get("cluster_id")
    if isinstance(request, DeployRequest):
        from aifactory_core.policy.hostgate import gate

        return [str(refusal) for refusal in gate(policy, request, inventory, cluster).refusals]
    vm: VmRequest = request
    if vm.cluster_id is None and cluster is not None:
        from dataclasses import replace

        vm = replace(vm, cluster_id=cluster)
    return [str(refusal) for refusal in decide(policy, vm).refusals]
