"""``aifactory doctor``: host readiness for passthrough — each check PASS/WARN/FAIL with the fix."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from aifactory_core.errors import EXIT_CHECK_FAILED, EXIT_OK

if TYPE_CHECKING:
    from aifactory_core.model import Check


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("doctor", help="check the host's readiness for GPU/NIC passthrough")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--frontend", action="store_true",
                        help="check the suite's installation on this OpenNebula frontend instead (docs/install.md)")


def run_checks(context: Any) -> list[Check]:
    from aifactory_core.devices import discover_devices
    from aifactory_core.host.inventory import HostInventory
    from aifactory_core.model import Check

    manager, _loaded = context.plugins
    inventory = HostInventory(context.host)
    devices = discover_devices(manager, inventory)
    checks: list[Check] = []
    for result in manager.hook.aifactory_doctor_checks(inventory=inventory, devices=devices, config=context.config):
        checks.extend(result or ())
    from aifactory_core.install.pci_doctor import host_checks

    checks.extend(host_checks(str(context.host.root), str(context.host.state_dir)))  # the host's PCI list for oned
    if not any(device.kind in ("gpu", "accelerator") for device in devices):
        checks.append(Check("gpus", "WARN", "no GPU or accelerator found on this host",
                            fix="check the card is seated and visible in lspci"))
    return checks


def run(args: argparse.Namespace, context: Any) -> int:
    if args.frontend:
        import os
        from pathlib import Path

        from aifactory_core.install import frontend_doctor, layout

        one_location = os.environ.get("ONE_LOCATION", "").rstrip("/")  # a self-contained OpenNebula
        checks = frontend_doctor.run_checks(layout.Layout(Path(context.host.root), one_location=one_location))
    else:
        checks = run_checks(context)
    failed = any(check.status == "FAIL" for check in checks)
    if args.json:
        from aifactory_core.cli.output import print_json

        print_json({"ok": not failed, "checks": checks})
    else:
        out = sys.stdout
        for check in checks:
            subject = f" [{check.subject}]" if check.subject else ""
            out.write(f"{check.status:<4}  {check.name}{subject}: {check.message}\n")
            if check.fix and check.status in ("WARN", "FAIL"):
                out.write(f"      fix: {check.fix}\n")
        counts = {status: sum(check.status == status for check in checks) for status in ("PASS", "WARN", "FAIL")}
        out.write(f"\n{counts['PASS']} passed, {counts['WARN']} warnings, {counts['FAIL']} failed\n")
    return EXIT_CHECK_FAILED if failed else EXIT_OK
