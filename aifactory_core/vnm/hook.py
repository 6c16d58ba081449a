"""The VNM hook entry point: ``python -m aifactory_core.vnm.hook pre|post|clean [driver args]``.

OpenNebula runs ``<VN_MAD>/{pre,post,clean}.d/*`` with one line of base64 of the VM document on
stdin. ``pre`` (before the domain exists, so before any VF is bound to vfio-pci) asks the network
plugins for each PCI NIC's actions under the owner's tenant grant and makes them through the
lifecycle (journaled; any failure undoes everything). The reduced VNM document names no owner:
when no local document names it yet (a first deploy: OpenNebula writes ``vm.xml`` only after
``pre``), the wrapped VMM ``deploy`` does the same from that ``vm.xml`` (:func:`configure_at_deploy`),
still before its own step binds the VFs to vfio-pci. ``post`` runs after OpenNebula's own VF
code (which sets the template's VLAN/spoof-check/trust): it makes the journaled settings again, so
the suite's word is the one that stays. ``clean`` undoes the journal: every VF scrubbed and read
back clean, pkey memberships and representor ports removed.

The VNM journal is kept apart from the VMM's (``<state dir>/vnm``): both transactions belong to the
same VM but start and end at different moments.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aifactory_core.errors import AifactoryError, ConfigError, DocumentError, PolicyRefused

if TYPE_CHECKING:
    from aifactory_core.config import Config
    from aifactory_core.hostroot import HostRoot
    from aifactory_core.model import Action
    from aifactory_core.one.vm import PciRequest, VmRequest
    from aifactory_core.vnm.grant import TenantNetworkGrant

PHASES = ("pre", "post", "clean")
MAX_STDIN = 8 * 1024 * 1024


def vnm_host(host: HostRoot) -> HostRoot:
    """The host root whose state dir holds the VNM journal and VF owner tokens."""
    from aifactory_core.hostroot import HostRoot

    return HostRoot(host.root, host.state_dir / "vnm")


@dataclass(frozen=True)
class Hotplug:
    """The NIC a hot-plug action (``nic-attach``/``nic-detach``) is about: OpenNebula sends the
    whole VM and marks that one element ``ATTACH = "YES"``."""

    element: str  # NIC, NIC_ALIAS or PCI
    nic_id: int | None


def read_request(stdin: bytes) -> VmRequest:
    return read_document(stdin)[0]


def read_document(stdin: bytes) -> tuple[VmRequest, Hotplug | None]:
    """The VM of a VNM action, and the NIC being hot-plugged (``None`` for a deploy/shutdown)."""
    from aifactory_core.one.vm import vm_from_element
    from aifactory_core.one.xmlsafe import decode_base64, parse_xml

    root = parse_xml(decode_base64(stdin.strip(), "VNM VM document"), "VNM VM document")
    request = vm_from_element(root)
    for element in ("PCI", "NIC", "NIC_ALIAS"):
        for item in root.iterfind(f"TEMPLATE/{element}"):
            if (item.findtext("ATTACH") or "").strip().upper() == "YES":
                raw = (item.findtext("NIC_ID") or "").strip()
                return request, Hotplug(element, int(raw) if raw.isdigit() and len(raw) < 10 else None)
    return request, None


def scope_of(nic: PciRequest) -> str:
    """The journal scope of one PCI NIC's actions (released alone when the NIC is detached)."""
    return f"nic{nic.nic_id}" if nic.nic_id is not None else f"pci{nic.pci_id}"


def hotplugged_nic(request: VmRequest, hotplug: Hotplug) -> PciRequest | None:
    """The PCI NIC a hot-plug action is about; ``None`` when it is not one of the suite's (a plain
    NIC or alias: nothing for the suite to do, and nothing the VM holds may be touched)."""
    from aifactory_core.vnm.plan import network_nics

    if hotplug.element != "PCI" or hotplug.nic_id is None:
        return None
    return next((nic for nic in network_nics(request.pci) if nic.nic_id == hotplug.nic_id), None)


