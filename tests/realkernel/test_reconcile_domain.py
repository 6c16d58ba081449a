"""Reconciliation on a real kernel and a real libvirtd: a domain one-<id> started through the deploy
path with the e1000e, destroyed outside OpenNebula (no driver action), is reconciled: the e1000e is
back on its driver and no record is left; while it runs, nothing is touched, the kernel shows its
QEMU holding the function's VFIO group, and an unprivileged user (as the vm/monitor probe runs) can
list libvirt's directory of running domains."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from testhost.guest import driver_of, wait_for

pytestmark = pytest.mark.realkernel

VM = 78


def test_a_domain_destroyed_outside_opennebula_is_reconciled(state_dir: Path, e1000e_bdf: str,
                                                            libvirt_conn) -> None:  # noqa: ANN001
    from aifactory_core.config import Config
    from aifactory_core.host.domains import running_vms
    from aifactory_core.host.vfio_users import users
    from aifactory_core.hostroot import HostRoot
    from aifactory_core.lifecycle import ownership
    from aifactory_core.lifecycle.journal import Journal
    from aifactory_core.lifecycle.reconcile import reconcile
    from aifactory_core.vmm import prepare_deploy

    domain, bus, slot, function = e1000e_bdf.replace(".", ":").split(":")
    name = f"one-{VM}"
    xml = f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
      <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='network'/></os>
      <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
        <hostdev mode='subsystem' type='pci' managed='yes'><driver name='vfio'/>
          <source><address domain='0x{domain}' bus='0x{bus}' slot='0x{slot}' function='0x{function}'/></source>
        </hostdev><memballoon model='none'/></devices></domain>"""
    host = HostRoot(Path("/"), state_dir)
    rewritten, _network = prepare_deploy(host, Config(), xml.encode(), VM)
    path = state_dir / f"{name}.xml"
    path.write_bytes(rewritten)
    try:
        libvirt_conn("create", str(path))  # transient, as OpenNebula creates its domains
        assert VM in running_vms(host)
        # what the vm/monitor probe reads as oneadmin: libvirt's directory lists for an unprivileged user
        listing = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls",
                                  "/run/libvirt/qemu"], capture_output=True, text=True, check=False)
        assert listing.returncode == 0 and f"{name}.pid" in listing.stdout.split(), listing
        holders = users(host, e1000e_bdf)
        assert holders and holders[0][1].startswith("qemu"), holders
        report = reconcile(host)
        assert (report.released, report.running, report.problems) == ([], [VM], [])
        assert driver_of(e1000e_bdf) == "vfio-pci" and ownership.held_devices(host) == {e1000e_bdf: VM}
    finally:
        subprocess.run(["virsh", "-c", "qemu:///system", "destroy", name], capture_output=True)
        wait_for(lambda: name not in libvirt_conn("list", "--name"), "the domain to go")
    assert VM not in running_vms(host)
    report = reconcile(host)  # what the vm/monitor probe starts: 'aifactory repair --reconcile'
    assert (report.released, report.problems) == ([VM], []), report
    assert driver_of(e1000e_bdf) == "e1000e"
    assert ownership.held_devices(host) == {} and Journal.load(host, VM) is None
    assert not list((state_dir / "vms").glob("*.json"))
