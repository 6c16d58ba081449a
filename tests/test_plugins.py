"""Plugin discovery through the real entry points of the installed distributions."""

import types

import pytest

from aifactory_core import plugins as plugin_loading
from aifactory_core.config import parse_config
from aifactory_core.errors import ConfigError, PluginError

BUILTINS = {"vfio", "nvidia_gpu", "pci_inventory", "numa"}


def _names(config_data: dict) -> list[str]:
    _manager, loaded = plugin_loading.build_manager(parse_config(config_data))
    return [plugin.name for plugin in loaded]


def test_builtins_come_from_entry_points() -> None:
    found = plugin_loading.discover()
    assert BUILTINS <= found.keys()
    assert found["vfio"].value == "aifactory_plugins.vfio"


def test_enable_disable_and_order() -> None:
    assert _names({"plugins": {"enabled": ["vfio", "numa"]}}) == ["vfio", "numa"]
    assert "vfio" not in _names({"plugins": {"disabled": ["vfio"]}})
    assert _names({"plugins": {"enabled": ["vfio", "numa", "nvidia_gpu"], "order": ["nvidia_gpu"]}}) == [
        "nvidia_gpu", "vfio", "numa"]


def test_configured_order_is_call_order() -> None:
    manager, _ = plugin_loading.build_manager(parse_config({"plugins": {"order": ["vfio", "numa"]}}))
    called = [impl.plugin_name for impl in reversed(manager.hook.aifactory_doctor_checks.get_hookimpls())]
    assert called.index("vfio") < called.index("numa")
    manager, _ = plugin_loading.build_manager(parse_config({"plugins": {"order": ["numa", "vfio"]}}))
    called = [impl.plugin_name for impl in reversed(manager.hook.aifactory_doctor_checks.get_hookimpls())]
    assert called.index("numa") < called.index("vfio")


def test_unknown_plugin_name_in_config_is_refused() -> None:
    with pytest.raises(ConfigError, match="plugins.enabled"):
        _names({"plugins": {"enabled": ["vfoi"]}})


def test_plugin_for_a_newer_api_is_refused() -> None:
    module = types.ModuleType("future_plugin")
    module.AIFACTORY_API_VERSION = 99  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match="targets hook API 99"):
        plugin_loading._api_version(module, "future")
    with pytest.raises(PluginError, match="does not declare"):
        plugin_loading._api_version(types.ModuleType("bare"), "bare")


def test_plugin_with_a_misspelt_hook_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    module = types.ModuleType("typo_plugin")
    module.AIFACTORY_API_VERSION = 1  # type: ignore[attr-defined]
    from aifactory_core.hookspecs import hookimpl

    @hookimpl
    def aifactory_discover_device(inventory):  # type: ignore[no-untyped-def]  # misspelt on purpose
        return []

    module.aifactory_discover_device = aifactory_discover_device  # type: ignore[attr-defined]
    import sys

    monkeypatch.setitem(sys.modules, "typo_plugin", module)
    entry = EntryPoint(name="typo", value="typo_plugin", group=plugin_loading.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugin_loading, "discover", lambda: {"typo": entry})
    with pytest.raises(PluginError, match="aifactory_discover_device"):
        plugin_loading.build_manager(parse_config({}))
