"""Tenant isolation on a real oned 7.0.2: what a tenant user can and cannot do against the policy.

The suite is installed by its install.sh (which makes ``release`` an ADMIN VM operation in
oned.conf; ``realone.suite_installed`` restarts oned after it, as the installer's note says). A
tenant ``iso`` (1 GPU, the dummy host's NVIDIA ``10de:0863`` granted) and a tenant ``iso2`` share
one cluster with a dummy host; their VMs go through oned's real hook manager and the admission
hook. Checked here, each through oned's own answers:

* network access is the tenant's own: the VDC's ``NET/%cid`` grant is gone, the user reads its
  network and not the other tenant's; a second ``tenant apply`` changes nothing;
* a VM refused over the GPU cap stays held: the tenant's ``onevm release`` is refused as an ADMIN
  operation, ``onevm resume`` by oned's state rules; an UNDEPLOYED VM counts, so a resume cannot
  take the tenant past its cap;
* a PENDING VM refused after a call (here ``resize``, once the operator took a network from the
  tenant) is put on hold;
* a PCI device attached to a powered-off VM of a tenant without that grant ends detached;
* the host gate, through the deploy wrapper with the shipped example policy, on the VM documents
  oned produced for real VMs: admits llm-lab's VM, refuses vision's VM the GPU llm-lab holds, and
  refuses a VM of a group that is no tenant.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from realone import REPO, Installed, RealOne

from aifactory_core.policy.apply import apply_policy, read_state, vdc_network_grants
from aifactory_core.policy.oned import Oned
from aifactory_core.policy.schema import load_policy

pytestmark = pytest.mark.realone
USER = ("iso-user", "pw-iso")
OTHER = ("iso2-user", "pw-iso2")
HOLD, PENDING, STATE_ACTIVE, POWEROFF, UNDEPLOYED = 2, 1, 3, 8, 9
EXAMPLE_POLICY = REPO / "examples" / "policy.toml"


def _wait(condition: Any, what: str, one: RealOne, timeout: float = 120) -> None:
    from test_oned_hooks import hook_executions

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{hook_executions(one)}")
        time.sleep(0.5)


def _xml(one: RealOne, method: str, *params: Any) -> Any:
    """oned's own XML answer (pyone's bindings drop what they do not know)."""
    import xmlrpc.client

    from lxml import etree

    ok, answer, *_ = getattr(xmlrpc.client.ServerProxy(one.endpoint), method)(f"oneadmin:{one.password}", *params)
    assert ok, answer
    return etree.fromstring(answer.encode())


def _state(one: RealOne, vm: int) -> tuple[int, int]:
    info = _xml(one, "one.vm.info", vm, False)
    return int(info.findtext("STATE")), int(info.findtext("LCM_STATE"))


def _verdict(one: RealOne, vm: int) -> tuple[str | None, str]:
    info = _xml(one, "one.vm.info", vm, False)
    error = info.findtext("USER_TEMPLATE/AIFACTORY_POLICY_ERROR") or ""
    return info.findtext("USER_TEMPLATE/AIFACTORY_ADMISSION"), error


def _pci(one: RealOne, vm: int) -> list[str]:
    info = _xml(one, "one.vm.info", vm, False)
    return [f"{item.findtext('VENDOR')}:{item.findtext('DEVICE')}" for item in info.iterfind("TEMPLATE/PCI")]


def _set_policy_section(config: Path, section: str) -> str:
    """Replace any ``[plugin.policy]`` table of the frontend config with ``section``; returns the old text."""
    old = config.read_text()
    kept = re.sub(r"(?ms)^\[plugin\.policy\]\n.*?(?=^\[|\Z)", "", old)
    config.write_text(kept.rstrip("\n") + "\n\n" + section)
    return old


POLICY = """
[opennebula]
version = "7.0"
zone = 0
infrastructure_admin_groups = ["oneadmin"]

[tenant.iso]
group = "iso"
vdc = "vdc-iso"
clusters = [{cluster}]
max_gpus = 1
networks = [{networks}]
templates = [{templates}]

