"""The one program the suite runs as root, through sudo, with a closed argument grammar.

OpenNebula runs drivers as ``oneadmin``; moving a PCI function between drivers needs root. This
helper accepts exactly::

    aifactory-root-helper set-driver <dddd:bb:ss.f> <driver|none>

— a validated PCI address and a validated driver name, nothing else (no paths, no shell, no
environment: it always works on the live ``/``). ``drivers/sudoers/aifactory`` allows only it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from aifactory_core.errors import AifactoryError, UsageError
from aifactory_core.validate import driver_name, pci_address

USAGE = "usage: aifactory-root-helper set-driver <dddd:bb:ss.f> <driver|none>"


def parse(argv: Sequence[str]) -> tuple[str, str]:
    if len(argv) != 3 or argv[0] != "set-driver":
        raise UsageError(USAGE)
    driver = "" if argv[2] == "none" else driver_name(argv[2])
    return pci_address(argv[1]), driver


def main(argv: Sequence[str] | None = None) -> int:
    try:
        address, driver = parse(list(sys.argv[1:] if argv is None else argv))
        from pathlib import Path

        from aifactory_core.host.pcibind import PciBinder
        from aifactory_core.hostroot import HostRoot

        PciBinder(HostRoot(Path("/"))).set_driver(address, driver)
    except AifactoryError as error:
        sys.stderr.write(f"aifactory-root-helper: {error.message}\n")
        return error.exit_status
    return 0


def entry_point() -> None:
    raise SystemExit(main())
