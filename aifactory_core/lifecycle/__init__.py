"""The per-VM transaction: journal, per-device ownership, execution with rollback, repair.

Plugins return :class:`~aifactory_core.model.Action` objects from ``aifactory_prepare``; this
package journals each before it is made, makes it, and undoes what was done in reverse when any
step fails. ``release`` undoes a prepared VM's journal; ``repair`` finishes or rolls back a
transaction a crash (kill -9, power loss) interrupted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aifactory_core.hostroot import HostRoot


def held_devices(host: HostRoot) -> dict[str, int]:
    """Every device some VM holds: PCI address -> VM id (for probes and ``device list``)."""
    from aifactory_core.lifecycle.ownership import held_devices as read

    return read(host)


def quarantined(host: HostRoot) -> dict[str, str]:
    """Devices that failed their health check after a reset: PCI address -> reason."""
    from aifactory_core.host.sanitize import quarantined as read

    return read(host)
