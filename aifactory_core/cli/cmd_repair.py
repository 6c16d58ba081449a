"""``aifactory repair``: finish or roll back transactions a crash interrupted (run at host boot)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from aifactory_core.errors import EXIT_CHECK_FAILED, EXIT_OK


def add_parser(subparsers: Any) -> None:
    subparsers.add_parser("repair", help="finish or roll back interrupted device transactions")


def run(args: argparse.Namespace, context: Any) -> int:
    from aifactory_core.lifecycle.repair import RepairReport, repair
    from aifactory_core.vnm.hook import vnm_host

    _manager, _loaded = context.plugins  # loading plugins registers their action kinds (VF, pkey, OVS port)
    report = RepairReport()
    for scope in (context.host, vnm_host(context.host)):  # device journals, then network journals
        report.add(repair(scope))
    out = sys.stdout
    out.write(f"rolled back: {', '.join(map(str, report.rolled_back)) or 'none'}\n")
    out.write(f"released: {', '.join(map(str, report.released)) or 'none'}\n")
    out.write(f"kept (prepared, VM running): {', '.join(map(str, report.kept)) or 'none'}\n")
    if report.orphans_dropped:
        out.write(f"stale ownership dropped: {', '.join(report.orphans_dropped)}\n")
    for problem in report.problems:
        sys.stderr.write(f"aifactory: repair: {problem}\n")
    return EXIT_CHECK_FAILED if report.problems else EXIT_OK