[[tenant.iso.devices]]
name = "dummy-gpu"
vendor = "10de"
device = "0863"
clusters = [{cluster}]

[tenant.iso2]
group = "iso2"
vdc = "vdc-iso2"
clusters = [{cluster}]
max_gpus = 1
networks = [{other_net}]
"""


class Tenancy:
    def __init__(self, one: RealOne, installed: Installed) -> None:
        self.one = one
        client = one.client()
        self.cluster = client.cluster.allocate("iso-shared")
        self.system_ds = client.datastore.allocate('NAME="iso-system" TYPE="SYSTEM_DS" TM_MAD="dummy"', self.cluster)
        self.host = client.host.allocate("iso-dummy", "dummy", "dummy", self.cluster)
        self.net = client.vn.allocate('NAME="iso-net" VN_MAD="dummy" BRIDGE="br0" AR=[TYPE="ETHER", SIZE="8"]',
                                      self.cluster)
        self.other_net = client.vn.allocate('NAME="iso2-net" VN_MAD="dummy" BRIDGE="br1" AR=[TYPE="ETHER", '
                                            'SIZE="8"]', self.cluster)
        gpu = 'CPU="1" MEMORY="64" PCI=[ VENDOR="10de", DEVICE="0863", CLASS="0302" ]'
        self.gpu_quota = client.template.allocate(f'NAME="iso-gpu" GPU="1" {gpu}')
        # an admin template without the GPU attribute oned's quota counts: admission still counts its PCI
        self.gpu_blind = client.template.allocate(f'NAME="iso-gpu-noattr" {gpu}')
        self.plain = client.template.allocate('NAME="iso-plain" CPU="1" MEMORY="64"')
        self.unplaceable = client.template.allocate(
            f'NAME="iso-nowhere" CPU="1" MEMORY="64" NIC=[ NETWORK_ID="{self.net}" ] '
            'SCHED_REQUIREMENTS="NAME = \\"no-such-host\\""')
        self.uid = client.user.allocate(*USER, "core", [])
        self.other_uid = client.user.allocate(*OTHER, "core", [])
        self.policy = one.top / "iso-policy.toml"
        self.write_policy([self.net])
        self.first_apply = self.apply()
        groups = {group.NAME: group.ID for group in client.grouppool.info().GROUP}
        self.gid, self.other_gid = groups["iso"], groups["iso2"]
        client.user.chgrp(self.uid, self.gid)
        client.user.chgrp(self.other_uid, self.other_gid)
        self.ledger = one.top / "iso-ledger"
        self.ledger.mkdir()
        subprocess.run(["chown", "-R", "oneadmin:oneadmin", str(self.ledger), str(self.policy)], check=True)
        self.config = one.location / "etc" / "aifactory.conf"
        self.old_config = _set_policy_section(
            self.config, f'[plugin.policy]\nfile = "{self.policy}"\naccounting_dir = "{self.ledger}"\n')
        self.auth = one.top / "iso-user.auth"
        self.auth.write_text(":".join(USER) + "\n")
        subprocess.run(["chown", "oneadmin:oneadmin", str(self.auth)], check=True)
        self.auth.chmod(0o600)
        _wait(lambda: client.host.info(self.host).STATE == 2, "the dummy host to be MONITORED", one)
        _wait(lambda: int(client.datastore.info(self.system_ds).FREE_MB) > 0, "the system datastore's capacity", one)

    def write_policy(self, networks: list[int], extra_templates: list[int] | None = None) -> None:
        templates = ", ".join(str(t) for t in (self.gpu_quota, self.gpu_blind, self.plain, self.unplaceable,
                                               *(extra_templates or [])))
        self.policy.write_text(POLICY.format(cluster=self.cluster, networks=", ".join(map(str, networks)),
                                             templates=templates, other_net=self.other_net))

    def apply(self) -> list[str]:
        oned = Oned(self.one.endpoint, f"oneadmin:{self.one.password}", transport="pyone")
        return [str(change) for change in apply_policy(oned, load_policy(str(self.policy)))]

    def tenant_cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """An OpenNebula command as the tenant user (its credentials in ONE_AUTH)."""
        return self.one.run(*argv, check=False, env={"ONE_AUTH": str(self.auth)})

    def instantiate(self, template: int, name: str) -> int:
        return int(self.one.client(":".join(USER)).template.instantiate(template, name, False, "", False))


@pytest.fixture(scope="module")
def iso(real_one: RealOne, suite_installed: Installed) -> Iterator[Tenancy]:
    tenancy = Tenancy(real_one, suite_installed)
    yield tenancy
    client = real_one.client()
    for vm in client.vmpool.info(-2, -1, -1, -1).VM:
        client.vm.action("terminate-hard", vm.ID)
    client.host.status(tenancy.host, 2)  # OFFLINE: later modules' `onehost sync` cannot reach it
    tenancy.config.write_text(tenancy.old_config)


def test_network_access_is_the_tenants_own_and_a_second_apply_changes_nothing(iso: Tenancy) -> None:
    cluster_grant = f"remove ACL @{iso.gid} NET/%{iso.cluster} USE #0 (the VDC's network grant"
    assert any(change.startswith(f"iso: {cluster_grant}") for change in iso.first_apply), iso.first_apply
    oned = Oned(iso.one.endpoint, f"oneadmin:{iso.one.password}", transport="pyone")
    state = read_state(oned)
    for gid in (iso.gid, iso.other_gid):
        assert vdc_network_grants(state, gid, 0, {(0, iso.cluster)}) == []
    acls = {acl.STRING for acl in iso.one.client().acl.info().ACL}
    assert f"@{iso.gid} HOST/%{iso.cluster} MANAGE #0" in acls  # the scheduler needs it to place the VMs
    assert f"@{iso.gid} NET/#{iso.net} USE #0" in acls
    user = iso.one.client(":".join(USER))
    assert user.vn.info(iso.net).ID == iso.net
    import pyone

    with pytest.raises(pyone.OneAuthorizationException):
        user.vn.info(iso.other_net)  # iso2's network in the same cluster
    assert iso.apply() == []
    print(f"first tenant apply: {len(iso.first_apply)} changes; second: 0")


def test_a_request_by_short_address_is_judged_as_the_device_the_hosts_list_there(iso: Tenancy) -> None:
    """``PCI = [SHORT_ADDRESS = ...]`` gets whatever device sits there: admission identifies it from
    oned's host pool (the dummy host lists its NVIDIA 10de:0863 at 02:00.0 and an ASMedia USB
    controller 1b21:0aa7 at 00:06.0) and judges that device against the tenant's grants."""
    one = iso.one
    client = one.client()
    by_address = {short: client.template.allocate(f'NAME="iso-short-{short.replace(":", "-")}" CPU="1" '
                                                  f'MEMORY="64" PCI=[ SHORT_ADDRESS="{short}" ]')
                  for short in ("02:00.0", "00:06.0")}
    iso.write_policy([iso.net], extra_templates=list(by_address.values()))
    iso.apply()
    gpu = iso.instantiate(by_address["02:00.0"], "iso-short-gpu")
    usb = iso.instantiate(by_address["00:06.0"], "iso-short-usb")
    try:
        _wait(lambda: _state(one, gpu) == (STATE_ACTIVE, 3), f"VM {gpu} (SHORT_ADDRESS 02:00.0) RUNNING", one)
        assert _verdict(one, gpu) == ("ADMITTED", "")
        assert _pci(one, gpu) == ["10de:0863"]
        _wait(lambda: _verdict(one, usb)[0] == "REFUSED", f"VM {usb} (SHORT_ADDRESS 00:06.0) refused", one)
        assert _state(one, usb)[0] == HOLD
        refused = _verdict(one, usb)[1]
        assert "tenant.iso.devices" in refused and "1b21:0aa7" in refused, refused
        print(f"VM {gpu}: {_verdict(one, gpu)} {_pci(one, gpu)}; VM {usb}: {_verdict(one, usb)}")
    finally:
        for vm in (gpu, usb):
            client.vm.action("terminate-hard", vm)
        _wait(lambda: all(_state(one, vm)[0] == 6 for vm in (gpu, usb)), "the SHORT_ADDRESS VMs DONE", one)
        iso.write_policy([iso.net])


