"""``aifactory plan --vm VM.xml [--deployment DOMAIN.xml] [--json]``: the CPU/NUMA placement of a VM
and the libvirt domain that carries it, computed from the host model without touching the host.

The placement goes to stderr (or into the JSON document), the domain XML to stdout. Without
``--deployment`` a minimal q35 domain is written around the placement. With several ``--vm`` the
VMs are planned onto the host in the order given, each seeing what the earlier ones took, and the
report (stdout) says which fit, device-local or not, and which do not (exit 1 when any does not).
What other pinned VMs hold comes from the pinning records under the state directory, or from
``--held DIR`` (libvirt domain XML files such as ``virsh dumpxml`` output, or ``onevm show -x``
VM documents). The work is the ``cpu_pinning`` plugin's
(``aifactory_plugins.cpu_pinning.cli``); the core holds no static dependency on a plugin.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="show a VM's CPU/NUMA placement and the resulting domain XML (changes nothing)",
        description="Plan a VM's pinning on this host and print the domain XML that carries it.",
    )
    parser.add_argument("--vm", required=True, action="append", metavar="FILE",
                        help="OpenNebula VM document ('-' for stdin); repeat to plan several VMs in order")
    parser.add_argument("--deployment", metavar="FILE", help="oned's deployment file to rewrite (one --vm only)")
    parser.add_argument("--held", metavar="DIR",
                        help="directory of the other VMs' libvirt domain XMLs or OpenNebula VM documents")
    parser.add_argument("--json", action="store_true", help="placement and domain as one JSON document")


def run(args: argparse.Namespace, context: Any) -> int:
    module = importlib.import_module("aifactory_plugins.cpu_pinning.cli")
    status: int = module.run_plan(args, context)
    return status
