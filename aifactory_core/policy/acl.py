"""The OpenNebula ACL rules a tenant policy implies, in ``oneacl`` syntax.

``<user> <RESOURCE[+RESOURCE...]>/<id> <RIGHT[+RIGHT...]> [<zone>]`` with user ``#uid``, ``@gid``
or ``*``; id ``#id``, ``@gid``, ``%cid`` or ``*``; rights ``USE MANAGE ADMIN CREATE``. The four
layers of the role model map onto OpenNebula as:

* infrastructure admin — the ``oneadmin`` group (all rights by OpenNebula's own rules; no rule here);
* service admin (``service_admins``) — group admins of the tenant group, plus
  ``#uid VM+IMAGE+TEMPLATE+NET/@gid USE+MANAGE #zone`` over the group's objects;
* service user (``service_users``) — automation acting for the tenant:
  ``#uid VM/@gid USE+MANAGE #zone`` and ``#uid TEMPLATE/@gid USE #zone``;
* end user (the group's members) — ``@gid VM/* CREATE`` (oned gives a group made through the API
  no right to create anything), ``@gid HOST/%cid USE``, ``@gid NET/#id USE`` and
  ``@gid TEMPLATE/#id USE`` for the tenant's clusters, networks and GPU templates.

OpenNebula's ACLs reach API objects only: devices, VLANs and pkeys are enforced by admission.
"""

from __future__ import annotations

import re

from aifactory_core.errors import UsageError
from aifactory_core.policy.schema import Policy, Tenant

USERS = {"#": 0x100000000, "@": 0x200000000, "*": 0x400000000, "%": 0x800000000}
RESOURCES = {
    "VM": 0x1000000000, "HOST": 0x2000000000, "NET": 0x4000000000, "IMAGE": 0x8000000000,
    "USER": 0x10000000000, "TEMPLATE": 0x20000000000, "GROUP": 0x40000000000,
    "DATASTORE": 0x100000000000, "CLUSTER": 0x200000000000, "DOCUMENT": 0x400000000000,
    "ZONE": 0x800000000000, "SECGROUP": 0x1000000000000, "VDC": 0x2000000000000,
    "VROUTER": 0x4000000000000, "MARKETPLACE": 0x8000000000000, "MARKETPLACEAPP": 0x10000000000000,
    "VMGROUP": 0x20000000000000, "VNTEMPLATE": 0x40000000000000, "BACKUPJOB": 0x100000000000000,
}  # fmt: skip  # OpenNebula's AclRule bit values (include/AclRule.h, PoolObjectSQL.h)
RIGHTS = {"USE": 0x1, "MANAGE": 0x2, "ADMIN": 0x4, "CREATE": 0x8}
_ID = re.compile(r"\A(?:[#@%]\d{1,10}|\*)\Z")


def _id_value(text: str, what: str, allowed: str) -> int:
    if not _ID.match(text) or text[0] not in allowed:
        raise UsageError(f"ACL {what} {text!r}: expected one of {', '.join(allowed)}<id> or *")
    return USERS[text[0]] + (int(text[1:]) if text != "*" else 0)


def parse_rule(rule: str) -> tuple[int, int, int, int | None]:
    """The numeric form ``one.acl.addrule`` takes: (user, resource, rights, zone or None)."""
    parts = rule.split(" ")
    if len(parts) not in (3, 4):
        raise UsageError(f"ACL {rule!r}: expected 'USER RESOURCES/ID RIGHTS [ZONE]'")
    user = _id_value(parts[0], "user", "#@*")
    kinds, _, target = parts[1].partition("/")
    resource = _id_value(target, "resource id", "#@%*")
    for kind in kinds.split("+"):
        if kind not in RESOURCES:
            raise UsageError(f"ACL {rule!r}: unknown resource {kind!r}")
        resource |= RESOURCES[kind]
    rights = 0
    for right in parts[2].split("+"):
        if right not in RIGHTS:
            raise UsageError(f"ACL {rule!r}: unknown right {right!r}")
        rights |= RIGHTS[right]
    zone = _id_value(parts[3], "zone", "#*") if len(parts) == 4 else None
    return user, resource, rights, zone


def tenant_rules(policy: Policy, tenant: Tenant, gid: int) -> list[str]:
    """The rules for ``tenant`` whose group has id ``gid``, in a stable order."""
    zone = f"#{policy.zone}"
    rules = [f"@{gid} VM/* CREATE {zone}"]
    rules += [f"@{gid} HOST/%{cluster} USE {zone}" for cluster in tenant.clusters]
    rules += [f"@{gid} NET/#{network} USE {zone}" for network in sorted(tenant.networks)]
    rules += [f"@{gid} TEMPLATE/#{template} USE {zone}" for template in tenant.templates]
    for uid in tenant.service_admins:
        rules.append(f"#{uid} VM+IMAGE+TEMPLATE+NET/@{gid} USE+MANAGE {zone}")
    for uid in tenant.service_users:
        rules.append(f"#{uid} VM/@{gid} USE+MANAGE {zone}")
        rules.append(f"#{uid} TEMPLATE/@{gid} USE {zone}")
    return rules


def quota_template(policy: Policy, tenant: Tenant) -> str:
    """The group's VM quota: the generic ``GPU`` quota (``QUOTA_VM_ATTRIBUTE = "GPU"`` in oned.conf,
    6.10/7.0) and, from 7.2, the native ``PCI_DEV`` counters as well."""
    values = {"GPU": tenant.max_gpus, "RUNNING_GPU": tenant.max_gpus}
    if policy.version in ("7.2", "7.4"):
        values.update({"PCI_DEV": tenant.max_gpus, "RUNNING_PCI_DEV": tenant.max_gpus})
    body = ", ".join(f'{key}="{value}"' for key, value in values.items())
    return f"VM=[ {body} ]"
