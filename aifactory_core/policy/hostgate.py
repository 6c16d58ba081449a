"""The host gate's view of a VM: what the host has at deploy, read into the request the frontend decides on.

At ``deploy`` the host has the deployment file (the owner in ``<one:vm>``, the ``<hostdev>``
functions: :class:`aifactory_core.model.DeployRequest`) and the full ``<VM>`` OpenNebula wrote to
``vm.xml`` beside it just before (owner, cluster, every PCI request with its TYPE, network and
VLAN, every NIC). :func:`host_request` turns them into the :class:`~aifactory_core.one.vm.VmRequest`
that :func:`aifactory_core.policy.decide.decide` takes on the frontend too, so both sides run one
decision on one shape. Two host facts replace the documents' word:

* each PCI device is what this host's sysfs says sits at its address (vendor, device, class);
* a hostdev that ``vm.xml`` does not list is decided as a plain passthrough device (it needs a
  device grant and counts as a GPU unless it is a network function).

Without ``vm.xml`` the owner comes from ``<one:vm>`` and every hostdev is a plain passthrough
device. Documents that contradict each other (another VM id, another owner) refuse the VM
(rule ``deployment``); so does a PCI address that is no function of this host (rule ``devices``).
:func:`gate` adds what the tenant already holds on this host to the request's GPUs
(:mod:`aifactory_core.policy.hostusage`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aifactory_core.host.inventory import HostInventory
    from aifactory_core.model import DeployRequest
    from aifactory_core.one.vm import PciRequest, VmRequest
    from aifactory_core.policy.decide import Decision, Usage
    from aifactory_core.policy.schema import Policy

Identity = tuple[int, int, int]  # vendor, device, class (base class and subclass: 0x0302)
Identify = Callable[[str], "Identity | None"]
MAX_VM_DOCUMENT = 8 * 1024 * 1024
LOCK_TIMEOUT = 60.0  # seconds a deploy waits for another deploy of the same tenant to be decided


class GateMismatch(Exception):
    """The deployment file, ``vm.xml`` and the host disagree: ``rule`` names what refuses the VM."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message


def sysfs_identity(inventory: HostInventory) -> Identify:
    """The host's own word on a PCI address: its sysfs vendor, device and class, or None. A short
    address (``17:00.0``, as SHORT_ADDRESS names a device) is looked up among all PCI domains and
    identified only when one function answers to it."""

    def identify(address: str) -> Identity | None:
        if len(address) == 7:
            found = [function for full, function in inventory.pci.items() if full[5:] == address]
            function = found[0] if len(found) == 1 else None
        else:
            function = inventory.pci.get(address)
        return None if function is None else (function.vendor_id, function.device_id, function.class_code >> 8)

    return identify


def read_vm_document(deploy: DeployRequest) -> VmRequest | None:
    """The ``vm.xml`` beside the deployment file, parsed hardened; None when there is none."""
    from aifactory_core.errors import DocumentError
    from aifactory_core.one.vm import parse_vm

    path = deploy.vm_document
    if path is None:
        return None
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_VM_DOCUMENT + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise GateMismatch("deployment", f"cannot read {path}: {error.strerror or error}") from None
    if len(data) > MAX_VM_DOCUMENT:
        raise GateMismatch("deployment", f"{path} is larger than {MAX_VM_DOCUMENT} bytes")
    try:
        return parse_vm(data, str(path))
    except DocumentError as error:
        raise GateMismatch("deployment", error.message) from None


def _plain_device(index: int, address: str, identity: Identity) -> PciRequest:
    from aifactory_core.one.vm import PciRequest

    vendor, device, device_class = identity
    return PciRequest(
        pci_id=index, type=None, address=address, short_address=address[5:], vendor=vendor, device=device,
        device_class=device_class, numa_node=None, nic_id=None, network=None, network_id=None, vlan_id=None,
        mac=None, phydev=None, vn_mad=None, vm_address=None, vm_bus=None, vm_bus_index=None, uuid=None,
        profile=None, mdev_mode=None,
    )  # fmt: skip


def _identified(address: str, identify: Identify) -> Identity:
    identity = identify(address)
    if identity is None:
        raise GateMismatch("devices", f"PCI device {address} is not a PCI function of this host")
    return identity


def _check_owner(deploy: DeployRequest, vm: VmRequest) -> None:
    if vm.vm_id != deploy.vm_id:
        raise GateMismatch("deployment", f"vm.xml describes VM {vm.vm_id}, not VM {deploy.vm_id}")
    differs = (deploy.gid is not None and deploy.gid != vm.gid) or (
        deploy.gname is not None and deploy.gname != vm.gname)  # fmt: skip
    if differs:
        raise GateMismatch("deployment", f"the deployment file's owner (group {deploy.gname or deploy.gid}) is "
                                         f"not vm.xml's (group {vm.gname or vm.gid})")  # fmt: skip


