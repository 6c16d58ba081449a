"""``aifactory usage --from DATE --to DATE [--csv]``: GPU-hours and cost per VM and tenant.

Reads the ledger the accounting hook keeps (``--ledger DIR``, else ``AIFACTORY_ACCOUNTING_DIR``,
else ``[plugin.policy] accounting_dir``, else ``/var/lib/one/aifactory/accounting``) and prices it
with the policy (``--policy``, else ``[plugin.policy] file``). Dates: ``YYYY-MM-DD`` (UTC
midnight) or seconds since the epoch; the window is [from, to).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any

from aifactory_core.errors import EXIT_OK, UsageError

if TYPE_CHECKING:
    from aifactory_core.cli import Context


def _when(text: str) -> int:
    if re.fullmatch(r"[0-9]{1,12}", text):
        return int(text)
    import datetime

    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{text!r}: expected YYYY-MM-DD or seconds since the epoch") from None
    return int(datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp())


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("usage", help="GPU-hours and cost per VM and tenant (showback)",
                                   description="Showback report from the GPU-time ledger.")  # fmt: skip
    parser.add_argument("--from", dest="start", required=True, type=_when, metavar="DATE")
    parser.add_argument("--to", dest="end", required=True, type=_when, metavar="DATE")
    parser.add_argument("--csv", action="store_true", help="CSV: tenant,vm_id,gpu_hours,cost")
    parser.add_argument("--ledger", metavar="DIR", help="the accounting directory")
    parser.add_argument("--policy", metavar="FILE", help="the policy (prices, tenant names)")


def run(args: argparse.Namespace, context: Context) -> int:
    from pathlib import Path

    from aifactory_core.policy.accounting import Ledger, report, totals
    from aifactory_core.policy.schema import load_policy

    if args.end <= args.start:
        raise UsageError("--to must be after --from")
    settings = context.config.plugin("policy")
    directory = args.ledger or os.environ.get("AIFACTORY_ACCOUNTING_DIR") or settings.get(
        "accounting_dir", "/var/lib/one/aifactory/accounting")
    policy_file = args.policy or settings.get("file")
    policy = load_policy(str(policy_file)) if policy_file else None
    lines = report(Ledger(Path(str(directory))).read(), policy, args.start, args.end, int(time.time()))
    if args.csv:
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["tenant", "vm_id", "gpu_hours", "cost"])
        for line in lines:
            writer.writerow([line.tenant, line.vm_id, f"{line.gpu_seconds / 3600:.4f}", f"{line.cost:.4f}"])
        return EXIT_OK
    from aifactory_core.cli.output import print_table

    rows = [[line.tenant, str(line.vm_id), f"{line.gpu_seconds / 3600:.2f}", f"{line.cost:.2f}"] for line in lines]
    print_table(["TENANT", "VM", "GPU-HOURS", "COST"], rows)
    for tenant, (seconds, cost) in sorted(totals(lines).items()):
        print(f"total {tenant}: {seconds / 3600:.2f} GPU-hours, {cost:.2f}")
    return EXIT_OK
