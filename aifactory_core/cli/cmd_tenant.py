"""``aifactory tenant check|show|apply``: the tenant policy file and OpenNebula's side of it.

* ``check POLICY`` — validate offline; exit 0 valid, 2 invalid (one line naming key and line).
* ``show [POLICY]`` — the effective policy per tenant (default: the configured policy file).
* ``apply POLICY [--dry-run]`` — create/update groups, VDCs, ACL rules and quotas through pyone;
  idempotent; ``--dry-run`` prints the changes without making them. Endpoint and credentials:
  ``--endpoint``/``--session``, else ``ONE_XMLRPC``/``ONE_AUTH`` as OpenNebula's own clients.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from aifactory_core.errors import EXIT_OK

if TYPE_CHECKING:
    from aifactory_core.cli import Context
    from aifactory_core.policy.schema import Policy, Tenant

DEFAULT_POLICY = "/etc/one/aifactory-policy.toml"


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("tenant", help="check, show and apply the tenant policy",
                                   description="The tenant policy file and the OpenNebula objects it implies.")
    actions = parser.add_subparsers(dest="tenant_action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate a policy file offline (exit 2 if invalid)")
    check.add_argument("policy", metavar="POLICY")
    show = actions.add_parser("show", help="print the effective policy per tenant")
    show.add_argument("policy", metavar="POLICY", nargs="?", help="default: [plugin.policy] file of the config")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    apply = actions.add_parser("apply", help="create/update OpenNebula groups, VDCs, ACLs and quotas")
    apply.add_argument("policy", metavar="POLICY")
    apply.add_argument("--dry-run", action="store_true", help="show the changes, make none")
    apply.add_argument("--endpoint", metavar="URL", help="oned XML-RPC endpoint (default: $ONE_XMLRPC)")
    apply.add_argument("--session", metavar="USER:PASSWORD", help="credentials (default: the $ONE_AUTH file)")


def _tenant_lines(policy: Policy, tenant: Tenant) -> list[str]:
    from aifactory_core.policy.acl import quota_template, tenant_rules

    devices = ", ".join(
        f"{grant.name} ({grant.vendor:04x}:{'*' if grant.device is None else f'{grant.device:04x}'}"
        f"{'' if grant.clusters is None else ' on clusters ' + ','.join(map(str, sorted(grant.clusters)))})"
        for grant in tenant.devices
    )  # fmt: skip
    gid = tenant.group_id
    lines = [
        f"tenant {tenant.key}: group {tenant.group} (id {gid if gid is not None else 'assigned by OpenNebula'})"
        + (f", VDC {tenant.vdc}" if tenant.vdc else ""),
        f"  clusters: {', '.join(map(str, tenant.clusters)) or 'none'}",
        f"  devices: {devices or 'none'}; at most {tenant.max_gpus} GPUs at once",
        f"  networks: {', '.join(map(str, sorted(tenant.networks))) or 'none'}; VLANs {tenant.vlans}; "
        f"VNIs {tenant.vnis}; IB pkeys {tenant.ib_pkeys}",
        f"  price per GPU-hour: {tenant.price_per_gpu_hour:g}",
        f"  quota: {quota_template(policy, tenant)}",
        "  ACL rules:",
    ]
    lines += [f"    {rule}" for rule in tenant_rules(policy, tenant, gid if gid is not None else 2**31 - 1)]
    return [line.replace(f"@{2**31 - 1}", f"@<{tenant.group}>") for line in lines]


def _policy_path(args: argparse.Namespace, context: Context) -> str:
    if args.policy:
        return str(args.policy)
    return str(context.config.plugin("policy").get("file", DEFAULT_POLICY))


def run(args: argparse.Namespace, context: Context) -> int:
    from aifactory_core.policy.schema import load_policy

    if args.tenant_action == "check":
        policy = load_policy(args.policy)
        print(f"{args.policy}: valid, {len(policy.tenants)} tenants ({', '.join(policy.tenants)})")
        return EXIT_OK
    if args.tenant_action == "show":
        policy = load_policy(_policy_path(args, context))
        if args.json:
            from aifactory_core.cli.output import print_json

            print_json({key: tenant for key, tenant in policy.tenants.items()})
            return EXIT_OK
        for tenant in policy.tenants.values():
            print("\n".join(_tenant_lines(policy, tenant)))
        return EXIT_OK
    from aifactory_core.policy.apply import apply_policy, notes
    from aifactory_core.policy.oned import Oned

    policy = load_policy(args.policy)
    for note in notes(policy):
        sys.stderr.write(f"note: {note}\n")
    changes = apply_policy(Oned(args.endpoint, args.session, transport="pyone"), policy, dry_run=args.dry_run)
    verb = "would make" if args.dry_run else "made"
    for change in changes:
        print(("+ " if args.dry_run else "") + str(change))
    print(f"{verb} {len(changes)} changes" if changes else "OpenNebula already matches the policy: no change")
    return EXIT_OK