def test_a_vm_over_the_gpu_cap_cannot_be_run_by_release_or_resume(iso: Tenancy) -> None:
    one = iso.one
    first = iso.instantiate(iso.gpu_quota, "iso-first")
    _wait(lambda: _state(one, first) == (STATE_ACTIVE, 3), f"VM {first} RUNNING", one)
    over = iso.instantiate(iso.gpu_blind, "iso-over")  # oned's GPU quota does not see it: admission does
    _wait(lambda: _verdict(one, over)[0] == "REFUSED", f"VM {over} refused", one)
    assert "tenant.iso.max_gpus" in _verdict(one, over)[1]
    release = iso.tenant_cli("onevm", "release", str(over))
    assert release.returncode != 0 and "Not authorized to perform ADMIN VM" in release.stderr + release.stdout
    resume = iso.tenant_cli("onevm", "resume", str(over))
    assert resume.returncode != 0 and "resume" in resume.stderr + resume.stdout
    time.sleep(3)  # a scheduler window or two: nothing may start it
    assert _state(one, over)[0] == HOLD
    print(f"tenant 'onevm release {over}': {(release.stderr or release.stdout).strip()}")
    print(f"tenant 'onevm resume {over}': {(resume.stderr or resume.stdout).strip()}")

    # An undeployed VM holds no device, but `resume` brings it back without any hooked call: it counts.
    assert iso.tenant_cli("onevm", "undeploy", "--hard", str(first)).returncode == 0
    _wait(lambda: _state(one, first)[0] == UNDEPLOYED, f"VM {first} UNDEPLOYED", one)
    meanwhile = iso.instantiate(iso.gpu_blind, "iso-meanwhile")
    _wait(lambda: _verdict(one, meanwhile)[0] == "REFUSED", f"VM {meanwhile} refused", one)
    assert "holds 1 GPUs" in _verdict(one, meanwhile)[1]
    assert iso.tenant_cli("onevm", "resume", str(first)).returncode == 0
    _wait(lambda: _state(one, first) == (STATE_ACTIVE, 3), f"VM {first} RUNNING again", one)
    assert _state(one, meanwhile)[0] == HOLD and _state(one, over)[0] == HOLD


