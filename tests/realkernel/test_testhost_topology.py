"""The default test host has the shape the other realkernel tests rely on."""

from __future__ import annotations

from pathlib import Path

import pytest
from testhost.guest import PCI, iommu_group, read

pytestmark = pytest.mark.realkernel


def test_two_numa_nodes_with_two_cpus_each() -> None:
    nodes = sorted(p.name for p in Path("/sys/devices/system/node").glob("node[0-9]*"))
    assert nodes == ["node0", "node1"]
    assert read("/sys/devices/system/node/node0/cpulist") == "0-1"
    assert read("/sys/devices/system/node/node1/cpulist") == "2-3"


def test_e1000e_sits_on_numa_node_1_with_an_iommu_group(e1000e_bdf: str) -> None:
    assert read(PCI / e1000e_bdf / "numa_node") == "1"
    assert read(PCI / e1000e_bdf / "local_cpulist") == "2-3"
    assert Path(f"/sys/kernel/iommu_groups/{iommu_group(e1000e_bdf)}/devices/{e1000e_bdf}").exists()
