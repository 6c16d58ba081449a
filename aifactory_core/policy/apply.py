"""``tenant apply``: make OpenNebula's groups, VDCs, ACL rules and quotas match the policy.

Read the current state, compare, and make only the missing changes, so a second run changes
nothing. ``dry_run`` reports the same list of changes without making them (a group that does not
exist yet is shown as ``@<new:NAME>`` in the rules it will get). What the policy no longer names is
not deleted (rules or groups are reported by ``tenant show`` for an operator to remove); what is
removed is what oned itself adds against the policy: the group's place in the default VDC and its
VDC's network grants, below.

What oned does on its own, and what is done about it:

* ``one.group.allocate`` puts every new group into the ``default`` VDC (id 0), which grants every
  cluster of the zone: a tenant with a VDC of its own is taken out of it.
* ``one.group.allocate`` gives the group no right to create anything (``onegroup create`` adds its
  default ``CREATE`` rule client-side): the tenant's rules include ``@gid VM/* CREATE``.
* ``one.vdc.addcluster`` gives the group ``@gid NET/%cid USE`` (``DEFAULT_VDC_CLUSTER_NET_ACL``):
  every network of the cluster, another tenant's in a shared cluster too. That rule is removed; the
  tenant reaches its networks through its own ``@gid NET/#id USE`` rules only (the cluster's
  ``HOST ... MANAGE``, which the scheduler needs to place the group's VMs, and ``DATASTORE ... USE``
  stay). A tenant without ``vdc`` stays in the default VDC, which grants every network of the zone
  (:func:`notes` says so on every run).
* ``one.group.addadmin`` refuses a user who is not in the group: the user is added to it first
  (as a secondary group, ``one.user.addgroup``; the primary group is left alone).
* oned drops a generic ``GPU`` quota it was not told about (``QUOTA_VM_ATTRIBUTE = "GPU"`` in
  ``oned.conf``): the quota is read back, and one that did not stick is an error naming the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aifactory_core.errors import UsageError
from aifactory_core.policy.acl import parse_rule, quota_template, tenant_rules

if TYPE_CHECKING:
    from lxml import etree

    from aifactory_core.policy.oned import Oned
    from aifactory_core.policy.schema import Policy, Tenant


DEFAULT_VDC = 0  # the VDC oned creates at bootstrap and puts every new group into


@dataclass
class OneState:
    groups: dict[str, int] = field(default_factory=dict)
    vdcs: dict[str, tuple[int, set[int], set[tuple[int, int]]]] = field(default_factory=dict)
    acls: set[tuple[int, int, int, int]] = field(default_factory=set)
    acl_ids: dict[tuple[int, int, int, int], int] = field(default_factory=dict)


def _number(text: str | None, what: str, base: int = 10) -> int:
    """An id or ACL word from oned's answer; anything else is oned's defect, said in one line."""
    from aifactory_core.policy.oned import OnedError

    raw = (text or "").strip()
    if not raw:
        return -1 if base == 10 else 0
    try:
        return int(raw, base)
    except ValueError:
        raise OnedError(f"oned answered {what} {raw[:40]!r}, not a number") from None


def read_state(oned: Oned) -> OneState:
    state = OneState()
    for group in oned.document("one.grouppool.info").iterfind("GROUP"):
        state.groups[group.findtext("NAME") or ""] = _number(group.findtext("ID"), "a group ID")
    for vdc in oned.document("one.vdcpool.info").iterfind("VDC"):
        groups = {_number(item.text, "a VDC group ID") for item in vdc.iterfind("GROUPS/ID")}
        clusters = {
            (_number(item.findtext("ZONE_ID"), "a VDC zone ID"),
             _number(item.findtext("CLUSTER_ID"), "a VDC cluster ID"))
            for item in vdc.iterfind("CLUSTERS/CLUSTER")
        }
        state.vdcs[vdc.findtext("NAME") or ""] = (_number(vdc.findtext("ID"), "a VDC ID"), groups, clusters)
    read_acls(oned, state)
    return state


def read_acls(oned: Oned, state: OneState) -> None:
    state.acls.clear()
    state.acl_ids.clear()
    for acl in oned.document("one.acl.info").iterfind("ACL"):
        user, resource, rights, zone = (_number(acl.findtext(tag), f"an ACL {tag}", 16)
                                        for tag in ("USER", "RESOURCE", "RIGHTS", "ZONE"))
        state.acls.add((user, resource, rights, zone))
        state.acl_ids[(user, resource, rights, zone)] = _number(acl.findtext("ID"), "an ACL ID")


def vdc_network_grants(state: OneState, gid: int, zone: int, clusters: set[tuple[int, int]]) -> list[tuple[int, str]]:
    """The rules oned made for the group when a cluster went into its VDC that reach networks
    (``@gid NET/%cid USE #zone``, from DEFAULT_VDC_CLUSTER_NET_ACL; ``NET/*`` for all clusters):
    (rule id, rule text). Every network in a shared cluster -- another tenant's too -- would be the
    group's through them; the tenant's networks come from its own ``NET/#id`` rules."""
    from aifactory_core.policy.acl import RESOURCES, RIGHTS, USERS

    found = []
    for (user, resource, rights, rule_zone), rule_id in sorted(state.acl_ids.items(), key=lambda item: item[1]):
        if user != USERS["@"] + gid or rule_zone != USERS["#"] + zone or not resource & RESOURCES["NET"]:
            continue
        if resource & ~(RESOURCES["NET"] | USERS["%"] | USERS["*"] | 0xFFFFFFFF):
            continue  # a rule for more than networks: not one a VDC makes
        if resource & USERS["%"]:
            target = resource & 0xFFFFFFFF
            if (zone, target) not in clusters:
                continue
            shown = f"%{target}"
        elif resource & USERS["*"] and (zone, -10) in clusters:
            shown = "*"
        else:
            continue
        names = "+".join(name for name, bit in RIGHTS.items() if rights & bit)
        found.append((rule_id, f"@{gid} NET/{shown} {names} #{zone}"))
    return found


def _quota_now(group: etree._Element) -> dict[str, str]:
    vm = group.find("VM_QUOTA/VM")
    if vm is None:
        return {}
    return {child.tag: (child.text or "").strip() for child in vm if isinstance(child.tag, str)}


def _wanted_quota(policy: Policy, tenant: Tenant) -> dict[str, str]:
    from aifactory_core.one.template import parse_template

    (_, vector), = parse_template(quota_template(policy, tenant))
    assert isinstance(vector, dict)
    return dict(vector)


@dataclass(frozen=True)
class Change:
    tenant: str
    description: str

    def __str__(self) -> str:
        return f"{self.tenant}: {self.description}"


class _Run:
    def __init__(self, oned: Oned, policy: Policy, dry_run: bool) -> None:
        self.oned, self.policy, self.dry_run = oned, policy, dry_run
        self.changes: list[Change] = []

    def change(self, tenant: Tenant, description: str, method: str, *params: object) -> object:
        self.changes.append(Change(tenant.key, description))
        return None if self.dry_run else self.oned.call(method, *params)

    def tenant(self, state: OneState, tenant: Tenant) -> None:
        gid = state.groups.get(tenant.group)
        if gid is not None and tenant.group_id is not None and gid != tenant.group_id:
            raise UsageError(f"tenant {tenant.key}: group {tenant.group} has id {gid} in OpenNebula, "
                             f"the policy says group_id = {tenant.group_id}")  # fmt: skip
        if gid is None:
            created = self.change(tenant, f"create group {tenant.group}", "one.group.allocate", tenant.group)
            gid = None if created is None else int(str(created))
            if gid is not None:
                state.groups[tenant.group] = gid
                for vid, groups, _ in state.vdcs.values():
                    if vid == DEFAULT_VDC:
                        groups.add(gid)  # where oned puts every group it creates
        self.vdc(state, tenant, gid)
        self.acls(state, tenant, gid)
        self.quota_and_admins(tenant, gid)

    def vdc(self, state: OneState, tenant: Tenant, gid: int | None) -> None:
        if tenant.vdc is None:
            return
        found = state.vdcs.get(tenant.vdc)
        if found is None:
            created = self.change(tenant, f"create VDC {tenant.vdc}", "one.vdc.allocate", f'NAME = "{tenant.vdc}"')
            found = (-1 if created is None else int(str(created)), set(), set())
            state.vdcs[tenant.vdc] = found
        vid, groups, clusters = found
        if gid is None or gid not in groups:
            self.change(tenant, f"add group {tenant.group} to VDC {tenant.vdc}", "one.vdc.addgroup", vid, gid)
            if gid is not None:
                groups.add(gid)
        default = next((entry for entry in state.vdcs.values() if entry[0] == DEFAULT_VDC), None)
        if vid != DEFAULT_VDC and (gid is None or (default is not None and gid in default[1])):
            self.change(tenant, f"remove group {tenant.group} from the default VDC (it grants every cluster)",
                        "one.vdc.delgroup", DEFAULT_VDC, gid)  # fmt: skip
            if default is not None and gid is not None:
                default[1].discard(gid)
        added = []
        for cluster in tenant.clusters:
            if (self.policy.zone, cluster) not in clusters:
                self.change(tenant, f"add cluster {cluster} (zone {self.policy.zone}) to VDC {tenant.vdc}",
                            "one.vdc.addcluster", vid, self.policy.zone, cluster)  # fmt: skip
                clusters.add((self.policy.zone, cluster))
                added.append(cluster)
        if gid is None or (added and self.dry_run):
            for cluster in added:  # oned will make @gid NET/%cid USE for it (DEFAULT_VDC_CLUSTER_NET_ACL)
                self.changes.append(Change(tenant.key, f"remove the VDC's network grant for cluster {cluster} "
                                                       "(networks only through the tenant's own NET rules)"))
            return
        if added:
            read_acls(self.oned, state)  # the rules oned made for the clusters just added
        for rule_id, text in vdc_network_grants(state, gid, self.policy.zone, clusters):
            self.change(tenant, f"remove ACL {text} (the VDC's network grant; networks only through the tenant's "
                        "own NET rules)", "one.acl.delrule", rule_id)  # fmt: skip
            for key, known in list(state.acl_ids.items()):
                if known == rule_id:
                    del state.acl_ids[key]
                    state.acls.discard(key)

    def acls(self, state: OneState, tenant: Tenant, gid: int | None) -> None:
        placeholder = 2**31 - 1  # a group still to be created: its rules are shown, not compared
        for rule in tenant_rules(self.policy, tenant, placeholder if gid is None else gid):
            shown = rule if gid is not None else rule.replace(f"@{placeholder}", f"@<new:{tenant.group}>")
            user, resource, rights, zone = parse_rule(rule)
            key = (user, resource, rights, zone if zone is not None else 0x100000000)
            if gid is not None and key in state.acls:
                continue
            hexes = [hex(value) for value in key]
            self.change(tenant, f"add ACL {shown}", "one.acl.addrule", *hexes)
            state.acls.add(key)

    def quota_and_admins(self, tenant: Tenant, gid: int | None) -> None:
        wanted = _wanted_quota(self.policy, tenant)
        now: dict[str, str] = {}
        admins: set[int] = set()
        if gid is not None:
            group = self.oned.document("one.group.info", gid, False)
            now = _quota_now(group)
            admins = {int(item.text or "-1") for item in group.iterfind("ADMINS/ID")}
        if any(now.get(key) != value for key, value in wanted.items()):
            self.change(tenant, f"set quota {quota_template(self.policy, tenant)}", "one.group.quota",
                        gid, quota_template(self.policy, tenant))  # fmt: skip
            if not self.dry_run and gid is not None:
                self.check_quota_kept(tenant, gid, wanted)
        for uid in tenant.service_admins:
            if uid in admins:
                continue
            if gid is None or gid not in self.user_groups(uid):
                self.change(tenant, f"add user {uid} to group {tenant.group}", "one.user.addgroup", uid, gid)
            self.change(tenant, f"make user {uid} an admin of group {tenant.group}", "one.group.addadmin", gid, uid)

    def user_groups(self, uid: int) -> set[int]:
        user = self.oned.document("one.user.info", uid, False)
        return {_number(item.text, "a user's group ID") for item in user.iterfind("GROUPS/ID")}

    def check_quota_kept(self, tenant: Tenant, gid: int, wanted: dict[str, str]) -> None:
        from aifactory_core.policy.oned import OnedError

        kept = _quota_now(self.oned.document("one.group.info", gid, False))
        lost = sorted(key for key, value in wanted.items() if kept.get(key) != value)
        if not lost:
            return
        if any("PCI_DEV" in key for key in lost):
            fix = "this oned has no PCI device quotas: set [opennebula] version to the version oned runs"
        else:
            fix = 'add QUOTA_VM_ATTRIBUTE = "GPU" to oned.conf and restart oned'
        raise OnedError(f"tenant {tenant.key}: oned did not keep the quota {', '.join(lost)}: {fix}")


def notes(policy: Policy) -> list[str]:
    """What the policy leaves to OpenNebula's defaults, said on every run (no change is made)."""
    return [f"tenant {tenant.key}: no vdc: group {tenant.group} stays in OpenNebula's default VDC, which grants "
            "it every cluster's hosts, datastores and networks; only admission and the host gate keep its VMs off "
            "other tenants' networks and devices (set vdc to give it its own)"
            for tenant in policy.tenants.values() if tenant.vdc is None]


def apply_policy(oned: Oned, policy: Policy, *, dry_run: bool = False) -> list[Change]:
    """Reconcile OpenNebula with ``policy``; return the changes made (or, dry, that would be)."""
    run = _Run(oned, policy, dry_run)
    state = read_state(oned)
    for tenant in policy.tenants.values():
        run.tenant(state, tenant)
    return run.changes
