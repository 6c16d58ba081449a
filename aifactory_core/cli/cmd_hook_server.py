"""``aifactory hook-server [--socket PATH]``: the resident server the frontend's admission and
accounting hooks hand their events to (``aifactory-hook-server.service``, as oneadmin)."""

from __future__ import annotations

import argparse
from typing import Any

from aifactory_core.errors import EXIT_OK


def add_parser(subparsers: Any) -> None:
    from aifactory_core.policy.hookclient import DEFAULT_SOCKET

    parser = subparsers.add_parser("hook-server", help="decide hook events in one resident process")
    parser.add_argument("--socket", default=None,
                        help=f"Unix socket to listen on (default $AIFACTORY_HOOK_SOCKET, else {DEFAULT_SOCKET})")


def run(args: argparse.Namespace, context: Any) -> int:
    import os
    import signal
    import sys

    from aifactory_core.policy.hookclient import DEFAULT_SOCKET, ENV_SOCKET
    from aifactory_core.policy.hookserver import serve

    def stop(_signal: int, _frame: object) -> None:
        raise SystemExit(EXIT_OK)  # unwinds serve(), which removes the socket

    signal.signal(signal.SIGTERM, stop)
    path = args.socket or os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET
    try:
        serve(path, lambda: sys.stderr.write(f"aifactory hook-server: listening on {path}\n"))
    except KeyboardInterrupt:
        pass
    return EXIT_OK
