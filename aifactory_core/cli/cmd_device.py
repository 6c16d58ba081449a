"""``aifactory device bind|release|list``: the driver's own transaction, for administrators."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from aifactory_core.errors import EXIT_OK, UsageError
from aifactory_core.lifecycle.ownership import ADMIN_VM  # the owner of devices taken by hand


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("device", help="bind/release devices the way the VMM driver does; who holds what")
    actions = parser.add_subparsers(dest="device_command", metavar="ACTION")
    bind = actions.add_parser("bind", help="take functions (with their IOMMU groups) for a VM or the administrator")
    bind.add_argument("addresses", nargs="+", metavar="ADDR")
    bind.add_argument("--driver", default="vfio-pci", help="driver to bind to (default vfio-pci)")
    bind.add_argument("--vm", type=int, default=ADMIN_VM, help="owner VM id (default: the administrator)")
    bind.add_argument("--dry-run", action="store_true", help="print the sysfs writes, in order, and why")
    release = actions.add_parser("release", help="give a device (and what was taken with it) back")
    release.add_argument("address", metavar="ADDR")
    actions.add_parser("list", help="devices, their drivers and the VMs holding them")
    clear = actions.add_parser("clear", help="lift a quarantine and accept a device's new identity (after a swap)")
    clear.add_argument("address", metavar="ADDR")


def _owner_label(vm: int) -> str:
    return "admin" if vm == ADMIN_VM else f"VM {vm}"


def _admin_reason(reason: str) -> str:
    """A plugin's reason as the administrator reads it (the plugins speak of the owner as a VM)."""
    prefix = f"VM {ADMIN_VM}: "
    if not reason.startswith(prefix):
        return reason
    return "admin: " + reason[len(prefix):].replace("requested by the VM", "requested by the administrator")


def _bind(args: argparse.Namespace, context: Any) -> int:
    from aifactory_core.host.inventory import HostInventory
    from aifactory_core.lifecycle.executor import plan_writes, prepare
    from aifactory_core.model import Action, DeployRequest
    from aifactory_core.validate import driver_name, pci_address, vm_id

    addresses = tuple(dict.fromkeys(pci_address(address) for address in args.addresses))
    driver = driver_name(args.driver)
    vm = vm_id(args.vm)
    host = context.host
    inventory = HostInventory(host)
    for address in addresses:
        if address not in inventory.pci:
            raise UsageError(f"PCI device {address} is not on this host")
    if driver == "vfio-pci":
        manager, _loaded = context.plugins
        request = DeployRequest(vm_id=vm, pci_addresses=addresses)
        actions = [action for result in manager.hook.aifactory_prepare(
            inventory=inventory, request=request, config=context.config) for action in (result or ())]
    else:
        actions = [Action("pci_driver", address, driver, inventory.pci[address].driver or "",
                          f"{_owner_label(vm)}: administrator asked for {driver}") for address in addresses]
    if args.dry_run:
        for action in actions:
            if action.kind == "pci_driver":
                reason = _admin_reason(action.reason) if vm == ADMIN_VM else action.reason
                sys.stdout.write(f"# {action.target}: {action.undo_value or 'no driver'} -> {action.value} "
                                 f"({reason})\n")
        for write in plan_writes(host, actions):
            sys.stdout.write(f"echo {write.value.strip() or chr(39) * 2} > {write.path}    # {write.why}\n")
        return EXIT_OK
    from aifactory_core.lifecycle.vmlock import vm_lock

    with vm_lock(host, vm):  # as the deploy wrapper: no repair or reconciliation of the VM meanwhile
        prepare(host, vm, actions)
    for action in (action for action in actions if action.kind == "pci_driver"):
        sys.stdout.write(f"{action.target}: {action.undo_value or 'no driver'} -> {action.value}\n")
    return EXIT_OK


def _release(args: argparse.Namespace, context: Any) -> int:
    from aifactory_core.lifecycle.executor import release
    from aifactory_core.lifecycle.ownership import owner_of
    from aifactory_core.validate import pci_address

    address = pci_address(args.address)
    owner = owner_of(context.host, address)
    if owner is None:
        raise UsageError(f"device {address} is not held by any VM")
    from aifactory_core.lifecycle.vmlock import vm_lock

    with vm_lock(context.host, owner):  # not while the VM's own deploy or release runs
        release(context.host, owner)
    sys.stdout.write(f"{address}: released ({_owner_label(owner)})\n")
    return EXIT_OK


def _list(context: Any) -> int:
    from aifactory_core.cli.output import print_table
    from aifactory_core.devices import discover_devices
    from aifactory_core.host.inventory import HostInventory
    from aifactory_core.host.sanitize import quarantined
    from aifactory_core.lifecycle.ownership import held_devices

    manager, _loaded = context.plugins
    inventory = HostInventory(context.host)
    held = held_devices(context.host)
    bad = quarantined(context.host)
    addresses = sorted({device.address for device in discover_devices(manager, inventory)} | set(held) | set(bad))
    rows = []
    for address in addresses:
        device = inventory.pci.get(address)
        rows.append([address, device.ids if device else "?", (device.driver if device else None) or "-",
                     _owner_label(held[address]) if address in held else "-", bad.get(address, "-")])
    print_table(["ADDRESS", "IDS", "DRIVER", "HELD BY", "QUARANTINE"], rows)
    return EXIT_OK


def _clear(args: argparse.Namespace, context: Any) -> int:
    from aifactory_core.host.fingerprint import forget
    from aifactory_core.host.sanitize import clear_quarantine
    from aifactory_core.validate import pci_address

    address = pci_address(args.address)
    lifted, forgotten = clear_quarantine(context.host, address), forget(context.host, address)
    if not (lifted or forgotten):
        raise UsageError(f"device {address} is neither quarantined nor fingerprinted")
    sys.stdout.write(f"{address}: {'quarantine lifted; ' if lifted else ''}fingerprint will be taken anew\n")
    return EXIT_OK


def run(args: argparse.Namespace, context: Any) -> int:
    if args.device_command == "bind":
        return _bind(args, context)
    if args.device_command == "release":
        return _release(args, context)
    if args.device_command == "list":
        return _list(context)
    if args.device_command == "clear":
        return _clear(args, context)
    raise UsageError("device needs an action: bind, release, list or clear")
