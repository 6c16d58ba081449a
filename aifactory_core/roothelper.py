"""The one program the suite runs as root, through sudo, with a closed argument grammar.

OpenNebula runs drivers as ``oneadmin``; moving a PCI function between drivers needs root. This
helper accepts exactly::

    aifactory-root-helper set-driver <dddd:bb:ss.f> <driver|none>
    aifactory-root-helper reset <dddd:bb:ss.f>     (prints the reset method used, then why the device
                                                    is unfit, if it is)
    aifactory-root-helper vf-set <PF ifname> <VF index> key=value...
                                                   (VF settings over netlink: mac, vlan, qos,
                                                    spoofchk, trust, min_tx_rate, max_tx_rate,
                                                    link_state, node_guid, port_guid)
    aifactory-root-helper vf-scrub <PF ifname> <VF index> eth|ib
    aifactory-root-helper xid-log <sequence>       (the NVIDIA XID codes of the kernel log newer than
                                                    the sequence: ``NEWEST <n>`` then ``XID <bus>
                                                    <code>`` lines, no other kernel message)

— validated PCI addresses, driver names, interface names, VF indices and VF settings, nothing
else (no paths, no shell, no environment: it always works on the live ``/``). Reading VFs back
needs no privilege, so the caller verifies. ``drivers/sudoers/aifactory`` allows only it.

The helper judges every request itself before it writes anything (:func:`serve`): it refuses a
function the host uses or one sharing its IOMMU group, and a VF outside the configured pools, by
the root-owned configuration (:mod:`aifactory_core.rootconfig`) and the kernel's own state
(:mod:`aifactory_core.host.hostuse`); a refusal is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aifactory_core.errors import AifactoryError, UsageError
from aifactory_core.validate import driver_name, pci_address

VFIO_DRIVER = "vfio-pci"

if TYPE_CHECKING:
    from aifactory_core.config import HostConfig
    from aifactory_core.host.netlink_vf import VfSettings
    from aifactory_core.hostroot import HostRoot

USAGE = ("usage: aifactory-root-helper set-driver <dddd:bb:ss.f> <driver|none> | reset <dddd:bb:ss.f> | "
         "vf-set <ifname> <vf> key=value... | vf-scrub <ifname> <vf> eth|ib | xid-log <sequence>")
VERBS = ("set-driver", "reset", "vf-set", "vf-scrub", "xid-log")
"""The helper's whole command table: ``drivers/sudoers/aifactory`` allows exactly these, and the
docs list them (``tests/test_sudoers_doc.py`` checks all three agree)."""
VF_KEYS = ("mac", "vlan", "qos", "spoofchk", "trust", "min_tx_rate", "max_tx_rate", "link_state", "node_guid",
           "port_guid")
MAX_VF_INDEX = 4095
ENV_ROOT_HELPER = "AIFACTORY_ROOT_HELPER"
DEFAULT_ROOT_HELPER = "/usr/local/lib/aifactory/venv/bin/aifactory-root-helper"
HOST_ROOT = "/"
"""The helper always works on the live machine: no host root, path or environment from its caller."""


def parse(argv: Sequence[str]) -> tuple[str, str, str]:
    """``(verb, address, driver)`` for the PCI verbs, ``(verb, ifname, VF index)`` for the VF
    verbs (their settings: :func:`vf_settings_of`); anything outside the grammar is a UsageError."""
    if not argv or argv[0] not in VERBS:
        raise UsageError(USAGE)
    if len(argv) == 3 and argv[0] == "set-driver":
        driver = "" if argv[2] == "none" else driver_name(argv[2])
        return "set-driver", pci_address(argv[1]), driver
    if len(argv) == 2 and argv[0] == "reset":
        return "reset", pci_address(argv[1]), ""
    if len(argv) == 2 and argv[0] == "xid-log":
        if not (argv[1] == "-1" or (argv[1].isdigit() and len(argv[1]) <= 19)):
            raise UsageError(f"invalid kernel log sequence {argv[1][:20]!r}")
        return "xid-log", str(int(argv[1])), ""
    if len(argv) >= 3 and argv[0] in ("vf-set", "vf-scrub"):
        from aifactory_core.validate import ifname, int_in_range

        pf = ifname(argv[1])
        if not argv[2].isdigit():  # strictly digits: no sign, no blanks
            raise UsageError(f"invalid VF index {argv[2][:20]!r}: not an integer")
        vf = int_in_range(argv[2], 0, MAX_VF_INDEX, "VF index")
        if argv[0] == "vf-scrub" and (len(argv) != 4 or argv[3] not in ("eth", "ib")):
            raise UsageError(USAGE)
        if argv[0] == "vf-set":
            vf_settings_of(argv[3:])
        return argv[0], pf, str(vf)
    raise UsageError(USAGE)


def vf_arguments(settings: VfSettings) -> list[str]:
    """``key=value`` words for ``vf-set`` from a :class:`~aifactory_core.host.netlink_vf.VfSettings`."""
    words = []
    for key in VF_KEYS:
        value = getattr(settings, key)
        if value is None:
            continue
        words.append(f"{key}={('on' if value else 'off') if isinstance(value, bool) else value}")
    return words


def vf_settings_of(words: Sequence[str]) -> VfSettings:
    """The validated VfSettings of ``vf-set``'s ``key=value`` words (each key at most once)."""
    from aifactory_core.host.netlink_vf import settings

    values: dict[str, object] = {}
    for word in words:
        key, equals, value = word.partition("=")
        if not equals or key not in VF_KEYS or key in values:
            raise UsageError(f"vf-set: unexpected argument {word[:40]!r}")
        if key in ("spoofchk", "trust"):
            if value not in ("on", "off"):
                raise UsageError(f"vf-set: {key} must be on or off")
            values[key] = value == "on"
        elif key in ("vlan", "qos", "min_tx_rate", "max_tx_rate"):
            values[key] = int(value) if value.isdigit() and len(value) <= 9 else value
        else:
            values[key] = value
    return settings(**values)


