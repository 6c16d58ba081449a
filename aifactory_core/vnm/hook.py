"""The VNM hook entry point: ``python -m aifactory_core.vnm.hook pre|post|clean [driver args]``.

OpenNebula runs ``<VN_MAD>/{pre,post,clean}.d/*`` with one line of base64 of the VM document on
stdin. ``pre`` (before the domain exists, so before any VF is bound to vfio-pci) asks the network
plugins for each PCI NIC's actions under the owner's tenant grant and makes them through the
lifecycle (journaled; any failure undoes everything). ``post`` runs after OpenNebula's own VF
code (which sets the template's VLAN/spoof-check/trust): it makes the journaled settings again, so
the suite's word is the one that stays. ``clean`` undoes the journal: every VF scrubbed and read
back clean, pkey memberships and representor ports removed.

The VNM journal is kept apart from the VMM's (``<state dir>/vnm``): both transactions belong to the
same VM but start and end at different moments.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from aifactory_core.errors import AifactoryError, ConfigError, PolicyRefused

if TYPE_CHECKING:
    from aifactory_core.config import Config
    from aifactory_core.hostroot import HostRoot
    from aifactory_core.model import Action
    from aifactory_core.one.vm import VmRequest
    from aifactory_core.vnm.grant import TenantNetworkGrant

PHASES = ("pre", "post", "clean")
MAX_STDIN = 8 * 1024 * 1024


def vnm_host(host: HostRoot) -> HostRoot:
    """The host root whose state dir holds the VNM journal and VF owner tokens."""
    from aifactory_core.hostroot import HostRoot

    return HostRoot(host.root, host.state_dir / "vnm")


def read_request(stdin: bytes) -> VmRequest:
    from aifactory_core.one.vm import parse_vm
    from aifactory_core.one.xmlsafe import decode_base64

    return parse_vm(decode_base64(stdin.strip(), "VNM VM document"), "VNM VM document")


DEFAULT_DATASTORES = "/var/lib/one/datastores"


def with_owner(host: HostRoot, config: Config, request: VmRequest) -> VmRequest:
    """The request with its owner filled in.

    The reduced document OpenNebula gives VNM drivers carries no owner, so the owner comes from
    the ``<one:vm>`` metadata of the VM's newest deployment file in the system datastore
    (``[plugin.sriov] datastores``, default ``/var/lib/one/datastores``); without one, the VM's
    networks cannot be granted.
    """
    from dataclasses import replace

    from aifactory_core.domain import load_domain, one_metadata

    if request.uid is not None or request.gid is not None:
        return request
    base = str(config.plugin("sriov").get("datastores", DEFAULT_DATASTORES))
    root = host.path(base if base.startswith("/") else "/" + base)
    files = sorted(root.glob(f"*/{request.vm_id}/deployment.*"),
                   key=lambda path: int(path.suffix[1:]) if path.suffix[1:].isdigit() else -1)
    if not files:
        raise PolicyRefused(f"VM {request.vm_id}: owner unknown (no deployment file under {base}/*/{request.vm_id})")
    metadata = one_metadata(load_domain(files[-1].read_bytes(), str(files[-1])))
    if metadata is None or (metadata.uid is None and metadata.gid is None):
        raise PolicyRefused(f"VM {request.vm_id}: {files[-1]} has no <one:vm> owner")
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


def plan(host: HostRoot, config: Config, request: VmRequest, grant: TenantNetworkGrant) -> list[Action]:
    """Every network plugin's actions for every PCI NIC of the VM, in template order."""
    from aifactory_core.host.inventory import HostInventory
    from aifactory_core.plugins import build_manager
    from aifactory_core.vnm.plan import network_nics

    manager, _loaded = build_manager(config)
    inventory = HostInventory(host)
    actions: list[Action] = []
    for nic in network_nics(request.pci):
        for result in manager.hook.aifactory_network_setup(inventory=inventory, request=request, nic=nic,
                                                           config=config, grant=grant):
            actions.extend(result)
    return actions


def pre(host: HostRoot, config: Config, request: VmRequest, grant: TenantNetworkGrant | None = None) -> int:
    from aifactory_core.lifecycle.executor import prepare
    from aifactory_core.vnm import vf  # noqa: F401  (registers the vf_config executor)

    if grant is None:
        request = with_owner(host, config, request)
        grant = tenant_grant(config, request)
    actions = plan(host, config, request, grant)
    if actions:
        prepare(vnm_host(host), request.vm_id, actions)
    return len(actions)


def post(host: HostRoot, request: VmRequest) -> int:
    """Make every journaled VF setting again (over OpenNebula's own ``activate_vf``)."""
    from aifactory_core.host.pcibind import SysfsWriter
    from aifactory_core.lifecycle.executor import EXECUTORS
    from aifactory_core.lifecycle.journal import Journal
    from aifactory_core.vnm import vf

    journal = Journal.load(vnm_host(host), request.vm_id)
    if journal is None:
        return 0
    steps = [step for step in journal.steps if step.action.kind == vf.KIND and step.status == "done"]
    for step in steps:
        EXECUTORS[vf.KIND].do(vnm_host(host), step.action, SysfsWriter())
    return len(steps)


def clean(host: HostRoot, request: VmRequest) -> bool:
    from aifactory_core.lifecycle.executor import release
    from aifactory_core.vnm import vf  # noqa: F401

    return release(vnm_host(host), request.vm_id)


def run(phase: str, stdin: bytes, host: HostRoot, config: Config) -> str:
    if phase not in PHASES:
        raise ConfigError(f"unknown VNM phase {phase!r}: expected pre, post or clean")
    request = read_request(stdin)
    if phase == "pre":
        return f"VM {request.vm_id}: {pre(host, config, request)} network action(s) made"
    if phase == "post":
        return f"VM {request.vm_id}: {post(host, request)} VF(s) re-applied"
    return f"VM {request.vm_id}: network released" if clean(host, request) else f"VM {request.vm_id}: nothing held"


def main(argv: list[str] | None = None, stdin: Any = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        from aifactory_core.config import load_config
        from aifactory_core.hostroot import HostRoot

        if not args:
            raise ConfigError("usage: python -m aifactory_core.vnm.hook pre|post|clean [driver arguments]")
        data = (stdin or sys.stdin.buffer).read(MAX_STDIN + 1)
        print(run(args[0], data, HostRoot.resolve(), load_config()))
    except PolicyRefused as error:
        print(f"aifactory: network refused by tenant policy: {error.message}", file=sys.stderr)
        return 1
    except AifactoryError as error:
        print(f"aifactory: {error.message}", file=sys.stderr)
        return error.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
