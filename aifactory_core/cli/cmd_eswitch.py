"""``aifactory eswitch [--apply]``: the eswitch mode of every device ``[plugin.bluefield]
switchdev`` names (devlink), and with ``--apply`` (as root) switch those in legacy mode to
switchdev. Switching destroys and recreates a device's VF netdevs: do it before any VM uses them."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from aifactory_core.errors import EXIT_OK, UsageError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("eswitch", help="show (or --apply) the switchdev mode [plugin.bluefield] asks for")
    parser.add_argument("--apply", action="store_true", help="switch the named devices to switchdev (as root)")


def run(args: argparse.Namespace, context: Any) -> int:
    import importlib

    from aifactory_core.host.devlink import PyrouteDevlink

    bluefield = importlib.import_module("aifactory_plugins.bluefield")  # no static dependency on a plugin
    section = context.config.plugin("bluefield")
    handles = bluefield.switchdev_handles(section)
    if not handles:
        raise UsageError("[plugin.bluefield] switchdev names no device (e.g. switchdev = [\"pci/0000:03:00.0\"])")
    devlink = PyrouteDevlink()
    try:
        changed = set(bluefield.apply_eswitch_modes(section, devlink)) if args.apply else set()
        for bus, device in handles:
            note = " (switched)" if f"{bus}/{device}" in changed else ""
            sys.stdout.write(f"{bus}/{device}: {devlink.eswitch_mode(bus, device)}{note}\n")
    finally:
        devlink.close()
    return EXIT_OK
