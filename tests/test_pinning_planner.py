"""The pinning planner on the synthetic DGX-H100 tree (tests/fixtures/hostgen.py) and the real
H100 capture: device-local fills, emulator isolation, oned's allocation, bad requests, and a
property test over random VM mixes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from aifactory_plugins.cpu_pinning.pcie import pair_gpus_with_nics, same_switch
from aifactory_plugins.cpu_pinning.planner import (
    HostUsage,
    OnedCell,
    Placement,
    PlanInputError,
    Unplaced,
    VmSpec,
    plan,
    plan_many,
)
from aifactory_plugins.cpu_pinning.topology import HostTopology
from hostroots import dgx_root, h100_root  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot

GIB = 1 << 20  # in KiB


@pytest.fixture(scope="module")
def dgx(dgx_root: Path) -> tuple[HostInventory, HostTopology]:  # noqa: F811
    inventory = HostInventory(HostRoot(dgx_root))
    return inventory, HostTopology.from_inventory(inventory)


def _devices(inventory: HostInventory, class_code: int) -> list[str]:
    return sorted(a for a, d in inventory.pci.items() if d.class_code == class_code and not d.is_vf)


def _gpu_vms(inventory: HostInventory, **extra: object) -> list[VmSpec]:
    gpus, nics = _devices(inventory, 0x030200), _devices(inventory, 0x020700)
    return [
        VmSpec(index, 16, 64 * GIB, GIB, gpus=(gpu,), nics=(nic,), **extra)  # type: ignore[arg-type]
        for index, (gpu, nic) in enumerate(zip(gpus, nics, strict=True))
    ]


def _check_no_double_booking(results: list[Placement | Unplaced]) -> None:
    seen: dict[int, int] = {}
    for result in results:
        if isinstance(result, Placement):
            for cpu in result.held_cpus | result.all_vcpu_cpus:
                assert seen.setdefault(cpu, result.vm_id) == result.vm_id, f"pCPU {cpu} given twice"


def test_dgx_fill_with_one_gpu_vms_places_all_eight_locally(dgx: tuple[HostInventory, HostTopology]) -> None:
    inventory, topology = dgx
    results, _ = plan_many(topology, _gpu_vms(inventory))
    assert all(isinstance(result, Placement) for result in results)
    placements = [result for result in results if isinstance(result, Placement)]
    assert len(placements) == 8 and all(placement.local for placement in placements)
    for placement in placements:
        (cell,) = placement.cells
        node_cpus = topology.node(cell.host_node).cpus
        assert placement.all_vcpu_cpus <= node_cpus
        assert set(placement.device_nodes.values()) == {cell.host_node}
        assert len(placement.pairs) == 1  # GPU paired with the NIC behind its switch
        # prefer: 16 vCPUs on 8 whole cores (thread siblings together)
        assert len({min(inventory.cpu.by_id()[cpu].thread_siblings) for cpu in placement.all_vcpu_cpus}) == 8
    assert sorted(p.cells[0].host_node for p in placements) == [0, 0, 0, 0, 1, 1, 1, 1]
    _check_no_double_booking(results)


def test_dgx_isolated_emulator_places_what_cores_allow_and_explains_the_rest(
    dgx: tuple[HostInventory, HostTopology],
) -> None:
    inventory, topology = dgx
    specs = _gpu_vms(inventory, thread_policy="isolate", emulator_policy="isolate")
    results, _ = plan_many(topology, specs)
    placed = [result for result in results if isinstance(result, Placement)]
    refused = [result for result in results if isinstance(result, Unplaced)]
    # 56 cores per node; each VM holds 16 whole cores plus one for its emulator thread
    assert len(placed) == (2 * 56) // 17 == 6
    assert len(refused) == 2 and all("isolated emulator thread" in item.reason for item in refused)
    for placement in placed:
        assert placement.emulator_cpus and not placement.emulator_cpus & placement.all_vcpu_cpus
        assert placement.emulator_cpus <= placement.held_cpus
    _check_no_double_booking(results)
    spilled = [placement for placement in placed if not placement.local]
    assert all(any("spilled" in note for note in placement.notes) for placement in spilled)


def test_oned_allocation_is_kept_and_refined(dgx: tuple[HostInventory, HostTopology]) -> None:
    inventory, topology = dgx
    spec = _gpu_vms(inventory)[0]  # GPU on node 0
    oned = (OnedCell(frozenset({0, 112, 1, 113}), 0),)
    result = plan(topology, HostUsage(), replace(spec, vcpus=4, memory_kib=4 * GIB, oned_cells=oned))
    assert isinstance(result, Placement) and result.conflict is None
    assert result.all_vcpu_cpus == {0, 112, 1, 113} and result.memory_nodes == (0,)
    # prefer packs thread siblings: vCPU 0,1 on one core, 2,3 on the other
    assert result.vcpu_cpus[0] | result.vcpu_cpus[1] == {0, 112}


def test_oned_allocation_against_device_locality_warns_or_refuses(dgx: tuple[HostInventory, HostTopology]) -> None:
    inventory, topology = dgx
    spec = replace(_gpu_vms(inventory)[0], vcpus=2, memory_kib=2 * GIB,
                   oned_cells=(OnedCell(frozenset({56, 168}), 1),))  # fmt: skip
    warned = plan(topology, HostUsage(), spec, "warn")
    assert isinstance(warned, Placement) and warned.conflict and not warned.local
    assert warned.all_vcpu_cpus == {56, 168} and warned.memory_nodes == (1,)  # never moved
    refused = plan(topology, HostUsage(), spec, "refuse")
    assert isinstance(refused, Unplaced) and "devices are on" in refused.reason


def test_requests_the_host_can_never_hold_are_input_errors(dgx: tuple[HostInventory, HostTopology]) -> None:
    _, topology = dgx
    with pytest.raises(PlanInputError, match="asks for 300 CPUs; the host has 224"):
        plan(topology, HostUsage(), VmSpec(1, 300, GIB))
    with pytest.raises(PlanInputError, match="not a whole number"):
        plan(topology, HostUsage(), VmSpec(1, 2, GIB + 4, GIB))
    with pytest.raises(PlanInputError, match="not on this host"):
        plan(topology, HostUsage(), VmSpec(1, 2, GIB, gpus=("0000:ff:1f.7",)))


def test_reserved_cpus_are_never_used(dgx_root: Path) -> None:  # noqa: F811
    inventory = HostInventory(HostRoot(dgx_root))
    topology = HostTopology.from_inventory(inventory, frozenset({0, 1, 112, 113}))
    result = plan(topology, HostUsage(), VmSpec(1, 8, GIB))
    assert isinstance(result, Placement) and not result.all_vcpu_cpus & {0, 1, 112, 113}
    assert result.emulator_cpus == {0, 1, 112, 113}  # share: the host's own CPUs


def test_require_fails_without_free_sibling_pairs(dgx: tuple[HostInventory, HostTopology]) -> None:
    _, topology = dgx
    node0 = topology.node(0)
    # hold one thread of every core on node 0 and all of node 1
    usage = HostUsage(frozenset(core[0] for core in node0.cores) | topology.node(1).cpus)
    assert isinstance(plan(topology, usage, VmSpec(1, 2, GIB, thread_policy="require")), Unplaced)
    fallback = plan(topology, usage, VmSpec(1, 2, GIB, thread_policy="prefer"))
    assert isinstance(fallback, Placement)


def test_pcie_pairing_uses_the_switch_not_the_node(dgx: tuple[HostInventory, HostTopology]) -> None:
    inventory, topology = dgx
    gpus, nics = _devices(inventory, 0x030200), _devices(inventory, 0x020700)
    parents = topology.device_parents
    # same node, different switches: not paired
    assert not same_switch(gpus[0], nics[1], parents)
    pairs = pair_gpus_with_nics(gpus[:2], nics[:2], parents)
    assert pairs == ((gpus[0], nics[0]), (gpus[1], nics[1]))
    assert pair_gpus_with_nics(gpus[:1], nics[1:2], parents) == ()


def test_numa_node_minus_one_falls_back_to_local_cpulist(h100_root: Path) -> None:  # noqa: F811
    inventory = HostInventory(HostRoot(h100_root))
    gpu = inventory.pci["0000:00:06.0"]
    topology = HostTopology.from_inventory(inventory)
    assert topology.node_of_device(gpu.address) == inventory.device_node(gpu) is not None
    result = plan(topology, HostUsage(), VmSpec(1, 2, GIB, gpus=(gpu.address,)))
    assert isinstance(result, Placement) and result.local


# ---------------------------------------------------------------------------------------------
# Property test: random mixes of VMs with 0-2 GPUs (and maybe their NICs), random policies.


def _has_local_solution(topology: HostTopology, usage: HostUsage, spec: VmSpec) -> bool:
    """Brute force: does any single node holding every device's node fit the VM?"""
    from aifactory_plugins.cpu_pinning.planner import _memory_fits, pack

    wanted = {node for node in (topology.node_of_device(a) for a in spec.devices) if node is not None}
    for node in topology.nodes:
        if wanted and wanted != {node.node_id}:
            continue
        if pack(node, usage.cpus, spec.vcpus, spec.thread_policy, spec.emulator_policy == "isolate") is None:
            continue
        if _memory_fits(topology, usage, node.node_id, spec.memory_kib, spec.hugepage_kib):
            return True
    return False


