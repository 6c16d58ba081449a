"""Real libvirtd in the test host: CPU/NUMA pinning read back from /proc, and a vfio hostdev."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from testhost.guest import Virsh, read

pytestmark = pytest.mark.realkernel

DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu placement='static' cpuset='{cpuset}'>2</vcpu>
  {tuning}
  <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='network'/></os>
  <features><acpi/><apic/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <console type='pty'/>
    <memballoon model='none'/>
    {devices}
  </devices>
</domain>
"""

PINNING = """<cputune>
    <vcpupin vcpu='0' cpuset='2'/>
    <vcpupin vcpu='1' cpuset='3'/>
    <emulatorpin cpuset='2-3'/>
  </cputune>
  <numatune><memory mode='strict' nodeset='1'/></numatune>"""

HOSTDEV = """<hostdev mode='subsystem' type='pci' managed='no'>
      <driver name='vfio'/>
      <source><address domain='0x{domain}' bus='0x{bus}' slot='0x{slot}' function='0x{function}'/></source>
    </hostdev>"""


@pytest.fixture
def started(libvirt_conn: Virsh) -> Iterator[list[str]]:
    """Define+start domains from XML; destroy and undefine them afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        if "running" in libvirt_conn("domstate", name):
            libvirt_conn("destroy", name)
        libvirt_conn("undefine", name)


def start_domain(virsh: Virsh, names: list[str], xml: str) -> int:
    name = re.search(r"<name>(.*)</name>", xml).group(1)  # type: ignore[union-attr]
    with tempfile.NamedTemporaryFile("w", suffix=".xml") as f:
        f.write(xml)
        f.flush()
        virsh("define", f.name)
    names.append(name)
    virsh("start", name, timeout=180)
    assert virsh("domstate", name).strip() == "running"
    return virsh.qemu_pid(name)


def status_field(path: Path, field: str) -> str:
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{field} not in {path}")


def test_pinned_domain_threads_follow_vcpupin_emulatorpin_numatune(libvirt_conn: Virsh, started: list[str]) -> None:
    pid = start_domain(libvirt_conn, started, DOMAIN.format(name="rk-pin", cpuset="2-3", tuning=PINNING, devices=""))

    vcpu_affinity = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        comm = read(task / "comm")
        if m := re.fullmatch(r"CPU (\d+)/TCG", comm):
            vcpu_affinity[int(m.group(1))] = status_field(task / "status", "Cpus_allowed_list")
    assert vcpu_affinity == {0: "2", 1: "3"}
    assert status_field(Path(f"/proc/{pid}/status"), "Cpus_allowed_list") == "2-3"  # emulator thread
    assert status_field(Path(f"/proc/{pid}/status"), "Mems_allowed_list") == "1"
    assert "2" in libvirt_conn("vcpupin", "rk-pin", "0")


def test_domain_with_unmanaged_vfio_hostdev_starts(
    libvirt_conn: Virsh, e1000e_on_vfio: str, started: list[str]
) -> None:
    # Fixture order matters: `started` is torn down first (domain destroyed) and only then is
    # the e1000e unbound from vfio-pci; unbinding a device QEMU still holds blocks forever.
    domain, bus, slot_fn = e1000e_on_vfio.split(":")
    slot, function = slot_fn.split(".")
    hostdev = HOSTDEV.format(domain=domain, bus=bus, slot=slot, function=function)
    pid = start_domain(
        libvirt_conn, started, DOMAIN.format(name="rk-hostdev", cpuset="0-3", tuning="", devices=hostdev)
    )

    cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    assert re.search(rf'"driver":"vfio-pci","host":"{re.escape(e1000e_on_vfio)}"', cmdline), cmdline
    assert e1000e_on_vfio in libvirt_conn("dumpxml", "rk-hostdev") or bus in libvirt_conn("dumpxml", "rk-hostdev")
