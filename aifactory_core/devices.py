"""Asking the plugins what is on the host: the merged device list every command works from."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aifactory_core.model import DiscoveredDevice

if TYPE_CHECKING:
    import pluggy

    from aifactory_core.host.inventory import HostInventory


def discover_devices(manager: pluggy.PluginManager, inventory: HostInventory) -> list[DiscoveredDevice]:
    """Every plugin's devices; a function claimed twice stays with the first plugin in call order."""
    claimed: dict[str, DiscoveredDevice] = {}
    for result in manager.hook.aifactory_discover_devices(inventory=inventory):
        for device in result or ():
            if device.address not in claimed:
                claimed[device.address] = device
    return sorted(claimed.values(), key=lambda device: device.address)
