"""vfio-pci bind/unbind and PCI SR-IOV on real drivers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from testhost.guest import PCI, bind, driver_of, iommu_group, read, wait_for, write

pytestmark = pytest.mark.realkernel


def test_e1000e_binds_to_vfio_pci_and_returns(e1000e_bdf: str) -> None:
    assert driver_of(e1000e_bdf) == "e1000e"
    group = iommu_group(e1000e_bdf)
    bind(e1000e_bdf, "vfio-pci")
    try:
        assert driver_of(e1000e_bdf) == "vfio-pci"
        wait_for(lambda: Path(f"/dev/vfio/{group}").exists(), f"/dev/vfio/{group}")
        assert not (PCI / e1000e_bdf / "net").exists()
    finally:
        bind(e1000e_bdf, None)
    wait_for(lambda: driver_of(e1000e_bdf) == "e1000e", "e1000e to rebind")
    assert read(PCI / e1000e_bdf / "driver_override") == "(null)"
    wait_for(lambda: (PCI / e1000e_bdf / "net").exists(), "the e1000e netdev to come back")


def test_nvme_pf_creates_two_vfs_and_a_vf_binds_to_vfio_pci(nvme_pf: str) -> None:
    pf = PCI / nvme_pf
    assert int(read(pf / "sriov_totalvfs")) >= 2
    write(pf / "sriov_drivers_autoprobe", "0")  # keep the nvme driver off the VFs
    write(pf / "sriov_numvfs", "2")
    vf = None
    try:
        vfs = [os.path.basename(os.readlink(pf / f"virtfn{i}")) for i in range(2)]
        assert read(pf / "sriov_numvfs") == "2"
        assert all(os.path.basename(os.readlink(PCI / v / "physfn")) == nvme_pf for v in vfs)
        vf = vfs[0]
        bind(vf, "vfio-pci")
        assert driver_of(vf) == "vfio-pci"
        group = iommu_group(vf)
        assert Path(f"/dev/vfio/{group}").exists()
    finally:
        if vf is not None and driver_of(vf) is not None:
            write(PCI / vf / "driver" / "unbind", vf)
            write(PCI / vf / "driver_override", "\n")
        write(pf / "sriov_numvfs", "0")
        write(pf / "sriov_drivers_autoprobe", "1")
    assert read(pf / "sriov_numvfs") == "0"
    assert not (pf / "virtfn0").exists()
