"""The embedded-switch mode of a NIC's uplink as sysfs shows it to an unprivileged reader: the one
rule by which the probes report a PF (``AIF_SRIOV/ESWITCH_MODE``) and the network plugins route its
VFs (:func:`aifactory_core.vnm.plan.vf_mode`), and the one reader of VF representors
(:func:`aifactory_core.host.devlink.representors` builds on :func:`vf_representors`).

1. MLNX_OFED's ``compat/devlink/mode`` is the driver's own answer: it wins wherever it holds a
   mode word.
2. An uplink without a ``phys_switch_id`` is not in switchdev mode.
3. A ``phys_switch_id`` alone proves nothing: upstream mlx5 gives the PF's physical devlink port the
   switch id in legacy mode too (``en/devlink.c``, since 5.12), and so does netdevsim. In switchdev
   mode the driver gives every VF a representor netdev on the same switch (``phys_port_name``
   ``pf<P>vf<V>``); in legacy mode there is none. So: representors of this PF -> switchdev; VFs but
   no representor -> legacy.
4. No VFs and no compat file: only devlink's eswitch-get can tell, and it needs CAP_NET_ADMIN
   (probes and network hooks run as oneadmin) -> ``unknown``; ``aifactory eswitch`` shows it as root.

This module imports nothing: the probes load it for a PF that has VFs and a netdev.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not loaded at the probes' start-up; mypy reads the name
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Literal

    EswitchMode = Literal["legacy", "switchdev", "unknown"]
    Read = Callable[[str], str | None]
    ListDir = Callable[[str], list[str]]

ESWITCH_MODES = ("legacy", "switchdev")


def vf_port(port_name: str) -> tuple[int, int] | None:
    """``(pf, vf)`` of a local VF representor's ``phys_port_name`` ``pf<P>vf<V>``; None for anything
    else: the uplink ``p0``, the host-PF representor ``pf0``, an external controller's VF
    ``c1pf0vf1`` (a host's VF seen from a BlueField's Arm, never the local VF 1), a sub-function."""
    if not port_name.startswith("pf"):
        return None
    pf, separator, vf = port_name[2:].partition("vf")
    if not separator or not (pf.isdigit() and pf.isascii() and vf.isdigit() and vf.isascii()):
        return None
    return int(pf), int(vf)


def uplink_pf(read: Read, netdev: str) -> int | None:
    """The PF number an uplink's VF representors carry (``pf<P>vf<V>``): its PCI function, as mlx5
    numbers them (two PFs of one card share a switch id, each with its own ``pf<P>`` representors);
    None for an uplink that is not a PCI function (netdevsim), whose switch holds one PF. The
    uplink's own ``phys_port_name`` (``p<N>``) is a physical port number, not the PF's."""
    uevent = read(f"/sys/class/net/{netdev}/device/uevent") or ""
    for line in uevent.splitlines():
        if line.startswith("PCI_SLOT_NAME="):
            function = line.rpartition(".")[2]
            return int(function) if function.isdigit() and function.isascii() else None
    return None


def vf_representors(read: Read, listdir: ListDir, netdev: str) -> dict[int, tuple[str, int, str]]:
    """The VF representors on ``netdev``'s switch: VF number -> (representor netdev, PF number,
    switch id); empty when ``netdev`` has no ``phys_switch_id``. ``netdev`` must already be a plain
    interface name (the kernel's, or one checked with :func:`aifactory_core.validate.ifname`)."""
    switch = read(f"/sys/class/net/{netdev}/phys_switch_id")
    if not switch:
        return {}
    pf = uplink_pf(read, netdev)
    found: dict[int, tuple[str, int, str]] = {}
    for name in listdir("/sys/class/net"):
        if read(f"/sys/class/net/{name}/phys_switch_id") != switch:
            continue
        port = vf_port(read(f"/sys/class/net/{name}/phys_port_name") or "")
        if port is not None and (pf is None or port[0] == pf):
            found[port[1]] = (name, port[0], switch)
    return found


def uplink_mode(read: Read, listdir: ListDir, netdev: str) -> EswitchMode:
    """``switchdev``, ``legacy`` or ``unknown`` for the uplink ``netdev``, by the rule above.

    ``read`` gives a sysfs file's stripped text by its absolute path, None when it cannot be read
    (``Root.text`` of the probes, ``HostRoot.read_text``); ``listdir`` a directory's entries."""
    compat = (read(f"/sys/class/net/{netdev}/compat/devlink/mode") or "").lower()
    if compat == "switchdev":
        return "switchdev"
    if compat == "legacy":
        return "legacy"
    if not read(f"/sys/class/net/{netdev}/phys_switch_id"):
        return "legacy"
    if vf_representors(read, listdir, netdev):
        return "switchdev"
    vfs = read(f"/sys/class/net/{netdev}/device/sriov_numvfs") or ""
    return "legacy" if vfs.isdigit() and int(vfs) > 0 else "unknown"
