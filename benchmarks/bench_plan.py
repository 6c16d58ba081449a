"""Pinning plan time per VM while filling a host, and locality against a device-blind baseline.

    .venv/bin/python benchmarks/bench_plan.py [--mixes N] [--seed S]

Hosts, generated with tests/fixtures/hostgen.py: ``dgx-h100`` (2 sockets x 56 cores x 2 threads,
8 H100 + 8 ConnectX-7 behind their PCIe switches) and ``epyc-8node-448`` (8 NUMA nodes, 448
threads, one GPU+NIC tray per node). Each mix is a seeded random stream of VMs (0-2 GPUs drawn
from the free ones, each with its switch-local NIC half of the time, 4-32 vCPUs, thread and
emulator policies) planned one after the other until 8 VMs in a row do not fit.

Times: ``plan()`` per VM (the topology is built once per host, as in one deploy process; its
build time is printed separately). Locality: the share of placed VMs whose vCPUs, memory and
devices are on one NUMA node (a VM given two GPUs on different nodes can never be local, so
the share among VMs whose devices share a node is printed too). The baseline plans the same VMs
device-blind, the way OpenNebula picks a node when it does not pin: the emptiest node that fits.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def _mix(rng: random.Random, gpus: list[str], nic_of: dict[str, str], length: int = 200) -> list[object]:
    from aifactory_plugins.cpu_pinning.planner import VmSpec

    free = list(gpus)
    specs = []
    for vm_id in range(length):
        count = min(rng.choice([0, 1, 1, 1, 2]), len(free))
        taken = sorted(rng.sample(free, count))
        for gpu in taken:
            free.remove(gpu)
        nics = tuple(nic_of[gpu] for gpu in taken if gpu in nic_of and rng.random() < 0.5)
        vcpus = rng.choice([4, 8, 16, 16, 24, 32])
        specs.append(
            VmSpec(
                vm_id=vm_id,
                vcpus=vcpus,
                memory_kib=vcpus * 4 * 1024 * 1024,
                hugepage_kib=1024 * 1024,
                thread_policy=rng.choice(["prefer", "prefer", "isolate", "require"]),
                emulator_policy=rng.choice(["share", "isolate"]),
                gpus=tuple(taken),
                nics=nics,
            )
        )
    return specs


def _fill(topology: object, specs: list[object], blind: bool) -> tuple[list[float], int, int, int]:
    from aifactory_plugins.cpu_pinning.planner import HostUsage, Placement, plan

    usage = HostUsage()
    times: list[float] = []
    placed = local = single = misses = 0
    for spec in specs:
        asked = replace(spec, gpus=(), nics=()) if blind else spec  # type: ignore[type-var]
        start = time.perf_counter_ns()
        result = plan(topology, usage, asked)  # type: ignore[arg-type]
        times.append((time.perf_counter_ns() - start) / 1e6)
        if not isinstance(result, Placement):
            misses += 1
            if misses >= 8:
                break
            continue
        misses = 0
        usage = usage.with_placement(result)
        placed += 1
        device_nodes = {topology.node_of_device(a) for a in spec.devices}  # type: ignore[attr-defined]
        nodes = {cell.host_node for cell in result.cells}
        known = {n for n in device_nodes if n is not None}
        single += len(known) <= 1
        local += len(nodes) == 1 and known <= nodes
    return times, placed, local, single


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    from aifactory_plugins.cpu_pinning.pcie import pair_gpus_with_nics
    from aifactory_plugins.cpu_pinning.topology import HostTopology
    from hostroots import generate_host

    from aifactory_core.host.inventory import HostInventory
    from aifactory_core.hostroot import HostRoot

    print(f"python {sys.version.split()[0]}, {args.mixes} mixes per host, seed {args.seed}")
    for description in ("dgx-h100", "epyc-8node-448"):
        with tempfile.TemporaryDirectory() as scratch:
            root = generate_host(description, Path(scratch) / description)
            start = time.perf_counter()
            inventory = HostInventory(HostRoot(root))
            topology = HostTopology.from_inventory(inventory)
            build_ms = (time.perf_counter() - start) * 1e3
        gpus = sorted(a for a, d in inventory.pci.items() if d.base_class == 0x03)
        nics = sorted(a for a, d in inventory.pci.items() if d.class_code == 0x020700 and not d.is_vf)
        nic_of = dict(pair_gpus_with_nics(gpus, nics, topology.device_parents))
        rng = random.Random(args.seed)
        totals = {False: [[], 0, 0, 0], True: [[], 0, 0, 0]}  # type: ignore[var-annotated]
        for _ in range(args.mixes):
            specs = _mix(rng, gpus, nic_of)
            for blind in (False, True):
                times, placed, local, single = _fill(topology, specs, blind)
                totals[blind][0].extend(times)
                totals[blind][1] += placed
                totals[blind][2] += local
                totals[blind][3] += single
        print(
            f"\n{description}: {topology.cpu_count} CPUs, {len(topology.nodes)} nodes, {len(gpus)} GPUs, "
            f"{len(nic_of)} GPU/NIC pairs; host model + topology build {build_ms:.1f} ms (once per process)"
        )
        for blind, label in ((False, "cpu_pinning (device-aware)"), (True, "baseline (emptiest node, device-blind)")):
            times, placed, local, single = totals[blind]
            ordered = sorted(times)
            p95 = ordered[int(len(ordered) * 0.95)]
            print(
                f"  {label:40s} plan/VM median {statistics.median(times):.3f} ms  p95 {p95:.3f} ms  "
                f"({len(times)} plans)  placed {placed}  locality {local / max(placed, 1):.1%} "
                f"(of the {single} whose devices share a node: {local / max(single, 1):.1%})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
