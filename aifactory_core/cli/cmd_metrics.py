"""``aifactory metrics``: GPU and host metrics in Prometheus text format (stdout or a textfile)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from aifactory_core.errors import EXIT_OK


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("metrics", help="GPU metrics in Prometheus text format")
    parser.add_argument("--nvml-replay", metavar="FILE", help="read a recorded nvml.json instead of NVML")
    parser.add_argument("--textfile", metavar="PATH",
                        help="write atomically to PATH (node_exporter textfile collector, *.prom) instead of stdout")
    parser.add_argument("--budget", type=float, default=5.0, metavar="SECONDS",
                        help="deadline for all NVML reads (default 5)")


def run(args: argparse.Namespace, context: Any) -> int:
    from aifactory_core.cli.cmd_probe import check_budget, check_replay, probe_root
    from aifactory_core.errors import UsageError
    from aifactory_core.probes.collect import collect
    from aifactory_core.probes.prometheus import exposition, write_textfile

    replay = check_replay(args.nvml_replay)
    budget = check_budget(args.budget)
    if args.textfile:  # checked before the NVML reads, not after
        import os

        if not args.textfile.endswith(".prom"):
            raise UsageError(f"textfile {args.textfile!r}: node_exporter reads only *.prom files")
        directory = os.path.dirname(os.path.abspath(args.textfile))
        if not os.path.isdir(directory):  # a typo must not create a directory node_exporter never reads
            raise UsageError(f"textfile {args.textfile!r}: directory {directory!r} does not exist")
    from aifactory_core.probes.owners import tenants

    root = probe_root(context)
    snapshot = collect(root, replay, budget, nvml_mode="metrics")
    text = exposition(snapshot, tenants(root, snapshot["held"].values()))
    if args.textfile:
        try:
            write_textfile(args.textfile, text)
        except OSError as error:
            raise UsageError(f"cannot write {args.textfile}: {error.strerror or error}") from None
    else:
        sys.stdout.write(text)
    return EXIT_OK