def test_a_pending_vm_refused_after_a_call_is_put_on_hold(iso: Tenancy) -> None:
    one = iso.one
    vm = iso.instantiate(iso.unplaceable, "iso-pending")
    _wait(lambda: _verdict(one, vm)[0] == "ADMITTED" and _state(one, vm)[0] == PENDING, f"VM {vm} PENDING", one)
    iso.write_policy([])  # the operator takes the network from the tenant
    try:
        resized = iso.tenant_cli("onevm", "resize", str(vm), "--memory", "128")
        assert resized.returncode == 0, resized.stderr
        _wait(lambda: _verdict(one, vm)[0] == "REFUSED", f"VM {vm} refused after resize", one)
        assert _state(one, vm)[0] == HOLD
        assert "tenant.iso.networks" in _verdict(one, vm)[1]
    finally:
        iso.write_policy([iso.net])


def test_a_pci_attach_the_tenant_may_not_have_ends_detached(iso: Tenancy) -> None:
    one = iso.one
    vm = iso.instantiate(iso.plain, "iso-attach")
    _wait(lambda: _state(one, vm) == (STATE_ACTIVE, 3), f"VM {vm} RUNNING", one)
    assert iso.tenant_cli("onevm", "poweroff", "--hard", str(vm)).returncode == 0
    _wait(lambda: _state(one, vm)[0] == POWEROFF, f"VM {vm} POWEROFF", one)
    usb = 'PCI = [ VENDOR = "1b21", DEVICE = "0aa7", CLASS = "0c03" ]'
    import pyone

    # updateconf cannot add a hostdev through RAW: RAW/DATA is one of oned's restricted attributes.
    with pytest.raises(pyone.OneAuthorizationException, match="restricted attribute"):
        one.client(":".join(USER)).vm.updateconf(vm, 'RAW = [ TYPE = "kvm", DATA = "<devices/>" ]', 1)
    # oned lets the tenant attach the USB controller (VM_RESTRICTED_ATTR = "PCI" names no
    # sub-attribute, and Template::check_restricted then compares single values only, never a
    # vector PCI); the hook detaches it again.
    one.client(":".join(USER)).vm.attachpci(vm, usb)
    _wait(lambda: _verdict(one, vm)[0] == "REFUSED" and _pci(one, vm) == [], f"VM {vm}'s USB device detached", one)
    assert "1b21:0aa7" in _verdict(one, vm)[1]
    assert _state(one, vm)[0] == POWEROFF
    print(f"VM {vm}: PCI after the hook: {_pci(one, vm)}; {_verdict(one, vm)}")


