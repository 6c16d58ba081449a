"""``aifactory plugins``: the plugins loaded through entry points and the hooks each implements."""

from __future__ import annotations

import argparse
from typing import Any

from aifactory_core.errors import EXIT_OK


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("plugins", help="list loaded plugins and the hooks they implement")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace, context: Any) -> int:
    from aifactory_core.cli.output import print_json, print_table

    _manager, loaded = context.plugins
    if args.json:
        print_json(loaded)
        return EXIT_OK
    rows = [
        [plugin.name, f"{plugin.distribution or '-'} {plugin.version or ''}".strip(), plugin.module,
         ", ".join(hook.removeprefix("aifactory_") for hook in plugin.hooks)]
        for plugin in loaded
    ]
    print_table(["PLUGIN", "DISTRIBUTION", "MODULE", "HOOKS"], rows)
    return EXIT_OK
