"""``aifactory plan``: the planning and printing behind ``aifactory_core.cli.cmd_plan``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from aifactory_core.errors import EXIT_OK, UsageError


def _read(path: str, what: str) -> bytes:
    from aifactory_core.cli.cmd_vm import read_input

    try:
        return read_input(path, 4 * 1024 * 1024)
    except UsageError as error:
        raise UsageError(f"{what}: {error.message}") from None


def _render(placement: Any) -> str:
    from aifactory_core.cpulist import format_cpulist

    lines = [
        f"VM {placement.vm_id}: {'device-local' if placement.local else 'NOT device-local'}, "
        f"memory nodes {format_cpulist(placement.memory_nodes)}, emulator on {format_cpulist(placement.emulator_cpus)}"
    ]
    for cell in placement.cells:
        pins = " ".join(f"{vcpu}>{format_cpulist(cpus)}" for vcpu, cpus in zip(cell.vcpus, cell.pcpus, strict=True))
        lines.append(f"  guest cell {cell.cell_id} on host node {cell.host_node}, {cell.memory_kib} KiB: {pins}")
    for address, node in sorted(placement.device_nodes.items()):
        lines.append(f"  device {address} on node {'unknown' if node is None else node}")
    for gpu, nic in placement.pairs:
        lines.append(f"  GPU {gpu} paired with NIC {nic} (same PCIe switch)")
    lines.extend(f"  note: {note}" for note in placement.notes)
    return "\n".join(lines) + "\n"


def run_plan(args: argparse.Namespace, context: Any) -> int:
    from aifactory_core.domain import dump_domain, load_domain, pci_hostdevs
    from aifactory_core.host.inventory import HostInventory
    from aifactory_core.one.payload import parse_vm_payload
    from aifactory_plugins.cpu_pinning.domain_rewrite import minimal_domain, rewrite_domain
    from aifactory_plugins.cpu_pinning.held import DomainXmlHeld, HeldCpus, StateFileHeld
    from aifactory_plugins.cpu_pinning.plugin import NAME, place_vm, policies_from
    from aifactory_plugins.cpu_pinning.spec import spec_from_request
    from aifactory_plugins.cpu_pinning.topology import HostTopology

    request = parse_vm_payload(_read(args.vm, "--vm"), f"VM document {args.vm}")
    domain = (
        load_domain(_read(args.deployment, "--deployment"), f"deployment file {args.deployment}")
        if args.deployment
        else None
    )
    policies = policies_from(context.config.plugin(NAME))
    inventory = HostInventory(context.host)
    topology = HostTopology.from_inventory(inventory, context.config.host.reserved_cpus)
    classes = {address: device.class_code for address, device in inventory.pci.items()}
    spec = spec_from_request(request, classes, policies)
    if domain is not None and not spec.devices:
        from dataclasses import replace

        from aifactory_plugins.cpu_pinning.spec import spec_from_domain

        devices = spec_from_domain(
            domain, request.vm_id, [ref.address for _, ref in pci_hostdevs(domain)], classes, policies
        )
        spec = replace(spec, gpus=devices.gpus, nics=devices.nics)
    if args.held:
        if not Path(args.held).is_dir():
            raise UsageError(f"--held {args.held!r} is not a directory")
        provider: HeldCpus = DomainXmlHeld(Path(args.held))
    else:
        provider = StateFileHeld(context.host)
    result = place_vm(topology, provider, spec, policies)
    if domain is None:
        domain = minimal_domain(result, f"one-{request.vm_id}")
        notes: list[str] = []
    else:
        notes = rewrite_domain(domain, result)
    xml = dump_domain(domain).decode()
    if args.json:
        document = {"placement": result.to_dict(), "domain_notes": notes, "domain_xml": xml}
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    sys.stderr.write(_render(result) + "".join(f"  note: {note}\n" for note in notes))
    sys.stdout.write(xml)
    return EXIT_OK
