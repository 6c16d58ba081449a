"""The host model read against a real H100 host's captured sysfs/procfs (not a fake)."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from hostroots import H100_CAPTURE

from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot

GPU = "0000:00:06.0"


def test_gpu_read_from_capture(h100_root: Path) -> None:
    inventory = HostInventory(HostRoot(h100_root))
    gpu = inventory.pci[GPU]
    assert (gpu.vendor_id, gpu.device_id) == (0x10DE, 0x2330)
    assert gpu.class_code == 0x030200
    assert (gpu.subsystem_vendor_id, gpu.subsystem_device_id) == (0x10DE, 0x16C1)
    assert gpu.driver == "nvidia"
    assert gpu.reset_methods == ("flr",)
    assert gpu.driver_override is None
    assert gpu.iommu_group is None  # the capture host has no IOMMU groups
    assert gpu.numa_node is None  # sysfs says -1 ...
    assert gpu.local_cpus == frozenset(range(16))
    assert inventory.device_node(gpu) == 0  # ... so the node comes from local_cpulist
    assert gpu.one_type == "10de:2330:0302"


def test_gpu_matches_nvidia_smi_of_the_same_host(h100_root: Path) -> None:
    gpu = HostInventory(HostRoot(h100_root)).pci[GPU]
    smi = ET.parse(H100_CAPTURE / "nvidia-smi-q.xml").getroot().find("gpu/pci")
    assert smi is not None
    assert smi.findtext("pci_device_id") == f"{gpu.device_id:04X}{gpu.vendor_id:04X}"
    assert smi.findtext("pci_sub_system_id") == f"{gpu.subsystem_device_id:04X}{gpu.subsystem_vendor_id:04X}"
    assert smi.findtext("pci_gpu_link_info/link_widths/current_link_width") == f"{gpu.link.current_width}x"
    assert smi.findtext("pci_gpu_link_info/link_widths/max_link_width") == f"{gpu.link.max_width}x"
    assert not gpu.link.degraded


def test_cpu_and_numa_match_lscpu(h100_root: Path) -> None:
    inventory = HostInventory(HostRoot(h100_root))
    fields = {item["field"]: item["data"] for item in json.loads((H100_CAPTURE / "lscpu.json").read_text())["lscpu"]}
    assert len(inventory.cpu.cpus) == int(fields["CPU(s):"])
    assert len(inventory.numa_nodes) == int(fields.get("NUMA node(s):", "1"))
    node = inventory.numa_nodes[0]
    assert node.cpus == frozenset(range(16))
    assert node.memory_total_kib > 0
    assert {page.size_kib for page in node.hugepages} == {2048, 1048576}
    assert inventory.kernel_release == "6.18.44-fc-v657-gpu"


def test_interfaces_and_modules(h100_root: Path) -> None:
    inventory = HostInventory(HostRoot(h100_root))
    by_name = {net.name: net for net in inventory.net}
    assert by_name["eth0"].pci_address == "0000:00:03.0"
    assert by_name["lo"].pci_address is None
    assert "nvidia" in inventory.loaded_modules
    assert inventory.iommu.groups == 0 and inventory.iommu.firmware_table is None


def test_capture_readme_cites_files_that_exist() -> None:
    """Every repository path tests/fixtures/hosts/README.md names, and every test it names, exists."""
    import re

    from hostroots import REPO

    readme = (REPO / "tests" / "fixtures" / "hosts" / "README.md").read_text()
    paths = re.findall(r"`((?:tests|aifactory_core)/[\w./-]+)`", readme)
    assert "tests/test_cli.py" in paths
    assert [path for path in paths if not (REPO / path).exists()] == []
    for path, test in re.findall(r"`(tests/[\w/]+\.py)`\s*\(`(test_\w+)`\)", readme):
        assert f"\ndef {test}(" in (REPO / path).read_text(), (path, test)
