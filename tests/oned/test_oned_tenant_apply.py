"""``tenant apply`` against a real oned (OpenNebula 7.0.2 built from source, ``tests/realone.py``).

Each test makes its own tenant names, users, cluster, networks and templates in the session's oned,
writes a policy naming their real ids, and checks what oned holds afterwards through pyone and
through the ``aifactory`` CLI as a process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from realone import RealOne

from aifactory_core.policy.apply import DEFAULT_VDC, apply_policy
from aifactory_core.policy.oned import Oned, OnedError
from aifactory_core.policy.schema import load_policy

pytestmark = pytest.mark.realone
CLI = [sys.executable, "-m", "aifactory_core.cli"]


class Tenancy:
    """One tenant's OpenNebula objects, made by oneadmin, and a policy that names them."""

    def __init__(self, one: RealOne, name: str, tmp_path: Path) -> None:
        self.one, self.name = one, name
        client = one.client()
        self.cluster = client.cluster.allocate(f"{name}-dgx")
        self.nets = [client.vn.allocate(f'NAME="{name}-net{i}" VN_MAD="dummy" BRIDGE="br{i}"', -1)
                     for i in range(2)]
        self.template = client.template.allocate(f'NAME="{name}-gpu" CPU="1" MEMORY="64" GPU="1"')
        self.admin = client.user.allocate(f"{name}-admin", "pw-admin", "core", [])
        self.service = client.user.allocate(f"{name}-svc", "pw-svc", "core", [])
        self.path = tmp_path / f"{name}.toml"

    def write_policy(self, max_gpus: int = 4, networks: list[int] | None = None) -> Path:
        nets = ", ".join(str(net) for net in (networks if networks is not None else self.nets))
        self.path.write_text(f"""
[opennebula]
version = "7.0"
zone = 0
infrastructure_admin_groups = ["oneadmin"]

[tenant.{self.name}]
group = "{self.name}"
vdc = "vdc-{self.name}"
clusters = [{self.cluster}]
max_gpus = {max_gpus}
networks = [{nets}]
vlans = ["200-209"]
templates = [{self.template}]
service_admins = [{self.admin}]
service_users = [{self.service}]

[[tenant.{self.name}.devices]]
name = "H100-SXM"
vendor = "10de"
device = "2330"
clusters = [{self.cluster}]
""")
        return self.path

    def apply(self, dry_run: bool = False) -> list[str]:
        oned = Oned(self.one.endpoint, f"oneadmin:{self.one.password}")
        return [str(change) for change in apply_policy(oned, load_policy(str(self.path)), dry_run=dry_run)]


def snapshot(one: RealOne) -> dict[str, Any]:
    """What ``tenant apply`` may change in oned: groups, VDCs (groups, clusters), ACLs, group quotas."""
    client = one.client()
    groups = {group.NAME: group.ID for group in client.grouppool.info().GROUP}
    return {
        "groups": groups,
        "vdcs": {vdc.NAME: (sorted(vdc.GROUPS.ID), sorted((c.ZONE_ID, c.CLUSTER_ID) for c in vdc.CLUSTERS.CLUSTER))
                 for vdc in client.vdcpool.info().VDC},
        "acls": sorted(acl.STRING for acl in client.acl.info().ACL),
        "quotas": {name: _gpu_quota(one, gid) for name, gid in groups.items()},
        "admins": {name: sorted(client.group.info(gid).ADMINS.ID) for name, gid in groups.items()},
    }


def _gpu_quota(one: RealOne, gid: int) -> dict[str, str]:
    """The group's generic GPU quota as oned's own XML holds it (pyone's bindings drop unknown keys)."""
    import xmlrpc.client

    from lxml import etree

    ok, answer, *_ = xmlrpc.client.ServerProxy(one.endpoint).one.group.info(f"oneadmin:{one.password}", gid, False)
    assert ok, answer
    vm = etree.fromstring(answer.encode()).find("VM_QUOTA/VM")
    return {} if vm is None else {key: vm.findtext(key) for key in ("GPU", "RUNNING_GPU") if vm.find(key) is not None}


def test_dry_run_lists_every_change_and_oned_is_untouched(real_one: RealOne, tmp_path: Path) -> None:
    tenancy = Tenancy(real_one, "dry", tmp_path)
    tenancy.write_policy()
    before = snapshot(real_one)
    planned = tenancy.apply(dry_run=True)
    assert snapshot(real_one) == before
    assert planned[0] == "dry: create group dry"
    assert "dry: remove group dry from the default VDC (it grants every cluster)" in planned
    assert f"dry: add ACL @<new:dry> HOST/%{tenancy.cluster} USE #0" in planned


