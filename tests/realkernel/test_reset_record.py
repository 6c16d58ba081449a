"""The reset record on a real kernel: releasing a function from vfio-pci resets it through the
kernel's ``reset`` attribute and records the outcome with the method the kernel tried first."""

from __future__ import annotations

from pathlib import Path

import pytest
from testhost.guest import PCI, driver_of, read

pytestmark = pytest.mark.realkernel


def test_release_records_the_reset_outcome_and_method(state_dir: Path, e1000e_bdf: str) -> None:
    from aifactory_core.host.sanitize import reset_history
    from aifactory_core.hostroot import HostRoot
    from aifactory_core.lifecycle import executor
    from aifactory_core.model import Action

    host = HostRoot(Path("/"), state_dir)
    methods = read(PCI / e1000e_bdf / "reset_method").split()
    assert methods, "the e1000e offers no reset method: nothing to record against"
    executor.prepare(host, 61, [Action("pci_driver", e1000e_bdf, "vfio-pci", "e1000e", "VM 61")])
    assert driver_of(e1000e_bdf) == "vfio-pci"
    assert executor.release(host, 61)
    assert driver_of(e1000e_bdf) == "e1000e"
    [(stamp, result, method, reason)] = reset_history(host, e1000e_bdf)
    assert (result, method, reason) == ("OK", methods[0], "")
    assert stamp.endswith("Z") and read(PCI / e1000e_bdf / "reset_method").split() == methods
