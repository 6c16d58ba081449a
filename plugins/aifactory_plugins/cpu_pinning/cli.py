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

    if path.startswith("sample:"):  # a VM document bundled with a host sample (aifactory_core.samples)
        from aifactory_core.samples import vm_document

        path = str(vm_document(path[len("sample:"):]))
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


def _pretty(domain: Any) -> str:
    """The domain indented for a reader (a copy: the domain itself is left as it was)."""
    from copy import deepcopy

    from lxml import etree

    shown = deepcopy(domain)
    etree.indent(shown, space="  ")
    return etree.tostring(shown, encoding="unicode") + "\n"


def _spec(request: Any, inventory: Any, policies: Any, domain: Any = None) -> Any:
    """The planner's view of one VM document (and of oned's deployment file, when given)."""
    from aifactory_plugins.cpu_pinning.spec import spec_from_request

    classes = {address: device.class_code for address, device in inventory.pci.items()}
    spec = spec_from_request(request, classes, policies)
    if domain is not None and not spec.devices:
        from dataclasses import replace

        from aifactory_core.domain import pci_hostdevs
        from aifactory_plugins.cpu_pinning.spec import spec_from_domain

        devices = spec_from_domain(
            domain, request.vm_id, [ref.address for _, ref in pci_hostdevs(domain)], classes, policies
        )
        spec = replace(spec, gpus=devices.gpus, nics=devices.nics)
    return spec


def _held(args: argparse.Namespace, context: Any) -> Any:
    from aifactory_plugins.cpu_pinning.held import DomainXmlHeld, StateFileHeld

    if args.held:
        if not Path(args.held).is_dir():
            raise UsageError(f"--held {args.held!r} is not a directory")
        return DomainXmlHeld(Path(args.held))
    return StateFileHeld(context.host)


def _host_model(context: Any) -> tuple[Any, Any, Any]:
    """(pinning policies, host inventory, CPU topology without the reserved CPUs) of this host."""
    from aifactory_core.host.inventory import HostInventory
    from aifactory_plugins.cpu_pinning.plugin import NAME, policies_from
    from aifactory_plugins.cpu_pinning.topology import HostTopology

    inventory = HostInventory(context.host)
    host = context.config.host
    topology = HostTopology.from_inventory(inventory, host.reserved_cpus, host.reserved_memory_mib * 1024)
    return policies_from(context.config.plugin(NAME)), inventory, topology


def run_plan(args: argparse.Namespace, context: Any) -> int:
    from aifactory_core.domain import dump_domain, load_domain
    from aifactory_core.one.payload import parse_vm_payload
    from aifactory_plugins.cpu_pinning.domain_rewrite import minimal_domain, rewrite_domain
    from aifactory_plugins.cpu_pinning.plugin import place_vm

    if len(args.vm) > 1:
        return _run_batch(args, context)
    (vm_path,) = args.vm
    request = parse_vm_payload(_read(vm_path, "--vm"), f"VM document {vm_path}")
    domain = (
        load_domain(_read(args.deployment, "--deployment"), f"deployment file {args.deployment}")
        if args.deployment
        else None
    )
    policies, inventory, topology = _host_model(context)
    spec = _spec(request, inventory, policies, domain)
    result = place_vm(topology, _held(args, context), spec, policies)
    if domain is None:
        domain = minimal_domain(result, f"one-{request.vm_id}")
        notes: list[str] = []
    else:
        notes = rewrite_domain(domain, result)
    if args.json:
        xml = dump_domain(domain).decode()
        document = {"placement": result.to_dict(), "domain_notes": notes, "domain_xml": xml}
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    sys.stderr.write(_render(result) + "".join(f"  note: {note}\n" for note in notes))
    sys.stdout.write(_pretty(domain))
    return EXIT_OK


def _run_batch(args: argparse.Namespace, context: Any) -> int:
    """Several VMs planned onto this host in the order given, each seeing what the earlier ones
    took: a report of which fit (device-local or not) and which do not; no domain is written."""
    from aifactory_core.errors import EXIT_CHECK_FAILED, DocumentError
    from aifactory_core.one.payload import parse_vm_payload
    from aifactory_plugins.cpu_pinning.held import usage_of
    from aifactory_plugins.cpu_pinning.planner import Placement, PlanInputError, plan_many

    if args.deployment:
        raise UsageError("--deployment goes with a single --vm")
    if args.vm.count("-") > 1:
        raise UsageError("--vm - (standard input) may be given once")
    requests = [parse_vm_payload(_read(path, "--vm"), f"VM document {path}") for path in args.vm]
    seen: set[int] = set()
    for request in requests:
        if request.vm_id in seen:
            raise UsageError(f"VM {request.vm_id} is given twice")
        seen.add(request.vm_id)
    policies, inventory, topology = _host_model(context)
    specs = [_spec(request, inventory, policies) for request in requests]
    usage = usage_of(_held(args, context), exclude_vms=seen)
    try:
        results, _ = plan_many(topology, specs, usage, policies.conflict)
    except PlanInputError as error:
        raise DocumentError(str(error)) from None
    placed = [result for result in results if isinstance(result, Placement)]
    local = sum(1 for placement in placed if placement.local)
    summary = f"{len(placed)} of {len(results)} VMs placed, {local} device-local\n"
    if args.json:
        entries = [
            {"placed": True, **result.to_dict()}
            if isinstance(result, Placement)
            else {"vm_id": result.vm_id, "placed": False, "reason": result.reason}
            for result in results
        ]
        document = {"vms": entries, "placed": len(placed), "device_local": local}
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for result in results:
            if isinstance(result, Placement):
                sys.stdout.write(_render(result))
            else:
                sys.stdout.write(f"VM {result.vm_id}: does not fit: {result.reason}\n")
        sys.stdout.write(summary)
    return EXIT_OK if len(placed) == len(results) else EXIT_CHECK_FAILED
