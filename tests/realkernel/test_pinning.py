"""The planned domain on the real kernel: plan the e1000e's VM from the live host model (2 NUMA
nodes, the e1000e behind a pxb-pcie on node 1), start the rewritten domain in real libvirt, and
read each QEMU vCPU thread's Cpus_allowed_list and the process's Mems_allowed_list back."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from testhost.guest import Virsh, read

pytestmark = pytest.mark.realkernel


def _status(path: Path, field: str) -> str:
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{field} not in {path}")


@pytest.fixture
def domain_name(libvirt_conn: Virsh) -> Iterator[str]:
    name = "rk-pinning"
    yield name
    if "running" in libvirt_conn("domstate", name):
        libvirt_conn("destroy", name)
    libvirt_conn("undefine", name)


def test_planned_domain_runs_where_the_plan_says(libvirt_conn: Virsh, e1000e_on_vfio: str, domain_name: str) -> None:
    from aifactory_plugins.cpu_pinning.domain_rewrite import minimal_domain
    from aifactory_plugins.cpu_pinning.planner import HostUsage, Placement, VmSpec, plan
    from aifactory_plugins.cpu_pinning.topology import HostTopology
    from lxml import etree

    from aifactory_core.cpulist import format_cpulist
    from aifactory_core.domain import dump_domain
    from aifactory_core.host.inventory import HostInventory
    from aifactory_core.hostroot import HostRoot

    inventory = HostInventory(HostRoot(Path("/")))
    topology = HostTopology.from_inventory(inventory)
    assert topology.node_of_device(e1000e_on_vfio) == 1
    spec = VmSpec(1, 1, 128 * 1024, emulator_policy="isolate", nics=(e1000e_on_vfio,))
    placement = plan(topology, HostUsage(), spec)
    assert isinstance(placement, Placement) and placement.local and placement.memory_nodes == (1,)

    domain = minimal_domain(placement, domain_name)
    domain.set("type", "qemu")  # TCG in the test host
    cpu = domain.find("cpu")
    cpu.set("mode", "custom")
    etree.SubElement(cpu, "model", fallback="allow").text = "qemu64"
    cpu.insert(0, cpu[-1])
    devices = domain.find("devices")
    devices.insert(0, etree.Element("emulator"))
    devices[0].text = "/usr/bin/qemu-system-x86_64"
    etree.SubElement(devices, "memballoon", model="none")
    for hostdev in devices.findall("hostdev"):
        hostdev.set("managed", "no")
        hostdev.insert(0, etree.Element("driver", name="vfio"))
    with tempfile.NamedTemporaryFile("wb", suffix=".xml") as handle:
        handle.write(dump_domain(domain))
        handle.flush()
        libvirt_conn("define", handle.name)
    libvirt_conn("start", domain_name, timeout=180)
    pid = libvirt_conn.qemu_pid(domain_name)

    vcpu_affinity = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        if match := re.fullmatch(r"CPU (\d+)/TCG", read(task / "comm")):
            vcpu_affinity[int(match.group(1))] = _status(task / "status", "Cpus_allowed_list")
    expected = {index: format_cpulist(cpus) for index, cpus in enumerate(placement.vcpu_cpus)}
    assert vcpu_affinity == expected
    assert _status(Path(f"/proc/{pid}/status"), "Cpus_allowed_list") == format_cpulist(placement.emulator_cpus)
    assert _status(Path(f"/proc/{pid}/status"), "Mems_allowed_list") == format_cpulist(placement.memory_nodes)
    assert not placement.emulator_cpus & placement.all_vcpu_cpus
    cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    assert "pxb-pcie" in cmdline and '"numa_node":0' in cmdline  # the guest sees the device on its cell
