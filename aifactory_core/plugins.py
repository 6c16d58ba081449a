"""Building the plugin manager: entry-point discovery, config enable/disable/order, API check."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import TYPE_CHECKING, Any

from aifactory_core.errors import ConfigError, PluginError

if TYPE_CHECKING:
    import pluggy

    from aifactory_core.config import Config

ENTRY_POINT_GROUP = "aifactory.plugins"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedPlugin:
    name: str
    module: str
    distribution: str | None
    version: str | None
    api_version: int
    hooks: tuple[str, ...]


def discover() -> dict[str, EntryPoint]:
    """Every plugin entry point installed, by name (built-ins and vendors alike)."""
    found: dict[str, EntryPoint] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in found:
            if entry.value != found[entry.name].value:  # the same module seen twice is one plugin
                log.warning("plugin %s is registered twice; keeping %s", entry.name, found[entry.name].value)
            continue
        found[entry.name] = entry
    return found


def _select(available: dict[str, EntryPoint], config: Config) -> list[str]:
    settings = config.plugins
    for key, names in (("enabled", settings.enabled or ()), ("disabled", settings.disabled),
                       ("order", settings.order)):
        for name in names:
            if name not in available:
                raise ConfigError(
                    f"config key 'plugins.{key}' names plugin {name!r}, which is not installed "
                    f"(installed: {', '.join(sorted(available)) or 'none'})"
                )
    chosen = list(settings.enabled) if settings.enabled is not None else sorted(available)
    chosen = [name for name in chosen if name not in settings.disabled]
    ordered = [name for name in settings.order if name in chosen]
    return ordered + [name for name in chosen if name not in ordered]


def _api_version(module: Any, name: str) -> int:
    from aifactory_core.hookspecs import API_VERSION

    version = getattr(module, "AIFACTORY_API_VERSION", None)
    if not isinstance(version, int):
        raise PluginError(f"plugin {name!r} does not declare AIFACTORY_API_VERSION")
    if version > API_VERSION:
        raise PluginError(f"plugin {name!r} targets hook API {version}; this core provides {API_VERSION}")
    return version


def build_manager(config: Config) -> tuple[pluggy.PluginManager, list[LoadedPlugin]]:
    """Load the configured plugins, in order, into a new plugin manager."""
    import pluggy

    from aifactory_core import hookspecs

    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    available = discover()
    names = _select(available, config)
    loaded: list[LoadedPlugin] = []
    modules: list[tuple[str, ModuleType | Any]] = []
    for name in names:
        entry = available[name]
        try:
            module = entry.load()
        except Exception as error:
            raise PluginError(f"plugin {name!r} ({entry.value}) failed to load: {error}") from None
        version = _api_version(module, name)
        dist = entry.dist
        modules.append((name, module))
        loaded.append(LoadedPlugin(name, entry.value, dist.name if dist else None,
                                   dist.version if dist else None, version, ()))
    # pluggy calls the last registered first: register in reverse so the configured order holds.
    for name, module in reversed(modules):
        manager.register(module, name=name)
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as error:
        raise PluginError(str(error)) from None
    result = []
    for plugin in loaded:
        hooks = tuple(sorted(impl.name for impl in manager.get_hookcallers(manager.get_plugin(plugin.name)) or ()))
        result.append(LoadedPlugin(plugin.name, plugin.module, plugin.distribution, plugin.version,
                                   plugin.api_version, hooks))
    _check_declarations(result)
    for name, _module in modules:
        manager.hook.aifactory_configure(config=config, name=name, section=config.plugin(name))
    return manager, result


def _check_declarations(plugins: list[LoadedPlugin]) -> None:
    """Refuse a plugin that declares no deploy hooks (so the VMM wrapper's fast path skips it for a
    VM without devices: :mod:`aifactory_core.vmm_fast`) yet implements one."""
    from aifactory_core.vmm_fast import DEPLOY_HOOKS, NO_DEPLOY_HOOKS_GROUP

    declared = {(entry.name, entry.value) for entry in entry_points(group=NO_DEPLOY_HOOKS_GROUP)}
    for plugin in plugins:
        implemented = sorted(set(plugin.hooks) & set(DEPLOY_HOOKS))
        if (plugin.name, plugin.module) in declared and implemented:
            raise PluginError(f"plugin {plugin.name!r} declares no deploy hooks ({NO_DEPLOY_HOOKS_GROUP}) but "
                              f"implements {', '.join(implemented)}")
