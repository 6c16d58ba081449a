"""Tests of the synthetic host-root generator (tests/fixtures/hostgen.py) and its topologies."""

from __future__ import annotations

import itertools
import json
import os
import re
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostroots import extract_archive

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOPOLOGIES = FIXTURES / "topologies"
CAPTURE_CANDIDATES = (FIXTURES / "hosts" / "h100-sxm5-vm" / "sysfs.tar.gz",)

sys.path.insert(0, str(FIXTURES))
try:
    import hostgen
finally:
    sys.path.remove(str(FIXTURES))

BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
DGX_GPUS = ["0000:1b:00.0", "0000:43:00.0", "0000:52:00.0", "0000:61:00.0",
            "0000:9d:00.0", "0000:c3:00.0", "0000:d1:00.0", "0000:df:00.0"]
DGX_NICS = ["0000:18:00.0", "0000:40:00.0", "0000:4f:00.0", "0000:5e:00.0",
            "0000:9a:00.0", "0000:c0:00.0", "0000:ce:00.0", "0000:dc:00.0"]


def load(name: str) -> dict[str, Any]:
    return json.loads((TOPOLOGIES / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def dgx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hostgen.generate(load("dgx-h100"), tmp_path_factory.mktemp("dgx") / "root")


@pytest.fixture(scope="module")
def nps4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hostgen.generate(load("dgx-h100-nps4"), tmp_path_factory.mktemp("nps4") / "root")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hostgen.generate(load("two-node-small"), tmp_path_factory.mktemp("small") / "root")


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    archive = next((path for path in CAPTURE_CANDIDATES if path.exists()), None)
    if archive is None:
        pytest.skip("the real H100 capture (h100-sxm5-vm/sysfs.tar.gz) is not available")
    dest = tmp_path_factory.mktemp("capture")
    return extract_archive(archive, dest)


@pytest.fixture(params=["dgx", "nps4", "small"])
def any_root(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


def read(root: Path, rel: str) -> str:
    return (root / rel).read_text().strip()


def pci(root: Path, bdf: str, attr: str) -> str:
    return read(root, f"sys/bus/pci/devices/{bdf}/{attr}")


def devices(root: Path) -> list[str]:
    return sorted(os.listdir(root / "sys/bus/pci/devices"))


def sriov_pfs(root: Path) -> list[str]:
    """The functions with an SR-IOV capability (a ``sriov_totalvfs`` file)."""
    return [bdf for bdf in devices(root) if (root / "sys/bus/pci/devices" / bdf / "sriov_totalvfs").exists()]


def link_base(path: Path) -> str:
    return os.path.basename(os.readlink(path))


def cpulist(text: str) -> set[int]:
    return set(hostgen.parse_cpulist(text))


def by_id(root: Path, vendor: str, device: str) -> list[str]:
    return [bdf for bdf in devices(root) if pci(root, bdf, "vendor") == vendor and pci(root, bdf, "device") == device]


def upstream_port(root: Path, bdf: str) -> str:
    """The switch upstream port above a function: its grandparent directory."""
    real = os.path.realpath(root / "sys/bus/pci/devices" / bdf)
    return os.path.basename(os.path.dirname(os.path.dirname(real)))


def all_links(root: Path) -> Iterator[Path]:
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            if path.is_symlink():
                yield path


# --------------------------------------------------------------------------------------------
# Layout invariants (every tree)


def test_every_symlink_is_relative_and_resolves_inside_the_root(any_root: Path) -> None:
    root = os.path.realpath(any_root)
    links = list(all_links(any_root))
    assert len(links) > 50
    for link in links:
        target = os.readlink(link)
        assert not target.startswith("/"), link
        resolved = os.path.realpath(link)
        assert resolved.startswith(root + os.sep), link
        assert os.path.exists(resolved), f"{link} -> {target} dangles"


def test_bus_entries_point_into_a_pci_hierarchy_under_sys_devices(any_root: Path) -> None:
    for bdf in devices(any_root):
        assert BDF.match(bdf)
        target = os.readlink(any_root / "sys/bus/pci/devices" / bdf)
        parts = target.split("/")
        assert parts[:4] == ["..", "..", "..", "devices"] and parts[-1] == bdf
        assert re.fullmatch(r"pci[0-9a-f]{4}:[0-9a-f]{2}", parts[4])
        assert all(BDF.match(part) for part in parts[5:])
        # every directory between the root and the device is a bridge whose secondary bus holds the child
        for parent, child in itertools.pairwise(parts[5:]):
            assert pci(any_root, parent, "class").startswith("0x0604")
            assert int(pci(any_root, parent, "secondary_bus_number")) == int(child[5:7], 16)


def test_iommu_groups_list_each_device_and_the_device_links_back(any_root: Path) -> None:
    groups_dir = any_root / "sys/kernel/iommu_groups"
    members: dict[str, str] = {}
    for group in os.listdir(groups_dir):
        for bdf in os.listdir(groups_dir / group / "devices"):
            assert bdf not in members, f"{bdf} is in two groups"
            members[bdf] = group
            device = groups_dir / group / "devices" / bdf
            assert os.path.realpath(device) == os.path.realpath(any_root / "sys/bus/pci/devices" / bdf)
    assert sorted(members) == devices(any_root)
    for bdf in devices(any_root):
        assert link_base(any_root / "sys/bus/pci/devices" / bdf / "iommu_group") == members[bdf]
    assert len(os.listdir(any_root / "sys/class/iommu")) == len(os.listdir(any_root / "sys/devices/virtual/iommu"))


def test_driver_links_agree_both_ways(any_root: Path) -> None:
    drivers = any_root / "sys/bus/pci/drivers"
    bound: dict[str, str] = {}
    for driver in os.listdir(drivers):
        for entry in os.listdir(drivers / driver):
            if BDF.match(entry):
                bound[entry] = driver
                assert os.path.realpath(drivers / driver / entry) == os.path.realpath(
                    any_root / "sys/bus/pci/devices" / entry)
    for bdf in devices(any_root):
        link = any_root / "sys/bus/pci/devices" / bdf / "driver"
        if link.is_symlink():
            assert link_base(link) == bound.pop(bdf)
            assert read(any_root, f"sys/bus/pci/devices/{bdf}/uevent").startswith(f"DRIVER={link_base(link)}\n")
    assert bound == {}


def test_config_space_agrees_with_the_attribute_files(any_root: Path) -> None:
    for bdf in devices(any_root):
        config = (any_root / "sys/bus/pci/devices" / bdf / "config").read_bytes()
        assert len(config) == 4096
        vendor, device = struct.unpack_from("<HH", config)
        if (any_root / "sys/bus/pci/devices" / bdf / "physfn").is_symlink():
            assert (vendor, device) == (0xFFFF, 0xFFFF)  # VFs read all ones
        else:
            assert (vendor, device) == (int(pci(any_root, bdf, "vendor"), 16), int(pci(any_root, bdf, "device"), 16))
        klass = int.from_bytes(config[9:12], "little")
        assert klass == int(pci(any_root, bdf, "class"), 16)
        if klass >> 8 == 0x0604:
            assert config[0x0E] & 0x7F == 1
            assert config[0x19] == int(pci(any_root, bdf, "secondary_bus_number"))
            assert config[0x1A] == int(pci(any_root, bdf, "subordinate_bus_number"))
        else:  # VFs too: the kernel reads a VF's subsystem IDs from its own registers
            assert struct.unpack_from("<HH", config, 0x2C) == (
                int(pci(any_root, bdf, "subsystem_vendor"), 16), int(pci(any_root, bdf, "subsystem_device"), 16))


def test_bars_sit_inside_the_windows_of_every_bridge_above(any_root: Path) -> None:
    checked = 0
    for bdf in devices(any_root):
        lines = pci(any_root, bdf, "resource").splitlines()
        is_bridge = pci(any_root, bdf, "class").startswith("0x0604")
        assert len(lines) == (17 if is_bridge else 13)
        real = os.path.realpath(any_root / "sys/bus/pci/devices" / bdf)
        bridges = [part for part in real.split("/") if BDF.match(part)][:-1]
        for line in lines[:13]:
            start, end, flags = (int(value, 16) for value in line.split())
            if not end:
                continue
            window = 13 if flags & 0x100 else 15 if flags & 0x2000 and flags & 0x100000 else 14
            for bridge in bridges:
                low, high, _ = (int(v, 16) for v in pci(any_root, bridge, "resource").splitlines()[window].split())
                assert low <= start <= end <= high, f"{bdf} {line} outside {bridge}"
            checked += 1
    assert checked > 10


def extended_capabilities(config: bytes) -> dict[int, int]:
    """Extended capability id -> offset, walking the chain from 0x100."""
    found: dict[int, int] = {}
    offset = 0x100
    while offset and len(found) < 32:
        (header,) = struct.unpack_from("<I", config, offset)
        if header == 0:
            break
        found[header & 0xFFFF] = offset
        offset = header >> 20
    return found


def test_sriov_capability_in_config_agrees_with_sysfs(any_root: Path) -> None:
    checked = 0
    for bdf in sriov_pfs(any_root):
        config = (any_root / "sys/bus/pci/devices" / bdf / "config").read_bytes()
        at = extended_capabilities(config)[0x0010]
        total, numvfs = struct.unpack_from("<H", config, at + 0x0E)[0], struct.unpack_from("<H", config, at + 0x10)[0]
        offset, stride, _, vf_device = struct.unpack_from("<HHHH", config, at + 0x14)
        assert total == int(pci(any_root, bdf, "sriov_totalvfs"))
        assert numvfs == int(pci(any_root, bdf, "sriov_numvfs"))
        assert (offset, stride) == (int(pci(any_root, bdf, "sriov_offset")), int(pci(any_root, bdf, "sriov_stride")))
        assert vf_device == int(pci(any_root, bdf, "sriov_vf_device"), 16)
        iov = pci(any_root, bdf, "resource").splitlines()[7]  # VF BAR0 region
        if int(iov.split()[1], 16):
            low, high = struct.unpack_from("<II", config, at + 0x24)
            assert (high << 32 | low & 0xFFFFFFF0) == int(iov.split()[0], 16)
        checked += 1
    assert checked > 0


def test_bars_are_naturally_aligned(any_root: Path) -> None:
    for bdf in devices(any_root):
        for line in pci(any_root, bdf, "resource").splitlines()[:13]:
            start, end, _ = (int(value, 16) for value in line.split())
            if end:
                size = end - start + 1
                assert size & (size - 1) == 0 and start % size == 0, f"{bdf} {line}"


def test_vf_numbers_follow_offset_and_stride(tmp_path: Path) -> None:
    description = load("two-node-small")
    description["device_types"]["cx6dx"]["sriov"].update(offset=4, stride=2)
    root = hostgen.generate(description, tmp_path / "root")
    pf = root / "sys/bus/pci/devices/0000:02:00.0"
    assert [link_base(pf / f"virtfn{i}") for i in range(2)] == ["0000:02:00.4", "0000:02:00.6"]
    assert pci(root, "0000:02:00.0", "sriov_stride") == "2"
    assert link_base(root / "sys/bus/pci/devices/0000:02:00.6/physfn") == "0000:02:00.0"


def test_sriov_links_are_consistent(any_root: Path) -> None:
    seen = 0
    for bdf in sriov_pfs(any_root):
        base = any_root / "sys/bus/pci/devices" / bdf
        count = int(pci(any_root, bdf, "sriov_numvfs"))
        assert count <= int(pci(any_root, bdf, "sriov_totalvfs"))
        virtfns = sorted(name for name in os.listdir(base) if name.startswith("virtfn"))
        assert len(virtfns) == count
        offset, stride = int(pci(any_root, bdf, "sriov_offset")), int(pci(any_root, bdf, "sriov_stride"))
        domain, bus, rest = bdf.split(":")
        rid = int(bus, 16) << 8 | int(rest[:2], 16) << 3 | int(rest[3])
        for index in range(count):
            vf = link_base(base / f"virtfn{index}")
            expected = rid + offset + stride * index
            assert vf == f"{domain}:{expected >> 8:02x}:{expected >> 3 & 0x1F:02x}.{expected & 7}"
            assert link_base(any_root / "sys/bus/pci/devices" / vf / "physfn") == bdf
            assert pci(any_root, vf, "device") == "0x" + pci(any_root, bdf, "sriov_vf_device")
            seen += 1
    assert seen > 0  # every topology pre-creates some VFs


def test_net_and_infiniband_class_links(any_root: Path) -> None:
    net = any_root / "sys/class/net"
    indexes = set()
    for name in os.listdir(net):
        target = os.readlink(net / name)
        assert target.endswith(f"/net/{name}")
        indexes.add(int(read(any_root, f"sys/class/net/{name}/ifindex")))
        if name != "lo":
            device = os.path.basename(os.path.realpath(net / name / "device"))
            assert name in os.listdir(any_root / "sys/bus/pci/devices" / device / "net")
            assert read(any_root, f"sys/class/net/{name}/type") in ("1", "32")
    assert len(indexes) == len(os.listdir(net)) and 1 in indexes
    for name in os.listdir(any_root / "sys/class/infiniband"):
        port = any_root / "sys/class/infiniband" / name / "ports/1"
        assert (port / "state").read_text().strip() in ("4: ACTIVE", "1: DOWN")
        assert re.fullmatch(r"fe80(:[0-9a-f]{4}){7}", (port / "gids/0").read_text().strip())
        assert (port / "pkeys/0").read_text().strip() == "0xffff"


def test_generation_is_deterministic(tmp_path: Path) -> None:
    description = load("two-node-small")
    first = hostgen.generate(description, tmp_path / "a")
    second = hostgen.generate(description, tmp_path / "b")

    def snapshot(root: Path) -> dict[str, bytes | str]:
        result: dict[str, bytes | str] = {}
        for directory, _, files in os.walk(root):
            for name in files:
                path = Path(directory) / name
                rel = str(path.relative_to(root))
                result[rel] = os.readlink(path) if path.is_symlink() else path.read_bytes()
        return result

    assert snapshot(first) == snapshot(second)


# --------------------------------------------------------------------------------------------
# The DGX H100 tree


def test_dgx_has_eight_h100_sxm_gpus_split_across_the_sockets(dgx: Path) -> None:
    gpus = by_id(dgx, "0x10de", "0x2330")
    assert gpus == DGX_GPUS
    for index, bdf in enumerate(gpus):
        assert pci(dgx, bdf, "subsystem_vendor") == "0x10de"
        assert pci(dgx, bdf, "subsystem_device") == "0x16c1"
        assert pci(dgx, bdf, "class") == "0x030200"
        assert link_base(dgx / "sys/bus/pci/devices" / bdf / "driver") == "nvidia"
        assert pci(dgx, bdf, "reset_method") == "flr bus"
        node = 0 if index < 4 else 1
        assert pci(dgx, bdf, "numa_node") == str(node)
        assert pci(dgx, bdf, "local_cpulist") == read(dgx, f"sys/devices/system/node/node{node}/cpulist")
        bars = [line.split() for line in pci(dgx, bdf, "resource").splitlines()]
        sizes = {i: int(end, 16) - int(start, 16) + 1 for i, (start, end, _) in enumerate(bars) if int(end, 16)}
        assert sizes == {0: 16 << 20, 2: 128 << 30, 4: 32 << 20}
        assert {bars[i][2] for i in sizes} == {"0x000000000014220c"}  # 64-bit prefetchable, as in the capture


def test_dgx_has_eight_connectx7_each_sharing_a_switch_with_its_gpu(dgx: Path) -> None:
    nics = [bdf for bdf in by_id(dgx, "0x15b3", "0x1021") if pci(dgx, bdf, "class") == "0x020700"]
    assert nics == DGX_NICS
    for gpu, nic in zip(DGX_GPUS, nics, strict=True):
        switch = upstream_port(dgx, gpu)
        assert switch == upstream_port(dgx, nic)
        assert (pci(dgx, switch, "vendor"), pci(dgx, switch, "device")) == ("0x1000", "0xc030")
        assert pci(dgx, nic, "numa_node") == pci(dgx, gpu, "numa_node")
        assert link_base(dgx / "sys/bus/pci/devices" / nic / "driver") == "mlx5_core"
        assert os.listdir(dgx / "sys/bus/pci/devices" / nic / "net") == [f"ibp{int(nic[5:7], 16)}s0"]
    assert len({upstream_port(dgx, gpu) for gpu in DGX_GPUS}) == 8
    ib = sorted(os.listdir(dgx / "sys/class/infiniband"))
    layers = [read(dgx, f"sys/class/infiniband/{name}/ports/1/link_layer") for name in ib]
    assert layers.count("InfiniBand") == 8


def test_dgx_nvswitches_and_host_devices(dgx: Path) -> None:
    nvswitches = by_id(dgx, "0x10de", "0x22a3")
    assert len(nvswitches) == 4
    for bdf in nvswitches:
        assert pci(dgx, bdf, "class") == "0x068000"
        assert link_base(dgx / "sys/bus/pci/devices" / bdf / "driver") == "nvidia-nvswitch"
    nvme = [bdf for bdf in devices(dgx) if pci(dgx, bdf, "class") == "0x010802"]
    assert len(nvme) == 10  # 2 M.2 boot + 8 U.2 data drives
    assert all(link_base(dgx / "sys/bus/pci/devices" / bdf / "driver") == "nvme" for bdf in nvme)
    assert (dgx / "sys/class/net/enp1s0f0").is_symlink()
    # the two ports of the management NIC lack ACS: one IOMMU group
    assert link_base(dgx / "sys/bus/pci/devices/0000:01:00.0/iommu_group") == link_base(
        dgx / "sys/bus/pci/devices/0000:01:00.1/iommu_group")
    # every GPU is alone in its group
    for gpu in DGX_GPUS:
        group = link_base(dgx / "sys/bus/pci/devices" / gpu / "iommu_group")
        assert os.listdir(dgx / "sys/kernel/iommu_groups" / group / "devices") == [gpu]


def test_dgx_cpu_topology(dgx: Path) -> None:
    cpu = dgx / "sys/devices/system/cpu"
    assert read(dgx, "sys/devices/system/cpu/online") == "0-223"
    assert len([name for name in os.listdir(cpu) if re.fullmatch(r"cpu\d+", name)]) == 224
    assert read(dgx, "sys/devices/system/cpu/cpu0/topology/thread_siblings_list") == "0,112"
    assert read(dgx, "sys/devices/system/cpu/cpu56/topology/thread_siblings_list") == "56,168"
    assert read(dgx, "sys/devices/system/cpu/cpu223/topology/thread_siblings_list") == "111,223"
    assert read(dgx, "sys/devices/system/cpu/cpu168/topology/physical_package_id") == "1"
    assert read(dgx, "sys/devices/system/cpu/cpu0/topology/package_cpus_list") == "0-55,112-167"
    mask = read(dgx, "sys/devices/system/cpu/cpu0/topology/thread_siblings")
    assert int(mask.replace(",", ""), 16) == 1 << 0 | 1 << 112 and len(mask.split(",")) == 7
    for number in range(224):
        siblings = cpulist(read(dgx, f"sys/devices/system/cpu/cpu{number}/topology/thread_siblings_list"))
        assert number in siblings and len(siblings) == 2
        for sibling in siblings:
            assert read(dgx, f"sys/devices/system/cpu/cpu{sibling}/topology/core_id") == read(
                dgx, f"sys/devices/system/cpu/cpu{number}/topology/core_id")
    assert read(dgx, "proc/cpuinfo").count("processor\t:") == 224
    assert not (cpu / "cpu0/online").exists() and read(dgx, "sys/devices/system/cpu/cpu1/online") == "1"


def test_dgx_numa_nodes(dgx: Path) -> None:
    node = dgx / "sys/devices/system/node"
    assert read(dgx, "sys/devices/system/node/online") == "0-1"
    assert read(dgx, "sys/devices/system/node/node0/cpulist") == "0-55,112-167"
    assert read(dgx, "sys/devices/system/node/node1/cpulist") == "56-111,168-223"
    assert read(dgx, "sys/devices/system/node/node0/distance") == "10 21"
    assert read(dgx, "sys/devices/system/node/node1/distance") == "21 10"
    meminfo = read(dgx, "sys/devices/system/node/node1/meminfo")
    assert re.search(r"^Node 1 MemTotal:\s+\d+ kB$", meminfo, re.MULTILINE)
    assert (node / "node0/hugepages/hugepages-1048576kB/nr_hugepages").read_text() == "256\n"
    assert (node / "node0/hugepages/hugepages-2048kB/free_hugepages").read_text() == "0\n"
    assert os.path.realpath(node / "node1/cpu56") == os.path.realpath(dgx / "sys/devices/system/cpu/cpu56")
    cmdline = read(dgx, "proc/cmdline")
    assert "intel_iommu=on" in cmdline.split() and "iommu=pt" in cmdline.split()
    assert (dgx / "sys/bus/pci/drivers/vfio-pci").is_dir()
    assert os.path.realpath(dgx / "sys/bus/pci/drivers/vfio-pci/module") == str(
        (dgx / "sys/module/vfio_pci").resolve())
    assert "vfio_pci " in read(dgx, "proc/modules")


def test_dgx_precreated_vfs_are_unbound_when_autoprobe_is_off(dgx: Path) -> None:
    pf = "0000:aa:00.0"
    assert pci(dgx, pf, "sriov_numvfs") == "4" and pci(dgx, pf, "sriov_drivers_autoprobe") == "0"
    vfs = [link_base(dgx / "sys/bus/pci/devices" / pf / f"virtfn{i}") for i in range(4)]
    assert vfs == ["0000:aa:00.2", "0000:aa:00.3", "0000:aa:00.4", "0000:aa:00.5"]
    for vf in vfs:
        assert not (dgx / "sys/bus/pci/devices" / vf / "driver").exists()
        assert pci(dgx, vf, "device") == "0x101e"
        assert not (dgx / "sys/bus/pci/devices" / vf / "sriov_totalvfs").exists()


def test_nps4_spreads_devices_over_four_nodes(nps4: Path) -> None:
    assert read(nps4, "sys/devices/system/node/online") == "0-3"
    expected = {0: "0-27,112-139", 1: "28-55,140-167", 2: "56-83,168-195", 3: "84-111,196-223"}
    for node, cpus in expected.items():
        assert read(nps4, f"sys/devices/system/node/node{node}/cpulist") == cpus
    rows = [read(nps4, f"sys/devices/system/node/node{node}/distance") for node in range(4)]
    assert rows == ["10 12 32 32", "12 10 32 32", "32 32 10 12", "32 32 12 10"]
    gpus = by_id(nps4, "0x10de", "0x2330")
    assert gpus == DGX_GPUS
    assert [pci(nps4, bdf, "numa_node") for bdf in gpus] == ["0", "0", "1", "1", "2", "2", "3", "3"]
    for bdf in gpus + DGX_NICS:
        node = pci(nps4, bdf, "numa_node")
        assert pci(nps4, bdf, "local_cpulist") == expected[int(node)]
    for nic, gpu in zip(DGX_NICS, gpus, strict=True):
        assert pci(nps4, nic, "numa_node") == pci(nps4, gpu, "numa_node")
    assert read(nps4, "sys/devices/system/cpu/cpu0/topology/thread_siblings_list") == "0,112"


# --------------------------------------------------------------------------------------------
# The small tree: ACS, vfio, isolated and offline CPUs, hugepages


def test_small_groups_follow_acs(small: Path) -> None:
    def group(bdf: str) -> str:
        return link_base(small / "sys/bus/pci/devices" / bdf / "iommu_group")

    assert group("0000:01:00.0") == group("0000:01:00.1")  # GPU + HDA audio, no ACS
    assert group("0000:02:00.0") != group("0000:02:00.1")  # ConnectX with ACS
    assert group("0000:02:00.2") not in (group("0000:02:00.0"), group("0000:02:00.3"))  # each VF alone
    shared = sorted(os.listdir(small / "sys/kernel/iommu_groups" / group("0000:83:00.0") / "devices"))
    assert shared == ["0000:82:00.0", "0000:82:01.0", "0000:83:00.0", "0000:84:00.0"]  # switch without ACS
    assert group("0000:81:00.0") not in (group("0000:80:01.0"), group("0000:83:00.0"))


def test_small_vfio_binding_and_unbound_device(small: Path) -> None:
    assert link_base(small / "sys/bus/pci/devices/0000:83:00.0/driver") == "vfio-pci"
    assert pci(small, "0000:83:00.0", "driver_override") == "vfio-pci"
    assert pci(small, "0000:84:00.0", "driver_override") == "(null)"
    assert not (small / "sys/bus/pci/devices/0000:85:00.0/driver").exists()
    assert pci(small, "0000:85:00.0", "enable") == "0"
    assert (small / "sys/module/vfio_pci/drivers/pci:vfio-pci").is_symlink()
    assert read(small, "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts") == "N"
    for vf in ("0000:02:00.2", "0000:02:00.3"):
        assert link_base(small / "sys/bus/pci/devices" / vf / "driver") == "mlx5_core"


def test_small_cpus_isolated_offline_and_hugepages(small: Path) -> None:
    assert read(small, "sys/devices/system/cpu/isolated") == "2-3,10-11"
    assert "isolcpus=2-3,10-11" in read(small, "proc/cmdline").split()
    assert read(small, "sys/devices/system/cpu/online") == "0-14"
    assert read(small, "sys/devices/system/cpu/offline") == "15"
    assert read(small, "sys/devices/system/cpu/cpu15/online") == "0"
    assert not (small / "sys/devices/system/cpu/cpu15/topology").exists()
    # offlining removes topology/ only; the node links go with hot-remove (drivers/base/cpu.c)
    assert (small / "sys/devices/system/cpu/cpu15/node1").resolve() == small / "sys/devices/system/node/node1"
    assert (small / "sys/devices/system/node/node1/cpu15").resolve() == small / "sys/devices/system/cpu/cpu15"
    assert read(small, "sys/devices/system/cpu/cpu7/topology/thread_siblings_list") == "7"
    assert read(small, "sys/devices/system/cpu/cpu3/topology/thread_siblings_list") == "3,11"
    assert read(small, "sys/devices/system/node/node1/cpulist") == "4-7,12-14"
    pages = small / "sys/devices/system/node/node0/hugepages"
    assert (pages / "hugepages-2048kB/nr_hugepages").read_text() == "512\n"
    assert (pages / "hugepages-2048kB/free_hugepages").read_text() == "500\n"
    assert read(small, "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") == "768"
    assert read(small, "sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages") == "3"
    meminfo = read(small, "proc/meminfo")
    assert re.search(r"^HugePages_Total:\s+768$", meminfo, re.MULTILINE)
    assert re.search(r"^Hugetlb:\s+5767168 kB$", meminfo, re.MULTILINE)
    # MemFree = MemTotal - used - hugepages, per node
    node0 = read(small, "sys/devices/system/node/node0/meminfo")
    free = int(re.search(r"MemFree:\s+(\d+)", node0)[1])  # type: ignore[index]
    assert free == 16777216 - 1048576 - 512 * 2048 - 2 * 1048576


def test_small_interfaces(small: Path) -> None:
    assert sorted(os.listdir(small / "sys/bus/pci/devices/0000:02:00.0/net")) == ["enp2s0f0np0"]
    assert read(small, "sys/class/net/enp2s0f1np1/operstate") == "down"
    assert read(small, "sys/class/net/enp2s0f1np1/speed") == "-1"
    assert read(small, "sys/class/net/enp2s0f0np0/phys_port_name") == "p0"
    assert read(small, "sys/class/net/enp2s0f0np0/type") == "1"
    assert re.fullmatch(r"b8:ce:f6(:[0-9a-f]{2}){3}", read(small, "sys/class/net/enp2s0f0np0/address"))
    assert sorted(os.listdir(small / "sys/class/infiniband")) == ["mlx5_0", "mlx5_1"]
    assert read(small, "sys/class/infiniband/mlx5_0/ports/1/link_layer") == "Ethernet"


# --------------------------------------------------------------------------------------------
# Cross-checks against the real capture


def capture_gpu(capture: Path) -> Path:
    return capture / "sys/bus/pci/devices/0000:00:06.0"


def test_gpu_has_every_attribute_the_real_h100_has(capture: Path, dgx: Path) -> None:
    real = set(os.listdir(capture_gpu(capture)))
    assert {"vendor", "config", "reset_method", "local_cpulist"} <= real
    ours = set(os.listdir(dgx / "sys/bus/pci/devices" / DGX_GPUS[0]))
    # firmware_node exists only for functions ACPI describes: the capture's GPU sits on the root bus
    assert real - {"firmware_node"} <= ours
    root_bus = set(os.listdir(dgx / "sys/bus/pci/devices/0000:00:01.0"))
    assert "firmware_node" in root_bus


def test_attribute_formats_match_the_capture(capture: Path, dgx: Path) -> None:
    real, ours = capture_gpu(capture), dgx / "sys/bus/pci/devices" / DGX_GPUS[0]
    # the same chip and link: these files must be byte-identical to the real H100's
    for name in ("vendor", "device", "subsystem_vendor", "subsystem_device", "class", "revision", "modalias",
                 "current_link_speed", "current_link_width", "max_link_speed", "max_link_width",
                 "driver_override", "power_state", "enable", "msi_bus", "d3cold_allowed", "dma_mask_bits",
                 "consistent_dma_mask_bits", "ari_enabled", "broken_parity_status"):
        assert (real / name).read_text() == (ours / name).read_text(), name
    # host-specific values keep the kernel's format
    shapes = {"numa_node": r"-?\d+\n", "irq": r"\d+\n", "local_cpulist": r"[\d,-]+\n",
              "local_cpus": r"[0-9a-f]{1,8}(,[0-9a-f]{8})*\n", "reset_method": r"[a-z_]+( [a-z_]+)*\n"}
    for name, shape in shapes.items():
        assert re.fullmatch(shape, (real / name).read_text()), name
        assert re.fullmatch(shape, (ours / name).read_text()), name
    assert (real / "uevent").read_text().replace("0000:00:06.0", DGX_GPUS[0]) == (ours / "uevent").read_text()
    real_config, our_config = (real / "config").read_bytes(), (ours / "config").read_bytes()
    assert len(real_config) == len(our_config) == 4096
    assert real_config[0:4] == our_config[0:4] and real_config[8:12] == our_config[8:12]  # ids, rev, class
    assert real_config[0x2C:0x30] == our_config[0x2C:0x30]  # subsystem 10de:16c1
    # the capture's BAR registers: BAR0, BAR2 and BAR4 are 64-bit prefetchable (low nibble 0xc)
    for offset in (0x10, 0x18, 0x20):
        assert real_config[offset] & 0xF == our_config[offset] & 0xF == 0xC
    for config in (real_config, our_config):  # both chain to a PCI Express capability (0x10)
        assert 0x10 in capability_ids(config)


def capability_ids(config: bytes) -> list[int]:
    ids, offset = [], config[0x34]
    while offset and len(ids) < 48:
        ids.append(config[offset])
        offset = config[offset + 1]
    return ids


def test_cpu_node_and_proc_files_match_the_capture(capture: Path, dgx: Path) -> None:
    topology = "sys/devices/system/cpu/cpu0/topology"
    assert set(os.listdir(capture / topology)) <= set(os.listdir(dgx / topology))
    for rel in ("sys/devices/system/node/node0", "sys/devices/system/node/node0/hugepages/hugepages-2048kB",
                "sys/devices/system/node/node0/hugepages/hugepages-1048576kB",
                "sys/kernel/mm/hugepages/hugepages-2048kB", "sys/devices/system/cpu"):
        real = {name for name in os.listdir(capture / rel) if not re.fullmatch(r"cpu\d+", name)}
        assert real <= set(os.listdir(dgx / rel)), rel
    # the kernel's column layout: re-render every captured meminfo line and compare byte for byte
    for line in (capture / "proc/meminfo").read_text().splitlines(keepends=True):
        name, value = line.split(":")[0], int(line.split(":")[1].split()[0])
        assert hostgen.meminfo_line(name, value) == line
    for line in (capture / "sys/devices/system/node/node0/meminfo").read_text().splitlines(keepends=True):
        match = re.match(r"Node (\d+) (\S+):\s+(\d+)", line)
        assert match is not None
        assert hostgen.node_meminfo_line(int(match[1]), match[2], int(match[3])) == line
    real_block = (capture / "proc/cpuinfo").read_text().split("\n\n")[0]
    our_block = (dgx / "proc/cpuinfo").read_text().split("\n\n")[0]
    assert [line.split(":")[0] for line in real_block.splitlines()] == [
        line.split(":")[0] for line in our_block.splitlines()]
    assert (capture / "sys/devices/system/node/node0/cpumap").read_text() == "ffff\n"
    assert hostgen.format_cpumask(range(16), 16) == "ffff"


def extended_capability_ids(config: bytes) -> list[int]:
    ids, offset = [], 0x100
    while offset and len(ids) < 48:
        header = int.from_bytes(config[offset:offset + 4], "little")
        if not header:
            break
        ids.append(header & 0xFFFF)
        offset = header >> 20
    return ids


def bus_bridge(root: Path, bdf: str) -> str | None:
    """The bridge whose secondary bus the function sits on (None on a root bus)."""
    parent = os.path.basename(os.path.dirname(os.path.realpath(root / "sys/bus/pci/devices" / bdf)))
    return None if parent.startswith("pci") else parent


def test_ari_enabled_is_the_state_of_the_functions_bus(capture: Path, any_root: Path) -> None:
    """``ari_enabled`` shows ``pci_ari_enabled(dev->bus)``: 1 on a bus whose function 0 has the ARI
    capability below a bridge (``pci_configure_ari``), 0 on a root bus (all of the capture's)."""
    for bdf in devices(capture):
        assert bus_bridge(capture, bdf) is None and pci(capture, bdf, "ari_enabled") == "0"
    seen = set()
    for bdf in devices(any_root):
        first = f"{bdf[:8]}00.0"
        expected = 0
        if bus_bridge(any_root, bdf) is not None and bus_bridge(any_root, first) == bus_bridge(any_root, bdf):
            config = (any_root / "sys/bus/pci/devices" / first / "config").read_bytes()
            expected = int(0x000E in extended_capability_ids(config))
        assert pci(any_root, bdf, "ari_enabled") == str(expected), bdf
        seen.add(expected)
    for pf in sriov_pfs(any_root):  # an SR-IOV PF's bus forwards ARI, the port above it sits on one that does not
        assert pci(any_root, pf, "ari_enabled") == "1"
        assert pci(any_root, str(bus_bridge(any_root, pf)), "ari_enabled") == "0"
    assert seen == {0, 1}


def test_a_function_without_an_interrupt_pin_reads_irq_0(capture: Path, any_root: Path) -> None:
    """The capture: the functions with Interrupt Pin 0 (host bridge, MSI-X-only virtio) read irq 0;
    a VF has no INTx (SR-IOV: Interrupt Pin RO 0)."""
    for root in (capture, any_root):
        pins = {}
        for bdf in devices(root):
            pins[bdf] = (root / "sys/bus/pci/devices" / bdf / "config").read_bytes()[0x3D]
            if pins[bdf] == 0:
                assert pci(root, bdf, "irq") == "0", bdf
            else:
                assert pci(root, bdf, "irq") != "0", bdf
        assert 0 in pins.values() and any(pins.values())
    for bdf in devices(any_root):
        if (any_root / "sys/bus/pci/devices" / bdf / "physfn").is_symlink():
            assert pci(any_root, bdf, "irq") == "0"


def test_a_root_without_a_node_reads_like_the_capture(capture: Path, tmp_path: Path) -> None:
    """No ``_PXM`` for a host bridge: ``numa_node`` -1, and the kernel then shows every online CPU as
    the device's ``local_cpulist`` (``cpu_online_mask``), as the capture's GPU does."""
    real = capture_gpu(capture)
    assert (real / "numa_node").read_text() == "-1\n"
    assert (real / "local_cpulist").read_text() == (capture / "sys/devices/system/cpu/online").read_text()
    description = load("two-node-small")
    description["pci_roots"][1]["node"] = -1
    description["cpu"].pop("offline", None)
    root = hostgen.generate(description, tmp_path / "root")
    gpu = root / "sys/bus/pci/devices/0000:83:00.0"
    assert (gpu / "numa_node").read_text() == "-1\n"
    online = (root / "sys/devices/system/cpu/online").read_text()
    assert (gpu / "local_cpulist").read_text() == online and cpulist(online) == set(range(16))
    assert (gpu / "local_cpus").read_text() == hostgen.format_cpumask(range(16), 16) + "\n"
    assert read(root, "sys/class/pci_bus/0000:80/cpulistaffinity") == online.strip()
    assert pci(root, "0000:02:00.0", "local_cpulist") == read(root, "sys/devices/system/node/node0/cpulist")


def test_amd_iommu_attributes_in_the_kernel_format(tmp_path: Path) -> None:
    """drivers/iommu/amd/init.c: ``cap`` is ``%x``, ``features`` ``%llx:%llx`` (EFR2:EFR), no 0x."""
    description = load("two-node-small")
    description["iommu"]["vendor"] = "amd"
    root = hostgen.generate(description, tmp_path / "root")
    unit = root / "sys/class/iommu/ivhd0/amd-iommu"
    assert re.fullmatch(r"[0-9a-f]+\n", (unit / "cap").read_text())
    assert re.fullmatch(r"[0-9a-f]+:[0-9a-f]+\n", (unit / "features").read_text())
    assert "amd_iommu=on" in read(root, "proc/cmdline").split()


def test_net_interface_attributes_match_the_capture(capture: Path, dgx: Path) -> None:
    real = set(os.listdir(capture / "sys/class/net/eth0"))
    ours = set(os.listdir(dgx / "sys/class/net/ibp24s0"))
    assert real <= ours
    assert set(os.listdir(capture / "sys/class/net/lo")) <= set(os.listdir(dgx / "sys/class/net/lo"))


# --------------------------------------------------------------------------------------------
# The project's own host model reads the generated trees


def test_host_model_reads_the_dgx_tree(dgx: Path) -> None:
    host_pci = pytest.importorskip("aifactory_core.host.pci")
    from aifactory_core.hostroot import HostRoot

    host = HostRoot(dgx)
    found = {device.address: device for device in host_pci.read_pci_devices(host)}
    assert len(found) == len(devices(dgx))
    gpu = found[DGX_GPUS[4]]
    assert (gpu.vendor_id, gpu.device_id, gpu.numa_node, gpu.driver) == (0x10DE, 0x2330, 1, "nvidia")
    assert gpu.parent == "0000:99:03.0" and gpu.iommu_group is not None
    assert sorted(bar.end - bar.start + 1 for bar in gpu.bars) == [16 << 20, 32 << 20, 128 << 30]
    assert found["0000:aa:00.0"].virtfns == ("0000:aa:00.2", "0000:aa:00.3", "0000:aa:00.4", "0000:aa:00.5")


# --------------------------------------------------------------------------------------------
# Helpers, errors and the command line


def test_cpulist_and_mask_helpers() -> None:
    assert hostgen.format_cpulist([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert hostgen.format_cpulist([]) == ""
    assert hostgen.parse_cpulist("0-3,8") == [0, 1, 2, 3, 8]
    assert hostgen.format_cpumask([0, 112], 224) == "00000000,00000000,00000000,00010000,00000000,00000000,00000001"
    assert hostgen.format_cpumask([0, 1], 40) == "00,00000003"
    assert hostgen.parse_size("128G") == 128 << 30 and hostgen.parse_size("16K") == 16384


def small_description() -> dict[str, Any]:
    return load("two-node-small")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["pci_roots"][0]["devices"][0].update(type="nope"), "unknown device type"),
        (lambda d: d["pci_roots"][1].update(bus="0x00"), "used twice"),
        (lambda d: d["device_types"]["cx6dx"]["sriov"].update(numvfs=9), "exceeds totalvfs"),
        (lambda d: d["device_types"]["nvme"]["bars"][0].update(size="3K"), "power of two"),
        (lambda d: d["numa"].update(memory_kib=[1024, 1024]), "exceed MemTotal"),
        (lambda d: d["cpu"].update(cores_per_socket=3, nodes_per_socket=2), "divide evenly"),
        (lambda d: d["pci_roots"][0]["devices"].append({"slot": 1, "type": "nvme"}), "two functions"),
        (lambda d: d["pci_roots"][0]["devices"].append({"slot": 9, "type": "nvme", "functions": 9}), "functions"),
    ],
)
def test_bad_descriptions_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    description = small_description()
    change(description)
    with pytest.raises(ValueError, match=message):
        hostgen.generate(description, tmp_path / "root")


def test_refuses_a_non_empty_destination(tmp_path: Path) -> None:
    (tmp_path / "leftover").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        hostgen.generate(small_description(), tmp_path)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert hostgen.main([str(TOPOLOGIES / "two-node-small.json"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out/sys/bus/pci/devices/0000:83:00.0").is_symlink()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cpu": {"cores_per_socket": 2}, "pci_roots": [{"bus": 0, "devices": [{"type": "x"}]}]}))
    assert hostgen.main([str(bad), str(tmp_path / "bad")]) == 1
    assert "unknown device type" in capsys.readouterr().err
