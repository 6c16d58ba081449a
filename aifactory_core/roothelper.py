"""The one program the suite runs as root, through sudo, with a closed argument grammar.

OpenNebula runs drivers as ``oneadmin``; moving a PCI function between drivers needs root. This
helper accepts exactly::

    aifactory-root-helper set-driver <dddd:bb:ss.f> <driver|none>
    aifactory-root-helper reset <dddd:bb:ss.f>     (prints the reset method used, then why the device
                                                    is unfit, if it is)

— a validated PCI address and a validated driver name, nothing else (no paths, no shell, no
environment: it always works on the live ``/``). ``drivers/sudoers/aifactory`` allows only it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from aifactory_core.errors import AifactoryError, UsageError
from aifactory_core.validate import driver_name, pci_address

USAGE = "usage: aifactory-root-helper set-driver <dddd:bb:ss.f> <driver|none> | reset <dddd:bb:ss.f>"
ENV_ROOT_HELPER = "AIFACTORY_ROOT_HELPER"
DEFAULT_ROOT_HELPER = "/usr/local/lib/aifactory/venv/bin/aifactory-root-helper"


def parse(argv: Sequence[str]) -> tuple[str, str, str]:
    """``(verb, address, driver)``; anything outside the grammar is a UsageError."""
    if len(argv) == 3 and argv[0] == "set-driver":
        driver = "" if argv[2] == "none" else driver_name(argv[2])
        return "set-driver", pci_address(argv[1]), driver
    if len(argv) == 2 and argv[0] == "reset":
        return "reset", pci_address(argv[1]), ""
    raise UsageError(USAGE)


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
        verb, address, driver = parse(list(sys.argv[1:] if argv is None else argv))
        from pathlib import Path

        from aifactory_core.hostroot import HostRoot

        host = HostRoot(Path("/"))
        if verb == "reset":
            from aifactory_core.host.sanitize import reset_check_method

            method, problem = reset_check_method(host, address)
            sys.stdout.write(f"{method}\n{problem or ''}\n")
        else:
            from aifactory_core.host.pcibind import PciBinder

            PciBinder(host).set_driver(address, driver)
    except AifactoryError as error:
        sys.stderr.write(f"aifactory-root-helper: {error.message}\n")
        return error.exit_status
    return 0


def entry_point() -> None:
    raise SystemExit(main())
