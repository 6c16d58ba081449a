"""``aifactory vf-pool PF [COUNT] [--autoprobe on|off] [--dry-run]``: show or resize a PF's VF pool.

Resizing destroys every VF, so it is refused while any VF is in use — held by a VM's device
transaction, bound to vfio-pci, or configured for a VM by the network hooks (a VF owner token).
``--autoprobe off`` keeps new VFs off the host's netdev driver (they go straight to vfio-pci).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from aifactory_core.errors import EXIT_OK


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("vf-pool", help="show or resize an SR-IOV PF's VF pool (refused while in use)")
    parser.add_argument("pf", metavar="PF", help="the PF's netdev name or PCI address")
    parser.add_argument("count", nargs="?", metavar="COUNT", help="the number of VFs wanted (omit to show the pool)")
    parser.add_argument("--autoprobe", choices=("on", "off"), help="bind new VFs to the host's driver (default: as is)")
    parser.add_argument("--dry-run", action="store_true", help="print the sysfs writes, in order, and why")


def run(args: argparse.Namespace, context: Any) -> int:
    from aifactory_core.host import sriov
    from aifactory_core.host.pcibind import RecordingWriter, SysfsWriter
    from aifactory_core.vnm.hook import vnm_host
    from aifactory_core.vnm.vf import vf_owners_indices

    host = context.host
    pf = sriov.pf_by_address(host, args.pf) if ":" in args.pf else sriov.pf_by_netdev(host, args.pf)
    in_use = sriov.vfs_in_use(host, pf) | (vf_owners_indices(vnm_host(host), pf.netdev) if pf.netdev else set())
    out = sys.stdout
    if args.count is None:
        out.write(f"{pf.address} ({pf.netdev or 'no netdev'}, {pf.driver or 'no driver'}): {pf.num_vfs}/{pf.total_vfs}"
                  f" VFs, autoprobe {pf.autoprobe_word}, in use: "
                  f"{','.join(map(str, sorted(in_use))) or 'none'}\n")
        return EXIT_OK
    autoprobe = None if args.autoprobe is None else args.autoprobe == "on"
    writer = RecordingWriter() if args.dry_run else SysfsWriter()
    count = int(args.count) if args.count.isdigit() else args.count
    after = sriov.set_pool_size(host, pf, count, writer, autoprobe=autoprobe, in_use=in_use)
    if isinstance(writer, RecordingWriter):
        for write in writer.writes:
            out.write(f"echo {write.value} > {write.path}    # {write.why}\n")
        return EXIT_OK
    out.write(f"{after.address}: {pf.num_vfs} -> {after.num_vfs} VFs\n")
    return EXIT_OK