def needed(host: HostRoot) -> bool:
    """Whether a change to ``host`` must go through the helper: it is the live machine and this
    process is not root (OpenNebula runs its drivers as oneadmin)."""
    import os

    return host.is_live and os.geteuid() != 0


def run_privileged(*argv: str) -> str:
    """Run the helper through ``sudo -n`` (the unprivileged side); its stdout, or HostError."""
    import os
    import subprocess

    from aifactory_core.errors import HostError

    parse(argv)  # never hand sudo anything outside the grammar
    helper = os.environ.get(ENV_ROOT_HELPER, DEFAULT_ROOT_HELPER)
    completed = subprocess.run(["sudo", "-n", helper, *argv], capture_output=True, text=True, timeout=120,
                               check=False)
    if completed.returncode != 0:
        lines = completed.stderr.strip().splitlines()
        raise HostError(lines[-1] if lines else f"root helper failed: {' '.join(argv)}")
    return completed.stdout


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = list(sys.argv[1:] if argv is None else argv)
        parse(args)
        from pathlib import Path

        from aifactory_core.hostroot import HostRoot
        from aifactory_core.rootconfig import load_root_config

        sys.stdout.write(serve(HostRoot(Path(HOST_ROOT)), load_root_config().host, args))
    except AifactoryError as error:
        sys.stderr.write(f"aifactory-root-helper: {error.message}\n")
        return error.exit_status
    return 0


def serve(host: HostRoot, config: HostConfig, argv: Sequence[str]) -> str:
    """Judge the request by the root-owned ``config`` and the kernel's own state, then make it;
    returns what to print. A function the host uses, or one in its IOMMU group, is refused; so is a
    VF outside ``[host] vf_pools`` (:mod:`aifactory_core.host.hostuse`); and so is a reset, or a move
    off vfio-pci, of a function a process (a running guest's QEMU) still uses through VFIO
    (:mod:`aifactory_core.host.vfio_users`): no record in the caller's state directory can make root
    pull a device from under a running VM. Nothing is written before the request is judged."""
    from aifactory_core.host.hostuse import check_function, check_vf

    verb, subject, detail = parse(argv)
    if verb == "xid-log":  # reads the live kernel log alone; changes nothing
        from aifactory_core.errors import HostError
        from aifactory_core.probes.xid import helper_report

        try:
            return helper_report(int(subject))
        except OSError as error:
            raise HostError(f"/dev/kmsg: {error.strerror or error}") from None
    if verb in ("vf-set", "vf-scrub"):
        check_vf(host, subject, int(detail), config)
        _vf(host, verb, subject, int(detail), list(argv[3:]))
        return ""
    check_function(host, subject, config.host_devices)
    if verb == "reset" or detail != VFIO_DRIVER:
        from aifactory_core.host.vfio_users import check_unused

        check_unused(host, subject, "reset it" if verb == "reset" else f"move it to {detail or 'no driver'}")
    if verb == "reset":
        from aifactory_core.host.sanitize import reset_check_method

        method, problem = reset_check_method(host, subject)
        return f"{method}\n{problem or ''}\n"
    from aifactory_core.host.pcibind import PciBinder

    PciBinder(host).set_driver(subject, detail)
    return ""


def _vf(host: HostRoot, verb: str, pf: str, vf: int, rest: list[str]) -> None:
    """Make the VF change over netlink as root (no read-back: the unprivileged caller verifies)."""
    from aifactory_core.errors import HostError
    from aifactory_core.host import netlink_vf
    from aifactory_core.vnm.vf import ifindex, pool_size

    index = ifindex(host, pf)
    if index is None:
        raise HostError(f"no interface {pf}")
    size = pool_size(host, pf)
    if verb == "vf-set":
        wanted = vf_settings_of(rest)
    else:
        wanted = netlink_vf.CLEAN_IB if rest == ["ib"] else netlink_vf.CLEAN
    netlink_vf.apply(netlink_vf.open_netlink(), index, vf, wanted, pool_size=size)


def entry_point() -> None:
    raise SystemExit(main())