DEFAULT_DATASTORES = "/var/lib/one/datastores"


def owner_source(host: HostRoot, config: Config, vm: int) -> Path | None:
    """The newest local document naming the VM's owner: ``vm.xml`` (the full ``<VM>`` OpenNebula
    writes to the VM directory right after ``pre``), else the newest ``deployment.N``."""
    base = str(config.plugin("sriov").get("datastores", DEFAULT_DATASTORES))
    root = host.path(base if base.startswith("/") else "/" + base)
    documents = sorted(root.glob(f"*/{vm}/vm.xml"))
    if documents:
        return documents[-1]
    files = sorted(root.glob(f"*/{vm}/deployment.*"),
                   key=lambda path: int(path.suffix[1:]) if path.suffix[1:].isdigit() else -1)
    return files[-1] if files else None


def with_owner(host: HostRoot, config: Config, request: VmRequest) -> VmRequest | None:
    """The request with its owner filled in, or ``None`` while no local document names the owner.

    The reduced document OpenNebula gives VNM drivers carries no owner; on a first deploy the
    VM directory is written only after ``pre``, so the owner is known from ``post`` on.
    """
    from dataclasses import replace

    from aifactory_core.domain import load_domain, one_metadata
    from aifactory_core.one.vm import parse_vm

    if request.uid is not None or request.gid is not None:
        return request
    source = owner_source(host, config, request.vm_id)
    if source is None:
        return None
    data = source.read_bytes()
    if source.name == "vm.xml":
        full = parse_vm(data, str(source))
        if full.vm_id != request.vm_id:
            raise PolicyRefused(f"{source} describes VM {full.vm_id}, not {request.vm_id}")
        return replace(request, uid=full.uid, gid=full.gid, uname=full.uname, gname=full.gname)
    metadata = one_metadata(load_domain(data, str(source)))
    if metadata is None or (metadata.uid is None and metadata.gid is None):
        raise PolicyRefused(f"VM {request.vm_id}: {source} has no <one:vm> owner")
    return replace(request, uid=metadata.uid, gid=metadata.gid, uname=metadata.uname, gname=metadata.gname)


def tenant_grant(config: Config, request: VmRequest) -> TenantNetworkGrant:
    """The owner's grant from the tenant policy named in ``[plugin.policy] file``."""
    import os

    from aifactory_core.policy.schema import load_policy
    from aifactory_core.vnm.grant import grant_from_policy

    path = os.environ.get("AIFACTORY_POLICY") or str(config.plugin("policy").get("file", ""))
    if not path:
        raise ConfigError("[plugin.policy] file is not set: no tenant grant for the VM's networks")
    membership = config.plugin("infiniband").get("membership", "full")
    if membership not in ("full", "limited"):
        raise ConfigError(f"[plugin.infiniband] membership = {membership!r}: expected full or limited")
    return grant_from_policy(load_policy(path), request, full_membership=membership == "full")


def plan(host: HostRoot, config: Config, request: VmRequest, grant: TenantNetworkGrant,
         nics: Sequence[PciRequest] | None = None) -> list[tuple[str, list[Action]]]:
    """Every network plugin's actions for each PCI NIC of the VM (``nics``: only those), in
    template order, as (journal scope, actions) per NIC."""
    from aifactory_core.host.inventory import HostInventory
    from aifactory_core.plugins import build_manager
    from aifactory_core.vnm.plan import network_nics

    manager, _loaded = build_manager(config)
    inventory = HostInventory(host)
    parts: list[tuple[str, list[Action]]] = []
    for nic in network_nics(request.pci) if nics is None else nics:
        actions: list[Action] = []
        for result in manager.hook.aifactory_network_setup(inventory=inventory, request=request, nic=nic,
                                                           config=config, grant=grant):
            actions.extend(result)
        parts.append((scope_of(nic), actions))
    return parts