@st.composite
def _vm_mix(draw: st.DrawFn, gpus: list[str], nics: list[str]) -> list[VmSpec]:
    count = draw(st.integers(1, 14))
    free = list(range(len(gpus)))
    specs = []
    for vm_id in range(count):
        taken = draw(st.lists(st.sampled_from(free), max_size=2, unique=True)) if free else []
        for index in taken:
            free.remove(index)
        with_nic = draw(st.booleans())
        specs.append(VmSpec(
            vm_id=vm_id,
            vcpus=draw(st.sampled_from([1, 2, 4, 8, 16, 24, 32, 48, 64])),
            memory_kib=draw(st.sampled_from([1, 8, 32, 64])) * GIB,
            hugepage_kib=draw(st.sampled_from([None, GIB])),
            thread_policy=draw(st.sampled_from(["prefer", "isolate", "require"])),
            emulator_policy=draw(st.sampled_from(["share", "isolate"])),
            gpus=tuple(gpus[index] for index in taken),
            nics=tuple(nics[index] for index in taken) if with_nic else (),
        ))  # fmt: skip
    return specs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_no_double_booking_and_local_when_possible(
    dgx: tuple[HostInventory, HostTopology], data: st.DataObject
) -> None:
    inventory, topology = dgx
    specs = data.draw(_vm_mix(_devices(inventory, 0x030200), _devices(inventory, 0x020700)))
    usage = HostUsage()
    results: list[Placement | Unplaced] = []
    for spec in specs:
        local_possible = _has_local_solution(topology, usage, spec)
        result = plan(topology, usage, spec)
        if local_possible:
            assert isinstance(result, Placement) and result.local, (spec, result)
        if isinstance(result, Placement):
            assert not result.held_cpus & usage.cpus
            assert not result.all_vcpu_cpus & topology.reserved
            assert len(result.vcpu_cpus) == spec.vcpus
            assert sum(cell.memory_kib for cell in result.cells) == spec.memory_kib
            usage = usage.with_placement(result)
        results.append(result)
    _check_no_double_booking(results)
    assert plan_many(topology, specs)[0] == results  # deterministic