# ---- the host gate on the documents of real VMs -----------------------------------------------------


def _dummy_host_root(dest: Path) -> Path:
    """A host whose sysfs has an H100 (10de:2330) at 0000:02:00.0, the address the dummy host
    reports its GPU at, so the VMs oned placed there are deployed against it."""
    import json

    sys.path.insert(0, str(REPO / "tests" / "fixtures"))
    try:
        import hostgen
    finally:
        sys.path.remove(str(REPO / "tests" / "fixtures"))
    topology = json.loads((REPO / "tests" / "fixtures" / "topologies" / "two-node-small.json").read_text())
    topology["pci_roots"] = [{"bus": "0x00", "node": 0, "devices": [
        {"slot": 1, "type": "root-port", "devices": [{"type": "nvme"}]},
        {"slot": 2, "type": "root-port", "devices": [{"type": "h100"}]}]}]
    root = hostgen.generate(topology, dest)
    assert (root / "sys/bus/pci/devices/0000:02:00.0/device").read_text().strip() == "0x2330"
    return root


def _deployment(vm: int, gid: int, gname: str, address: str) -> bytes:
    from lxml import etree
    from test_policy_host import deployment_xml

    root = etree.fromstring(deployment_xml(vm, gname, (address,)))
    meta = root.find("metadata/{http://opennebula.org/xmlns/libvirt/1.0}vm")
    meta.find("{http://opennebula.org/xmlns/libvirt/1.0}gid").text = str(gid)
    return etree.tostring(root)