def pre(host: HostRoot, config: Config, request: VmRequest, grant: TenantNetworkGrant | None = None,
        hotplug: Hotplug | None = None) -> int | None:
    """Make the VM's network actions (with ``hotplug``: only the attached NIC's, added to what the
    VM holds); ``None`` when the owner is not known yet (deploy or ``post`` will)."""
    from aifactory_core.lifecycle.executor import prepare
    from aifactory_core.lifecycle.parts import add_part
    from aifactory_core.vnm import vf  # noqa: F401  (registers the vf_config executor)
    from aifactory_core.vnm.plan import network_nics

    attached = hotplugged_nic(request, hotplug) if hotplug is not None else None
    if hotplug is not None and attached is None:
        return 0  # a plain NIC or alias hot-plugged: not the suite's
    if not network_nics(request.pci):
        return 0  # no PCI NIC: nothing for the suite, and no tenant grant needed
    if grant is None:
        owned = with_owner(host, config, request)
        if owned is None:
            return None
        request, grant = owned, tenant_grant(config, owned)
    from aifactory_core.lifecycle.reconcile import retrying_held

    if attached is not None:
        ((scope, actions),) = plan(host, config, request, grant, [attached])
        if actions:
            retrying_held(host, lambda: add_part(vnm_host(host), request.vm_id, scope, actions))
        return len(actions)
    parts = plan(host, config, request, grant)
    actions = [action for _scope, part in parts for action in part]
    if actions:
        retrying_held(host, lambda: prepare(vnm_host(host), request.vm_id, actions,
                                            scopes=[scope for scope, part in parts for _ in part]))
    return len(actions)


def configure_at_deploy(host: HostRoot, config: Config, vm: int, vm_document: Path) -> bool:
    """Make the VM's network actions from the full ``<VM>`` OpenNebula wrote to the VM directory,
    unless ``pre`` already did; True when this call made them (the caller undoes them if its own
    deploy fails). Runs in the VMM ``deploy`` before any device is bound to vfio-pci."""
    from aifactory_core.lifecycle.journal import Journal
    from aifactory_core.one.vm import parse_vm

    if Journal.load(vnm_host(host), vm) is not None or not vm_document.is_file():
        return False
    request = parse_vm(vm_document.read_bytes(), str(vm_document))
    if request.vm_id != vm:
        raise PolicyRefused(f"{vm_document} describes VM {request.vm_id}, not {vm}")
    if request.uid is None and request.gid is None:
        raise PolicyRefused(f"VM {vm}: {vm_document} names no owner")
    made = pre(host, config, request)
    return bool(made)


def undo_at_deploy(host: HostRoot, vm: int) -> None:
    """Give back what :func:`configure_at_deploy` made (a deploy that failed after it)."""
    from aifactory_core.lifecycle.executor import release
    from aifactory_core.vnm import vf  # noqa: F401

    release(vnm_host(host), vm)


def post(host: HostRoot, config: Config, request: VmRequest, hotplug: Hotplug | None = None) -> int:
    """Make every journaled VF setting again (over OpenNebula's own ``activate_vf``; with
    ``hotplug``: the attached NIC's); when nothing earlier could (owner unknown then), plan and
    make everything now."""
    from aifactory_core.host.pcibind import SysfsWriter
    from aifactory_core.lifecycle.executor import EXECUTORS
    from aifactory_core.lifecycle.journal import Journal
    from aifactory_core.vnm import vf

    attached = hotplugged_nic(request, hotplug) if hotplug is not None else None
    if hotplug is not None and attached is None:
        return 0
    journal = Journal.load(vnm_host(host), request.vm_id)
    if journal is None or (attached is not None and not any(step.scope == scope_of(attached)
                                                             for step in journal.steps)):
        made = pre(host, config, request, hotplug=hotplug)
        if made is None:
            raise PolicyRefused(f"VM {request.vm_id}: owner unknown (no vm.xml or deployment file)")
        return made
    steps = [step for step in journal.steps if step.action.kind == vf.KIND and step.status == "done"
             and (attached is None or step.scope == scope_of(attached))]
    for step in steps:
        EXECUTORS[vf.KIND].do(vnm_host(host), step.action, SysfsWriter())
    return len(steps)


