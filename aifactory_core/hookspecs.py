"""The public plugin API: every point where the suite acts, as pluggy hook specifications.

A plugin is a module (or object) with functions named like the specs below, decorated with
:data:`hookimpl`, registered through the ``aifactory.plugins`` entry-point group::

    [project.entry-points."aifactory.plugins"]
    acme_gpu = "acme_aifactory.plugin"

Each plugin module declares the API version it targets as ``AIFACTORY_API_VERSION = 1``; the
plugin manager refuses plugins built for a newer API than this core provides. Implementations may
accept a subset of a spec's arguments (pluggy passes only those they name).

A plugin that implements none of the deploy hooks (``aifactory_admit``, ``aifactory_prepare``,
``aifactory_domain_xml``) may say so with an entry point of the same name and value in the group
``aifactory.no_deploy_hooks``; the VMM wrapper then deploys a VM without devices without loading
any plugin (:mod:`aifactory_core.vmm_fast`). While any other plugin is installed every deploy
loads them all. The plugin manager refuses a plugin that declares this and implements one.

Call order: pluggy calls implementations last-registered-first; the plugin manager registers in
reverse of the configured order so that ``[plugins] order = ["a", "b"]`` calls ``a`` before ``b``.
Hooks marked *firstresult* stop at the first implementation that returns something other than
``None``; the others collect every non-``None`` result into a list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from aifactory_core.config import Config
    from aifactory_core.host.inventory import HostInventory
    from aifactory_core.model import Action, Check, DiscoveredDevice, ProbeAttribute

PROJECT = "aifactory"
API_VERSION = 1
"""The hook API this core provides. Bumped on any incompatible change to a spec below."""

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def aifactory_configure(config: Config, name: str, section: Mapping[str, Any]) -> None:
    """Called once after loading, with the plugin's own ``[plugin.NAME]`` table as ``section``.

    Validate it here and raise :class:`aifactory_core.errors.ConfigError` naming the bad key.
    Every plugin receives every call; compare ``name`` with your own plugin name.
    """


@hookspec
def aifactory_discover_devices(inventory: HostInventory) -> Iterable[DiscoveredDevice] | None:
    """Device discovery: return the devices this plugin recognises on the host.

    ``inventory`` is the host model (PCI functions, NUMA nodes, CPUs, interfaces, IOMMU groups).
    Return :class:`~aifactory_core.model.DiscoveredDevice` objects — ``kind`` ``gpu``, ``nic``,
    ``dpu``, ``nvswitch``, ... — with companions (other functions of the same device that must
    travel with it, such as a GPU's audio function). Called by ``inventory``, ``doctor`` and the
    probes. A function claimed by several plugins is kept from the first in call order.
    """


@hookspec
def aifactory_device_health(
    inventory: HostInventory, device: DiscoveredDevice
) -> Iterable[ProbeAttribute] | None:
    """Device health: readings and a verdict for one device this plugin owns (else ``None``).

    Shown by ``aifactory inventory`` for each device (the built-in ``nvidia_gpu`` plugin answers for
    NVIDIA GPUs and NVSwitches from the host side). The IM probes do not load the plugin manager;
    they reach vendor devices through :func:`aifactory_probe_devices`."""


@hookspec
def aifactory_probe_devices(root: Any) -> Iterable[Any] | None:
    """The IM probes' and ``aifactory metrics``' view of a vendor's devices: each device's health
    verdict, extra host-template attributes and Prometheus metrics.

    Lean by contract, because the probes run every monitoring cycle on every host under a start-up
    budget: it is *not* called through pluggy. The probes find the module through the entry-point
    group ``aifactory.probes`` (a cached scan, not ``importlib.metadata``:
    :mod:`aifactory_core.probes.plugins`), check its ``AIFACTORY_PROBE_API = 1`` and call the
    module-level function directly. The module may import only the standard library modules
    ``python3 -S`` has loaded and :mod:`aifactory_core.probes.api` / :mod:`aifactory_core.probes.sysfs`
    (no pluggy, no host model, no config); it must return quickly and never block.

    ``root`` is an :class:`aifactory_core.probes.sysfs.Root` (``text``, ``number``, ``listdir``,
    ``link_name`` under the host root; ``pci_functions``, ``pci_ids``, ``pci_driver`` read it, and
    answer from what the probe has already read in this run: the function list and each function's
    ``uevent`` are read once, whoever asks first).
    Return :class:`aifactory_core.probes.api.ProbeDevice` objects (address, kind, model, health
    ``OK``/``DEGRADED``/``FAILED`` and reason, attributes, :class:`~aifactory_core.probes.api.Metric`
    samples in base units); the probe adds ids, NUMA node, IOMMU group, driver, holder VM and
    quarantine. Raise nothing: an exception is reported as a problem of the probe, the rest stays.

    Registration::

        [project.entry-points."aifactory.probes"]
        acme_gpu = "acme_aifactory.probe"
    """


@hookspec
def aifactory_doctor_checks(
    inventory: HostInventory, devices: Sequence[DiscoveredDevice], config: Config
) -> Iterable[Check] | None:
    """Host readiness: return :class:`~aifactory_core.model.Check` results (PASS/WARN/FAIL + fix).

    ``devices`` are the devices every plugin discovered (see ``aifactory_discover_devices``).
    Return nothing for checks that do not apply to this host.
    """


@hookspec
def aifactory_admit(inventory: HostInventory, request: Any, config: Config) -> Iterable[str] | None:
    """Per-VM admission/policy: return refusal reasons (each names the rule); empty to admit.

    ``request`` is the :class:`aifactory_core.one.vm.VmRequest` parsed from OpenNebula's VM
    document on the frontend, and a :class:`aifactory_core.model.DeployRequest` at deploy. Runs
    on the frontend at creation and again on the host before anything is bound;
    one refusal from any plugin refuses the VM.
    """


@hookspec
def aifactory_prepare(inventory: HostInventory, request: Any, config: Config) -> Iterable[Action] | None:
    """Before boot: return the host changes this VM needs (bind to vfio-pci, create a VF, ...).

    Return :class:`~aifactory_core.model.Action` objects instead of acting: the lifecycle
    journals, executes and, on any failure, undoes them in reverse — which gives dry-run, explain,
    rollback and crash repair for every plugin alike. Release needs no hook of its own: when the
    VM goes, the journal is undone, newest action first (register the undo of a new action kind
    with ``aifactory_core.lifecycle.executor.register_executor``).

    At deploy ``request`` is a :class:`aifactory_core.model.DeployRequest` (VM id, owner from the
    domain's ``<one:vm>`` metadata, PCI functions of its hostdevs); return ``None`` for requests
    your plugin does not handle.
    """


@hookspec
def aifactory_domain_xml(inventory: HostInventory, request: Any, domain: Any, config: Config) -> None:
    """Domain-XML contribution: edit the libvirt ``<domain>`` element (lxml) in place.

    Called in plugin order on the deployment file OpenNebula generated, after ``prepare``.
    Keep edits additive and idempotent (the same VM may be deployed again).
    """


@hookspec
def aifactory_network_setup(
    inventory: HostInventory, request: Any, nic: Any, config: Config, grant: Any
) -> Iterable[Action] | None:
    """Network setup for one VM NIC (VF MAC/VLAN/trust/rate, IB GUID/pkey, representor port).

    Called by the VNM ``pre.d`` hook, before the VM's VFs are bound to vfio-pci — or by ``post.d``
    on a VM's first deploy, whose owner OpenNebula has not yet written at ``pre``. ``nic`` is a
    :class:`aifactory_core.one.vm.PciRequest` (``TYPE = "NIC"``) or ``NicRequest``; ``grant`` the
    owner's :class:`aifactory_core.vnm.grant.TenantNetworkGrant` — the only source of the VLANs,
    VNIs and pkeys the NIC may use. Return actions (journaled, undone in reverse on failure and at
    ``clean``); return ``None`` for NICs this plugin does not handle.
    """
