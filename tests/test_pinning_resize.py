"""A VM the cpu_pinning plugin pinned keeps its pins when OpenNebula resizes it live.

``onevm resize`` with more vCPUs runs the driver's ``resize`` action, which calls
``virsh setvcpus <domain> <VCPU> --live --hotpluggable`` (``src/vmm_mad/remotes/kvm/resize``,
7.0.2 and 7.4.0). The suite does not wrap ``resize``: at deploy it pinned every vCPU the domain
can have (``<vcpu current='1'>2</vcpu>``: two), and libvirt gives a plugged-in vCPU the
``vcpupin`` of its number. Checked on a real libvirt and QEMU (TCG) on this machine: the new vCPU
thread runs on exactly the CPU planned for it, not on the VM's whole ``cpuset``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from aifactory_plugins.cpu_pinning.domain_rewrite import rewrite_domain
from aifactory_plugins.cpu_pinning.planner import HostUsage, Placement, plan
from aifactory_plugins.cpu_pinning.spec import Policies, spec_from_domain
from aifactory_plugins.cpu_pinning.topology import HostTopology
from libvirt_session import session

from aifactory_core.cpulist import parse_cpulist
from aifactory_core.domain import dump_domain, load_domain
from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot

DOMAIN = """<domain type='qemu'><name>resize-pin</name><memory unit='MiB'>128</memory>
<vcpu current='1'>2</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>"""


def _vcpu_threads(pid: int) -> dict[int, frozenset[int]]:
    """QEMU's vCPU threads (``CPU <n>/TCG``) and the CPUs each may run on."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = (task / "comm").read_text().strip()
        match = re.fullmatch(r"CPU (\d+)/(?:TCG|KVM)", name)
        if match:
            allowed = re.search(r"^Cpus_allowed_list:\s*(\S+)", (task / "status").read_text(), re.MULTILINE)
            assert allowed is not None
            threads[int(match[1])] = parse_cpulist(allowed[1], "Cpus_allowed_list")
    return threads


def test_a_vcpu_plugged_in_by_a_live_resize_runs_where_it_was_planned() -> None:
    host = HostRoot(Path("/"))
    topology = HostTopology.from_inventory(HostInventory(host))
    domain = load_domain(DOMAIN.encode())
    placement = plan(topology, HostUsage(), spec_from_domain(domain, 1, [], {}, Policies()))
    assert isinstance(placement, Placement), placement
    rewrite_domain(domain, placement)
    pins = {int(pin.get("vcpu")): parse_cpulist(pin.get("cpuset"), "") for pin in domain.findall("cputune/vcpupin")}
    assert sorted(pins) == [0, 1] and domain.find("vcpu").get("current") == "1"
    if pins[1] == placement.all_vcpu_cpus:
        import pytest

        pytest.skip("this machine has one CPU for VMs: a pin and the VM's cpuset cannot differ")

    with session() as (work, virsh):
        path = work / "resize-pin.xml"
        path.write_bytes(dump_domain(domain))
        path.chmod(0o644)
        for args in (("define", str(path)), ("start", "resize-pin")):
            done = virsh(*args)
            assert done.returncode == 0, done.stderr
        try:
            pid = int((work / "session/libvirt/qemu/run/resize-pin.pid").read_text())
            assert sorted(_vcpu_threads(pid)) == [0]
            # what OpenNebula's resize action runs for VCPU = 2
            done = virsh("setvcpus", "resize-pin", "2", "--live", "--hotpluggable")
            assert done.returncode == 0, done.stderr
            deadline = time.monotonic() + 30
            while len(_vcpu_threads(pid)) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            threads = _vcpu_threads(pid)
            assert threads == {0: pins[0], 1: pins[1]}, threads
        finally:
            virsh("destroy", "resize-pin")
            virsh("undefine", "resize-pin")