def clean(host: HostRoot, request: VmRequest, hotplug: Hotplug | None = None) -> bool:
    """Undo the VM's network journal (with ``hotplug``: only the detached NIC's part — the VM keeps
    running with its other VFs configured)."""
    from aifactory_core.lifecycle.executor import release
    from aifactory_core.lifecycle.parts import release_part
    from aifactory_core.vnm import vf  # noqa: F401

    if hotplug is not None:
        detached = hotplugged_nic(request, hotplug)
        return detached is not None and release_part(vnm_host(host), request.vm_id, scope_of(detached))
    return release(vnm_host(host), request.vm_id)


def run(phase: str, stdin: bytes, host: HostRoot, config: Config) -> str:
    if phase not in PHASES:
        raise ConfigError(f"unknown VNM phase {phase!r}: expected pre, post or clean")
    request, hotplug = read_document(stdin)
    from aifactory_core.lifecycle.journal import journal_dir
    from aifactory_core.lifecycle.vmlock import vm_lock
    from aifactory_core.vnm.plan import network_nics

    if not network_nics(request.pci) and not (journal_dir(vnm_host(host)) / f"{request.vm_id}.json").exists():
        return _run_locked(phase, request, hotplug, host, config)  # nothing of the suite's: no lock, no file
    with vm_lock(host, request.vm_id):  # no reconciliation of the VM while its network changes
        return _run_locked(phase, request, hotplug, host, config)


def _run_locked(phase: str, request: VmRequest, hotplug: Hotplug | None, host: HostRoot, config: Config) -> str:
    if phase == "pre":
        made = pre(host, config, request, hotplug=hotplug)
        if made is None:
            return (f"VM {request.vm_id}: owner not known before the VM directory exists; "
                    "configured at deploy, else at post")
        return f"VM {request.vm_id}: {made} network action(s) made"
    if phase == "post":
        return f"VM {request.vm_id}: {post(host, config, request, hotplug)} network action(s) made or re-applied"
    what = "network" if hotplug is None else f"{hotplug.element} {hotplug.nic_id}"
    released = clean(host, request, hotplug)
    return f"VM {request.vm_id}: {what} released" if released else f"VM {request.vm_id}: nothing held"


def main(argv: list[str] | None = None, stdin: Any = None) -> int:
    """The hook. Log records are held (:mod:`aifactory_core.driverlog`): on success they go to
    stdout, which OpenNebula logs; on failure only ERROR ones, before the error line on stderr,
    which OpenNebula makes the error message."""
    from aifactory_core.driverlog import hold_log

    args = sys.argv[1:] if argv is None else argv
    held = hold_log(f"vnm {args[0] if args and args[0] in PHASES else 'hook'}")
    try:
        from aifactory_core.config import load_config
        from aifactory_core.hostroot import HostRoot

        if not args:
            raise ConfigError("usage: python -m aifactory_core.vnm.hook pre|post|clean [driver arguments]")
        data = (stdin or sys.stdin.buffer).read(MAX_STDIN + 1)
        if len(data) > MAX_STDIN:
            raise DocumentError(f"VNM input is larger than {MAX_STDIN} bytes")
        summary = run(args[0], data, HostRoot.resolve(), load_config())
    except PolicyRefused as error:
        held.write(succeeded=False)
        print(f"aifactory: network refused by tenant policy: {error.message}", file=sys.stderr)
        return 1
    except AifactoryError as error:
        held.write(succeeded=False)
        print(f"aifactory: {error.message}", file=sys.stderr)
        return error.exit_status
    except Exception as error:  # a defect: one line in the VM's log, as the VMM wrapper gives
        import os

        held.write(succeeded=False)
        if os.environ.get("AIFACTORY_DEBUG") == "1":
            raise
        print(f"aifactory: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    held.write(succeeded=True, logged=sys.stdout)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