@pytest.fixture
def small_root(tmp_path: Path) -> Path:
    from hostroots import generate_host

    return generate_host("two-node-small", tmp_path / "small")


def test_numa_node_minus_one_as_the_kernel_shows_it_on_two_nodes_stays_unknown(tmp_path: Path) -> None:
    """Where the firmware gives a device no node the kernel shows every online CPU as its
    ``local_cpulist`` (the capture's GPU: -1 and 0-15; hostgen writes that for a root with node
    -1): on two nodes that names no node, so the device's node stays unknown, never guessed."""
    import json
    import sys

    from hostroots import FIXTURES

    sys.path.insert(0, str(FIXTURES))
    try:
        import hostgen
    finally:
        sys.path.remove(str(FIXTURES))
    description = json.loads((FIXTURES / "topologies" / "two-node-small.json").read_text())
    description["pci_roots"][1]["node"] = -1
    inventory = HostInventory(HostRoot(hostgen.generate(description, tmp_path / "root")))
    gpu = "0000:83:00.0"
    assert inventory.pci[gpu].numa_node is None and len(inventory.numa_nodes) == 2
    topology = HostTopology.from_inventory(inventory, frozenset({0}))
    assert topology.node_of_device(gpu) is None
    result = plan(topology, HostUsage(), VmSpec(1, 2, GIB, GIB, gpus=(gpu,)))
    assert isinstance(result, Placement) and result.device_nodes == {gpu: None}


def test_isolcpus_leave_the_rest_to_the_host_and_remote_placement_is_explained(small_root: Path) -> None:
    inventory = HostInventory(HostRoot(small_root))
    assert inventory.cpu.isolated == {2, 3, 10, 11}
    topology = HostTopology.from_inventory(inventory)
    assert topology.node(0).cpus == {2, 3, 10, 11} and topology.node(1).cpus == frozenset()
    result = plan(topology, HostUsage(), VmSpec(1, 2, GIB, gpus=("0000:83:00.0",)))
    assert isinstance(result, Placement) and not result.local and result.all_vcpu_cpus <= {2, 3, 10, 11}
    assert any("not device-local" in note for note in result.notes)
    assert result.emulator_cpus == topology.reserved  # share: the host's CPUs
    configured = HostTopology.from_inventory(inventory, frozenset({0, 8}))
    assert configured.reserved == {0, 8} and 2 in configured.node(0).cpus and 4 in configured.node(1).cpus
