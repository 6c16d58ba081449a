"""``aifactory probe host-system|vm-monitor``: the installed IM probes' output, from the same code."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from aifactory_core.errors import EXIT_OK


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("probe", help="print an OpenNebula IM probe's output")
    parser.add_argument("kind", choices=["host-system", "vm-monitor"])
    parser.add_argument("--nvml-replay", metavar="FILE",
                        help="read a recorded nvml.json instead of NVML ('sample:h100-sxm5-vm' for the bundled one)")
    parser.add_argument("--budget", type=float, default=5.0, metavar="SECONDS",
                        help="deadline for all NVML reads (default 5)")


def probe_root(context: Any) -> Any:
    from aifactory_core.probes.sysfs import Root

    host = context.host
    return Root(str(host.root), str(host.state_dir))


def check_replay(path: str | None) -> str | None:
    """The recording to replay: a file holding a JSON object, or ``sample:NAME`` for a bundled
    capture's ``NAME.nvml.json``; anything else is a :class:`UsageError` (one line, exit 2)."""
    import os

    from aifactory_core.errors import UsageError

    if path is not None and path.startswith("sample:"):
        from aifactory_core import samples

        name = path[len("sample:"):]
        if name not in samples.available():
            raise UsageError(f"unknown sample {name!r}; available: {', '.join(samples.available())}")
        path = os.path.join(os.path.dirname(os.path.abspath(samples.__file__)), f"{name}.nvml.json")
    if path is not None and not os.path.isfile(path):
        raise UsageError(f"NVML recording {path!r} is not a file")
    if path is not None:  # the probes would only report it in AIF_NVML, and metrics not at all
        import json

        try:
            with open(path, encoding="utf-8") as handle:
                recording = json.load(handle)
        except (OSError, ValueError) as error:
            raise UsageError(f"NVML recording {path!r} is unreadable: {' '.join(str(error).split())}") from None
        if not isinstance(recording, dict):
            raise UsageError(f"NVML recording {path!r} is not a JSON object")
    return path


def check_budget(seconds: float) -> float:
    """``--budget``: the NVML deadline, within the bounds the installed probes clamp
    ``AIFACTORY_PROBE_BUDGET_S`` to (``inf`` would overflow the thread join, ``nan`` or 0 time out
    every GPU)."""
    from aifactory_core.errors import UsageError

    if not 0.1 <= seconds <= 60.0:  # also false for nan
        raise UsageError(f"--budget {seconds:g}: give a number of seconds from 0.1 to 60")
    return seconds


def run(args: argparse.Namespace, context: Any) -> int:
    replay = check_replay(args.nvml_replay)
    budget = check_budget(args.budget)
    if args.kind == "host-system":
        from aifactory_core.probes.host_system import probe
    else:
        from aifactory_core.probes.vm_monitor import probe
    sys.stdout.write(probe(probe_root(context), replay, budget))
    return EXIT_OK
