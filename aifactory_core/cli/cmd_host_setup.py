"""``aifactory host-setup``: as root on a KVM host, install what the synced remotes cannot bring:
the root-owned environment the root helper runs from, the sudoers snippet that allows it, and the
boot-time repair unit (see :mod:`aifactory_core.install.host_setup`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from aifactory_core.errors import EXIT_OK, EXIT_USAGE, AifactoryError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "host-setup", help="install the root helper's environment, sudoers snippet and boot repair unit on this host")
    parser.add_argument("--dry-run", action="store_true", help="print every step; change nothing")
    parser.add_argument("--destdir", default="/", metavar="DIR", help="stage under DIR instead of / (tests, images)")
    parser.add_argument("--uninstall", action="store_true", help="remove exactly what host-setup installed")
    parser.add_argument("--source", type=Path, metavar="DIR",
                        help="a suite checkout whose drivers/sudoers and drivers/systemd to install "
                        "(default: the synced copy, /var/tmp/one/aifactory/host)")
    parser.add_argument("--environment", type=Path, metavar="DIR",
                        help="the host environment to copy (default: /var/tmp/one/aifactory/venv under --destdir)")


def run(args: argparse.Namespace, context: Any) -> int:
    from aifactory_core.install import host_setup, layout
    from aifactory_core.install.stage import Transaction

    destdir = Path(args.destdir)
    if not destdir.is_absolute():
        sys.stderr.write("aifactory: host-setup: --destdir must be an absolute path\n")
        return EXIT_USAGE
    target = layout.Layout(destdir)
    if not target.staged and not args.dry_run and os.geteuid() != 0:
        sys.stderr.write("aifactory: host-setup: run it as root on the host (or stage it with --destdir)\n")
        return EXIT_USAGE
    tx = Transaction(dry_run=args.dry_run, out=sys.stdout)
    try:
        if args.uninstall:
            notes = host_setup.uninstall(target, tx)
        else:
            files = args.source / "drivers" if args.source is not None else None
            sources = host_setup.find_sources(target, files, args.environment)
            notes = host_setup.setup(target, sources, tx)
    except (AifactoryError, OSError) as error:
        failed = tx.rollback()
        message = error.message if isinstance(error, AifactoryError) else str(error)
        sys.stderr.write(f"aifactory: host-setup: {message}\n")
        sys.stderr.write("aifactory: host-setup: rolled back: the host is as it was before this run\n" if not failed
                         else "aifactory: host-setup: could not undo: " + "; ".join(failed) + "\n")
        return error.exit_status if isinstance(error, AifactoryError) and error.exit_status == EXIT_USAGE else 1
    tx.commit()
    for note in notes:
        sys.stdout.write(f"note: {note}\n")
    if tx.changes == 0:
        sys.stdout.write("nothing to change: the host setup is up to date\n")
    return EXIT_OK