def test_host_gate_with_the_example_policy_on_real_vm_documents(iso: Tenancy, tmp_path: Path) -> None:
    from lxml import etree

    one, client = iso.one, iso.one.client()
    for vm in client.vmpool.info(-2, -1, -1, -1).VM:  # free the dummy host's GPU
        client.vm.action("terminate-hard", vm.ID)
    _wait(lambda: not client.vmpool.info(-2, -1, -1, -1).VM, "the earlier VMs to end", one)
    existing = {group.NAME: group.ID for group in client.grouppool.info().GROUP}  # an earlier module's tenants
    groups = {name: existing.get(name) or client.group.allocate(name) for name in ("llm-lab", "vision", "intruders")}
    documents: dict[str, bytes] = {}
    for name, gid in groups.items():  # the operator runs a GPU VM and hands it to the group
        vm = int(client.template.instantiate(iso.gpu_quota, f"{name}-vm", False, "", False))
        _wait(lambda vm=vm: _state(one, vm) == (STATE_ACTIVE, 3), f"VM {vm} RUNNING", one)
        client.vm.chown(vm, -1, gid)
        documents[name] = etree.tostring(_xml(one, "one.vm.info", vm, False))
        client.vm.action("terminate-hard", vm)
        _wait(lambda vm=vm: _state(one, vm)[0] == 6, f"VM {vm} DONE", one)
    policy = EXAMPLE_POLICY
    example = EXAMPLE_POLICY.read_text()
    wanted = {"llm-lab": 100, "vision": 101}
    if any(groups[name] != gid for name, gid in wanted.items()) or iso.cluster != 101:
        # oned numbered this session's objects otherwise: the example with the ids this oned gave
        for name, gid in wanted.items():
            example = re.sub(rf'(group = "{name}"[^\n]*\ngroup_id = ){gid}\b', rf"\g<1>{groups[name]}", example)
        example = example.replace("clusters = [101]", f"clusters = [{iso.cluster}]")
        policy = tmp_path / "example-policy.toml"
        policy.write_text(example)
        print(f"example policy with this oned's ids: groups {groups}, cluster {iso.cluster}")
    checked = load_policy(str(policy))
    assert checked.tenant_for(groups["llm-lab"], "llm-lab").key == "llm-lab"
    assert checked.tenant_for(groups["vision"], "vision").key == "vision"
    root = _dummy_host_root(tmp_path / "root")
    originals = tmp_path / "remotes"
    originals.mkdir()
    (originals / "deploy.one").write_text("#!/bin/sh\nprintf '%s\\n' \"$@\" >> \"$(dirname \"$0\")/deploy.argv\"\n"
                                          "cat > /dev/null\necho one-$3-deployed\n")
    (originals / "deploy.one").chmod(0o755)
    config = tmp_path / "aifactory.conf"
    config.write_text(f'[plugins]\nenabled = ["policy"]\n\n[plugin.policy]\nfile = "{policy}"\n')
    env = {**os.environ, "AIFACTORY_PYTHON": sys.executable, "AIFACTORY_HOST_ROOT": str(root),
           "AIFACTORY_STATE_DIR": str(tmp_path / "state"), "AIFACTORY_CONFIG": str(config),
           "AIFACTORY_VMM_ORIGINAL_DIR": str(originals)}
    env.pop("AIFACTORY_POLICY", None)
    libvirt_state = root / "run/libvirt/qemu"  # the host's running domains, as libvirt keeps them
    libvirt_state.mkdir(parents=True)
    results = {}
    for name, document in documents.items():
        vm_element = etree.fromstring(document)
        vm = int(vm_element.findtext("ID"))
        address = vm_element.findtext("TEMPLATE/PCI/ADDRESS")
        assert address == "0000:02:00:0" and vm_element.findtext("GNAME") == name
        directory = root / f"var/lib/one/datastores/0/{vm}"
        directory.mkdir(parents=True)
        (directory / "vm.xml").write_bytes(document)  # what one_vmm_exec writes beside the deployment file
        domain = _deployment(vm, groups[name], name, "0000:02:00.0")
        (directory / "deployment.0").write_bytes(domain)
        argv = [str(REPO / "drivers" / "vmm" / "kvm" / "deploy"), f"/var/lib/one//datastores/0/{vm}/deployment.0",
                "iso-dummy", str(vm), "iso-dummy"]
        results[name] = subprocess.run(argv, input=domain, capture_output=True, env=env, timeout=120, check=False)
        print(f"deploy {name} VM {vm}: exit {results[name].returncode} "
              f"{(results[name].stdout + results[name].stderr).decode().strip()}")
        if results[name].returncode == 0:  # libvirt started it (the recorder stands in for OpenNebula's deploy)
            (libvirt_state / f"one-{vm}.xml").write_bytes(domain)
    llm = results["llm-lab"]
    assert (llm.returncode, llm.stderr) == (0, b"") and llm.stdout.endswith(b"-deployed\n")
    vision = results["vision"]
    assert vision.returncode == 1 and b"0000:02:00.0 held by VM" in vision.stderr, vision.stderr
    stranger = results["intruders"]
    assert stranger.returncode == 1 and b"policy rule tenant: group intruders is no tenant" in stranger.stderr
    assert (originals / "deploy.argv").read_text().count("iso-dummy") == 2  # only llm-lab's VM reached deploy
