"""A stand-in device plugin for the real-oned lifecycle matrix (``tests/oned/test_oned_lifecycle.py``).

No PCI function can be passed through on the test machine, so the VMs there take no hostdev; this
plugin makes the suite claim a device for each of them anyway, through the built-in ``pci_driver``
action, exactly as the vfio plugin claims a passthrough function: the VM's journal, its ownership
record and the release on every exit path are the suite's own. The device is
``AIFACTORY_TEST_STANDIN_DEVICE`` of the node's host root (a copy of the bundled capture where that
function already sits on vfio-pci, so the action's moves are the no-ops the kernel would make for a
function found on vfio-pci: what is under test is the bookkeeping around them).
"""

from __future__ import annotations

import os
from typing import Any

from aifactory_core.hookspecs import hookimpl
from aifactory_core.model import Action, DeployRequest

AIFACTORY_API_VERSION = 1
ENV_DEVICE = "AIFACTORY_TEST_STANDIN_DEVICE"


@hookimpl
def aifactory_prepare(inventory: Any, request: Any) -> list[Action] | None:
    address = os.environ.get(ENV_DEVICE)
    if not address or not isinstance(request, DeployRequest):
        return None
    driver = inventory.pci[address].driver or ""
    return [Action("pci_driver", address, "vfio-pci", driver, f"stand-in device of VM {request.vm_id}")]