def test_apply_builds_the_tenant_in_oned_and_a_second_run_changes_nothing(real_one: RealOne, tmp_path: Path) -> None:
    tenancy = Tenancy(real_one, "llm", tmp_path)
    tenancy.write_policy(max_gpus=4)
    first = tenancy.apply()
    state = snapshot(real_one)
    gid = state["groups"]["llm"]
    # oned put the new group into the default VDC, which grants every cluster; apply took it out.
    assert gid not in state["vdcs"]["default"][0]
    assert state["vdcs"]["vdc-llm"] == ([gid], [(0, tenancy.cluster)])
    acls = set(state["acls"])
    assert {f"@{gid} VM/* CREATE #0", f"@{gid} HOST/%{tenancy.cluster} USE #0",
            f"@{gid} NET/#{tenancy.nets[0]} USE #0", f"@{gid} NET/#{tenancy.nets[1]} USE #0",
            f"@{gid} TEMPLATE/#{tenancy.template} USE #0",
            f"#{tenancy.service} VM/@{gid} USE+MANAGE #0"} <= acls
    assert state["quotas"]["llm"] == {"GPU": "4", "RUNNING_GPU": "4"}
    # oned refuses addadmin for a user outside the group: apply added the user first.
    assert state["admins"]["llm"] == [tenancy.admin]
    assert gid in real_one.client().user.info(tenancy.admin).GROUPS.ID
    assert f"llm: add user {tenancy.admin} to group llm" in first

    assert tenancy.apply() == []
    assert snapshot(real_one) == state


def test_a_changed_policy_is_applied_then_reverted(real_one: RealOne, tmp_path: Path) -> None:
    tenancy = Tenancy(real_one, "vision", tmp_path)
    tenancy.write_policy(max_gpus=2, networks=tenancy.nets[:1])
    tenancy.apply()
    gid = snapshot(real_one)["groups"]["vision"]

    tenancy.write_policy(max_gpus=3, networks=tenancy.nets)
    changed = tenancy.apply()
    assert sorted(changed) == sorted([
        f"vision: add ACL @{gid} NET/#{tenancy.nets[1]} USE #0",
        'vision: set quota VM=[ GPU="3", RUNNING_GPU="3" ]',
    ])
    assert snapshot(real_one)["quotas"]["vision"] == {"GPU": "3", "RUNNING_GPU": "3"}

    tenancy.write_policy(max_gpus=2, networks=tenancy.nets[:1])
    reverted = tenancy.apply()
    assert reverted == ['vision: set quota VM=[ GPU="2", RUNNING_GPU="2" ]']  # rules are never deleted
    assert snapshot(real_one)["quotas"]["vision"] == {"GPU": "2", "RUNNING_GPU": "2"}
    assert tenancy.apply() == []


def test_a_member_of_the_tenant_can_instantiate_its_template_and_an_outsider_cannot(
        real_one: RealOne, tmp_path: Path) -> None:
    tenancy = Tenancy(real_one, "inst", tmp_path)
    tenancy.write_policy()
    tenancy.apply()
    client = real_one.client()
    gid = snapshot(real_one)["groups"]["inst"]
    member = client.user.allocate("inst-member", "pw-member", "core", [])
    client.user.chgrp(member, gid)
    outsider = client.user.allocate("inst-outsider", "pw-out", "core", [])
    vm = real_one.client("inst-member:pw-member").template.instantiate(tenancy.template, "member-vm", True, "", False)
    assert client.vm.info(vm).GID == gid
    import pyone

    with pytest.raises(pyone.OneAuthorizationException):
        real_one.client("inst-outsider:pw-out").template.instantiate(tenancy.template, "x", True, "", False)
    assert outsider > 0


def test_cli_apply_as_a_process_twice_then_no_change(real_one: RealOne, tmp_path: Path) -> None:
    tenancy = Tenancy(real_one, "cli", tmp_path)
    path = tenancy.write_policy()
    args = [*CLI, "tenant", "apply", str(path), "--endpoint", real_one.endpoint,
            "--session", f"oneadmin:{real_one.password}"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("cli: create group cli\n") and first.stdout.endswith("changes\n")
    second = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert (second.returncode, second.stdout.strip()) == (0, "OpenNebula already matches the policy: no change")


def test_default_vdc_is_the_one_oned_bootstraps(real_one: RealOne) -> None:
    """The id the suite takes out of is oned's own bootstrap VDC, granting all clusters (-10)."""
    default = real_one.client().vdc.info(DEFAULT_VDC)
    assert default.NAME == "default"
    assert [(c.ZONE_ID, c.CLUSTER_ID) for c in default.CLUSTERS.CLUSTER] == [(0, -10)]


def test_quota_oned_does_not_keep_is_an_error_naming_the_fix(real_one: RealOne, tmp_path: Path) -> None:
    """A quota key oned was not configured for (here PCI_DEV on 7.0) is dropped by oned: refused."""
    tenancy = Tenancy(real_one, "q74", tmp_path)
    tenancy.write_policy()
    tenancy.path.write_text(tenancy.path.read_text().replace('version = "7.0"', 'version = "7.4"'))
    with pytest.raises(OnedError, match='did not keep the quota PCI_DEV, RUNNING_PCI_DEV: this oned has no PCI'):
        tenancy.apply()
