"""The suite's one configuration file (TOML), validated at load with errors naming the bad key.

Location: ``--config FILE``, else ``$AIFACTORY_CONFIG``, else ``/etc/one/aifactory.conf``. A missing
default file means built-in defaults; a missing file that was asked for is an error.

Sections: ``[plugins]`` (which plugins run, in which order), ``[host]`` (host-wide facts the
kernel cannot tell), ``[frontend]`` (what install.sh sets up in OpenNebula), and
``[plugin.NAME]`` tables handed to the plugin called NAME.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aifactory_core.cpulist import parse_cpulist
from aifactory_core.errors import ConfigError, UsageError
from aifactory_core.validate import pci_address

DEFAULT_PATH = "/etc/one/aifactory.conf"
ENV_CONFIG = "AIFACTORY_CONFIG"
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class PluginsConfig:
    enabled: tuple[str, ...] | None = None
    disabled: tuple[str, ...] = ()
    order: tuple[str, ...] = ()


DEFAULT_RESERVED_MEMORY_MIB = 512


@dataclass(frozen=True)
class HostConfig:
    reserved_cpus: frozenset[int] = frozenset()
    host_devices: tuple[str, ...] = ()
    vf_pools: tuple[str, ...] = ()
    """SR-IOV PFs (PCI addresses) whose VFs tenants may be given: the root helper sets and scrubs
    VFs of these PFs only."""
    reserved_memory_mib: int = DEFAULT_RESERVED_MEMORY_MIB
    """Memory of each NUMA node kept for the host (kernel, QEMU's own overhead), never planned for VMs."""


@dataclass(frozen=True)
class FrontendConfig:
    pci_filter: tuple[str, ...] = ()
    """``vendor:device[:class]`` filters (lspci ``-d`` syntax) install.sh adds to OpenNebula's
    ``pci.conf`` for kvm and qemu hosts, so the hosts report those devices in their PCI list."""


@dataclass(frozen=True)
class Config:
    path: str | None = None
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    host: HostConfig = field(default_factory=HostConfig)
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    plugin_sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def plugin(self, name: str) -> Mapping[str, Any]:
        """The ``[plugin.NAME]`` table, empty when absent."""
        return self.plugin_sections.get(name, {})


def _names(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ConfigError(f"config key {key!r} must be a list of plugin names")
    return tuple(value)


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"unknown config key '{where}.{key}' (allowed: {', '.join(sorted(allowed))})")


def _plugins(table: Any) -> PluginsConfig:
    if not isinstance(table, dict):
        raise ConfigError("config key 'plugins' must be a table")
    _check_keys(table, {"enabled", "disabled", "order"}, "plugins")
    enabled = _names(table["enabled"], "plugins.enabled") if "enabled" in table else None
    return PluginsConfig(
        enabled=enabled,
        disabled=_names(table.get("disabled", []), "plugins.disabled"),
        order=_names(table.get("order", []), "plugins.order"),
    )


def _host(table: Any) -> HostConfig:
    if not isinstance(table, dict):
        raise ConfigError("config key 'host' must be a table")
    if "state_dir" in table:
        raise ConfigError("config key 'host.state_dir' is not supported: every process of the suite (the "
                          "wrappers' fast path, the probes, the boot repair, the installer) uses "
                          "/var/lib/one/aifactory; remove the key")
    _check_keys(table, {"reserved_cpus", "host_devices", "vf_pools", "reserved_memory_mib"}, "host")
    reserved = table.get("reserved_cpus", "")
    if not isinstance(reserved, str):
        raise ConfigError("config key 'host.reserved_cpus' must be a CPU list string such as \"0-1,56-57\"")
    try:
        reserved_cpus = parse_cpulist(reserved, "host.reserved_cpus")
    except UsageError as error:
        raise ConfigError(f"config key 'host.reserved_cpus': {error.message}") from None
    host_devices = _pci_addresses(table, "host_devices")
    reserved_memory = table.get("reserved_memory_mib", DEFAULT_RESERVED_MEMORY_MIB)
    if isinstance(reserved_memory, bool) or not isinstance(reserved_memory, int) or not 0 <= reserved_memory < 1 << 30:
        raise ConfigError("config key 'host.reserved_memory_mib' must be a whole number of MiB (0 or more)")
    return HostConfig(reserved_cpus, host_devices, _pci_addresses(table, "vf_pools"), reserved_memory)


_PCI_FILTER = re.compile(r"^(?:[0-9a-f]{4}|\*)?:(?:[0-9a-f]{4}|\*)?(?::[0-9a-f]{4})?$")


def _frontend(table: Any) -> FrontendConfig:
    if not isinstance(table, dict):
        raise ConfigError("config key 'frontend' must be a table")
    _check_keys(table, {"pci_filter"}, "frontend")
    filters = table.get("pci_filter", [])
    if not isinstance(filters, list) or not all(isinstance(item, str) for item in filters):
        raise ConfigError("config key 'frontend.pci_filter' must be a list of \"vendor:device[:class]\" strings")
    for item in filters:
        if not _PCI_FILTER.match(item) or item.strip(":*") == "":
            raise ConfigError(f"config key 'frontend.pci_filter': {item[:40]!r} is not vendor:device[:class] "
                              "(lower-case hex, 4 digits each, vendor or device may be *)")
    return FrontendConfig(tuple(dict.fromkeys(filters)))


def _pci_addresses(table: Mapping[str, Any], key: str) -> tuple[str, ...]:
    addresses = table.get(key, [])
    if not isinstance(addresses, list):
        raise ConfigError(f"config key 'host.{key}' must be a list of PCI addresses")
    try:
        return tuple(pci_address(item) for item in addresses)
    except UsageError as error:
        raise ConfigError(f"config key 'host.{key}': {error.message}") from None


def parse_config(data: Mapping[str, Any], path: str | None = None) -> Config:
    _check_keys(data, {"plugins", "host", "frontend", "plugin"}, "")
    sections = data.get("plugin", {})
    if not isinstance(sections, dict) or not all(isinstance(value, dict) for value in sections.values()):
        raise ConfigError("config key 'plugin' must hold tables such as [plugin.vfio]")
    return Config(
        path=path,
        plugins=_plugins(data.get("plugins", {})),
        host=_host(data.get("host", {})),
        frontend=_frontend(data.get("frontend", {})),
        plugin_sections=sections,
    )


def load_config(option: str | None = None) -> Config:
    """Load and validate the configuration (see the module docstring for where it comes from)."""
    explicit = option or os.environ.get(ENV_CONFIG)
    path = Path(explicit or DEFAULT_PATH)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {str(path)!r} not found") from None
        return Config()
    except OSError as error:
        raise ConfigError(f"config file {str(path)!r} unreadable: {error.strerror}") from None
    return parse_config_bytes(raw, str(path))


def parse_config_bytes(raw: bytes, path: str) -> Config:
    """The validated configuration in ``raw``, the content of the file ``path``."""
    import tomllib

    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path!r} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path!r}: {error}") from None
    return parse_config(data, path)


def check_plugin_keys(plugin: str, section: Mapping[str, Any], allowed: set[str] | frozenset[str]) -> None:
    """Refuse a ``[plugin.NAME]`` key the plugin does not know, naming it and what is allowed."""
    for key in sorted(section):
        if key not in allowed:
            raise ConfigError(f"unknown config key 'plugin.{plugin}.{key}' (allowed: {', '.join(sorted(allowed))})")
