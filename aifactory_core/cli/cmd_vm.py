"""``aifactory vm FILE|-``: parse a VM document the way hooks and drivers do, and show the request.

Accepts a plain ``<VM>``, base64 as hooks get ``$TEMPLATE``, a ``VMM_DRIVER_ACTION_DATA`` or a
``HOOK_MESSAGE`` wrapping ``<VM>``; the same hardened parser as the hooks (size, depth, DOCTYPE
and encoding guards). A malformed or hostile document exits 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, BinaryIO

from aifactory_core.errors import EXIT_OK, DocumentError, UsageError

if TYPE_CHECKING:
    from aifactory_core.one.vm import VmRequest


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "vm",
        help="parse an OpenNebula VM document (XML, base64 $TEMPLATE, VMM_DRIVER_ACTION_DATA)",
        description="Parse a VM document as hooks and drivers receive it and print the request.",
    )
    parser.add_argument("file", metavar="FILE", help="the document, or '-' for standard input")
    encoding = parser.add_mutually_exclusive_group()
    encoding.add_argument(
        "--base64", dest="encoding", action="store_const", const="base64",
        help="the input is base64 (as $TEMPLATE); default: detect",
    )  # fmt: skip
    encoding.add_argument(
        "--xml", dest="encoding", action="store_const", const="xml", help="the input is plain XML"
    )
    parser.set_defaults(encoding="auto")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--max-bytes", type=int, default=16 * 1024 * 1024, metavar="N",
        help="refuse documents larger than N bytes (default 16 MiB)",
    )  # fmt: skip


def _read_limited(stream: BinaryIO, limit: int, name: str, max_bytes: int) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise DocumentError(f"{name} is larger than the {max_bytes}-byte document limit")
    return data


def read_input(path: str, max_bytes: int) -> bytes:
    """Read FILE or stdin, never more than what a base64 encoding of ``max_bytes`` may need."""
    limit = max_bytes * 4 // 3 + max_bytes // 30 + 4096
    if path == "-":
        return _read_limited(sys.stdin.buffer, limit, "standard input", max_bytes)
    try:
        with open(path, "rb") as stream:
            return _read_limited(stream, limit, path, max_bytes)
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None


def _safe(value: object) -> str:
    """Text for a terminal: control characters escaped (names come from tenants)."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def _opt(value: object, suffix: str = "") -> str:
    return "-" if value is None else f"{_safe(value)}{suffix}"


def _hex(value: int | None) -> str:
    return "-" if value is None else f"{value:04x}"


def render(request: VmRequest) -> str:
    lines = [
        f"VM {request.vm_id}  name {_opt(request.name)}",
        f"  owner {_opt(request.uname)} (uid {_opt(request.uid)})  group {_opt(request.gname)} "
        f"(gid {_opt(request.gid)})",
        f"  state {_opt(request.state_name)}/{_opt(request.lcm_state_name)}  host {_opt(request.host)} "
        f"(id {_opt(request.host_id)})  cluster {_opt(request.cluster_id)}  deploy id {_opt(request.deploy_id)}",
        f"  cpu {_opt(request.cpu)}  vcpu {_opt(request.vcpu)}  memory {_opt(request.memory_mib, ' MiB')}",
    ]
    topology = request.topology
    if topology is not None:
        lines.append(
            f"  topology pin {topology.pin_policy}  sockets {_opt(topology.sockets)}  cores "
            f"{_opt(topology.cores)}  threads {_opt(topology.threads)}  hugepages "
            f"{_opt(topology.hugepage_size, ' MiB')}  memory access {_opt(topology.memory_access)}  "
            f"node affinity {_opt(topology.node_affinity)}"
        )
    for node in request.numa_nodes:
        cpus = ",".join(str(cpu) for cpu in node.cpus) or "-"
        lines.append(
            f"  numa node {_opt(node.node_id)}: {_opt(node.total_cpus)} vcpus on host cpus {cpus}, "
            f"{_opt(node.memory_kib, ' KiB')} on host node {_opt(node.memory_node_id)}"
        )
    for pci in request.pci:
        kind = "nic" if pci.is_nic else "device"
        line = (
            f"  pci {_opt(pci.pci_id)} {kind}: {_opt(pci.address)}  {_hex(pci.vendor)}:{_hex(pci.device)} "
            f"class {_hex(pci.device_class)}  numa {_opt(pci.numa_node)}  guest {_opt(pci.vm_address)}"
        )
        if pci.is_nic:
            line += (
                f"  network {_opt(pci.network)} (id {_opt(pci.network_id)})  vlan {_opt(pci.vlan_id)}  "
                f"mac {_opt(pci.mac)}  vn_mad {_opt(pci.vn_mad)}"
            )
        lines.append(line)
    for nic in request.nics:
        kind = "nic alias" if nic.alias else "nic"
        lines.append(
            f"  {kind} {_opt(nic.nic_id)}: network {_opt(nic.network)} (id {_opt(nic.network_id)})  "
            f"bridge {_opt(nic.bridge)}  vlan {_opt(nic.vlan_id)}  mac {_opt(nic.mac)}  vn_mad {_opt(nic.vn_mad)}"
        )
    for key, value in request.user_template.items():
        lines.append(f"  user {_safe(key)} = {_safe(value)}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, context: Any) -> int:
    from aifactory_core.one.payload import parse_vm_payload

    if args.max_bytes < 1:
        raise UsageError("--max-bytes must be positive")
    name = "standard input" if args.file == "-" else args.file
    data = read_input(args.file, args.max_bytes)
    request = parse_vm_payload(data, f"VM document {name}", encoding=args.encoding, max_bytes=args.max_bytes)
    if args.json:
        json.dump(request.to_dict(), sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(request))
    return EXIT_OK