def host_request(deploy: DeployRequest, vm_document: VmRequest | None, identify: Identify,
                 cluster_id: int | None = None) -> VmRequest:
    """The VM as the frontend's decision takes it, from what the host has (see the module docstring).

    ``cluster_id`` (this host's cluster from the configuration) stands in when ``vm.xml`` names
    none. Raises :class:`GateMismatch` when the documents or the host contradict each other."""
    from aifactory_core.one.vm import VmRequest
    from aifactory_core.policy.decide import resolve_addresses

    if vm_document is None:
        if deploy.uid is None and deploy.gid is None and deploy.gname is None and deploy.pci_addresses:
            raise GateMismatch("tenant", "the deployment file has no <one:vm> owner and there is no vm.xml "
                                         "beside it, so the owner is unknown")  # fmt: skip
        pci = tuple(_plain_device(index, address, _identified(address, identify))
                    for index, address in enumerate(deploy.pci_addresses))  # fmt: skip
        return VmRequest(
            vm_id=deploy.vm_id, name=None, uid=deploy.uid, gid=deploy.gid, uname=deploy.uname, gname=deploy.gname,
            state=None, lcm_state=None, deploy_id=None, host=None, host_id=None, cluster_id=cluster_id, pci=pci,
            nics=(), topology=None, numa_nodes=(), vcpu=None, cpu=None, memory_mib=None, hugepage_size=None,
            template_id=None,
        )  # fmt: skip
    _check_owner(deploy, vm_document)
    listed: list[PciRequest] = []
    for item in resolve_addresses(vm_document, identify).pci:
        if item.address is None:
            listed.append(item)  # not allocated: decided by what it selects (or the device at SHORT_ADDRESS)
            continue
        vendor, device, device_class = _identified(item.address, identify)
        listed.append(replace(item, vendor=vendor, device=device, device_class=device_class))
    described = {item.address for item in vm_document.pci}
    extra = [address for address in deploy.pci_addresses if address not in described]
    listed += [_plain_device(len(listed) + index, address, _identified(address, identify))
               for index, address in enumerate(extra)]  # fmt: skip
    cluster = vm_document.cluster_id if vm_document.cluster_id is not None else cluster_id
    return replace(vm_document, pci=tuple(listed), cluster_id=cluster)


def decide_on_host(policy: Policy, deploy: DeployRequest, vm_document: VmRequest | None, identify: Identify,
                   cluster_id: int | None = None, usage: Usage | None = None) -> Decision:
    """The frontend's decision on the host's view of the VM; a contradiction is a refusal."""
    from aifactory_core.policy.decide import Decision, Refusal, decide

    try:
        request = host_request(deploy, vm_document, identify, cluster_id)
    except GateMismatch as mismatch:
        return Decision(None, (Refusal(mismatch.rule, mismatch.message),))
    return decide(policy, request, usage)


def gate(policy: Policy, deploy: DeployRequest, inventory: HostInventory, cluster_id: int | None = None,
         lock_timeout: float = LOCK_TIMEOUT) -> Decision:
    """The deploy wrapper's decision: ``vm.xml`` read from beside the deployment file, devices
    identified by this host's sysfs, and the GPUs the tenant's other VMs hold on this host counted
    against its cap (:mod:`aifactory_core.policy.hostusage`).

    Counting, deciding and taking the devices run under the group's lock in the tenancy directory:
    an admitted VM's tenancy is recorded and its hostdevs are claimed in the ownership records at
    once, so a second deploy of the same tenant waits and then counts them. (Prepare claims the
    same devices again, idempotently; a failed prepare, a failed start and release give them back.)"""
    from aifactory_core.lifecycle import ownership
    from aifactory_core.policy.admission import group_lock
    from aifactory_core.policy.decide import Decision, Refusal, decide
    from aifactory_core.policy.hostusage import forget_released, held_usage, record_tenancy, tenancy_dir

    identify = sysfs_identity(inventory)
    try:
        request = host_request(deploy, read_vm_document(deploy), identify, cluster_id)
    except GateMismatch as mismatch:
        return Decision(None, (Refusal(mismatch.rule, mismatch.message),))
    if not deploy.pci_addresses:
        return decide(policy, request)
    host = inventory.host
    documents = None if deploy.vm_document is None else deploy.vm_document.parent.parent
    with group_lock(tenancy_dir(host), request.gid if request.gid is not None else -1, lock_timeout):
        usage = held_usage(host, policy, lambda address: is_gpu_identity(identify(address)), documents)
        decision = decide(policy, request, usage)
        if decision.admitted:
            record_tenancy(host, request.vm_id, request.gid, request.gname)
            for address in deploy.pci_addresses:
                ownership.claim(host, address, request.vm_id)
            forget_released(host, request.vm_id)
        return decision


def is_gpu_identity(identity: Identity | None) -> bool:
    """A held function counts as a GPU unless sysfs says it is a network function (base class 0x02)."""
    from aifactory_core.model import PCI_CLASS_NETWORK

    return identity is not None and identity[2] >> 8 != PCI_CLASS_NETWORK
