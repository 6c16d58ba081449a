"""The embedded-switch mode of a NIC's uplink as sysfs shows it: the one rule by which the probes
report a PF (``AIF_SRIOV/ESWITCH_MODE``) and the network plugins route its VFs
(:func:`aifactory_core.vnm.plan.vf_mode`).

MLNX_OFED's ``compat/devlink/mode`` is the driver's own answer, so it wins wherever it exists, for
both: a VF routed by a guess that disagrees with the driver would go to a plugin that cannot
configure it. Upstream kernels expose the mode only over devlink netlink (pyroute2, far too slow to
load for a probe that runs every minute), so otherwise an uplink with a ``phys_switch_id`` counts as
in switchdev mode.

This module imports nothing: the probes load it on their start-up path.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not loaded at the probes' start-up; mypy reads the name
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Literal

    EswitchMode = Literal["legacy", "switchdev"]

ESWITCH_MODES = ("legacy", "switchdev")


def uplink_mode(read: Callable[[str], str | None], netdev: str) -> EswitchMode:
    """``switchdev`` or ``legacy`` for the uplink ``netdev``.

    ``read`` gives a sysfs file's stripped text by its absolute path, None when it cannot be read
    (``Root.text`` of the probes, ``HostRoot.read_text``). ``netdev`` must already be a plain
    interface name (the kernel's, or one checked with :func:`aifactory_core.validate.ifname`)."""
    compat = (read(f"/sys/class/net/{netdev}/compat/devlink/mode") or "").lower()
    if compat in ESWITCH_MODES:
        switchdev = compat == "switchdev"
    else:
        switchdev = bool(read(f"/sys/class/net/{netdev}/phys_switch_id"))
    return "switchdev" if switchdev else "legacy"
