"""The VNM pre/post/clean hooks end to end: OpenNebula's reduced VM document (the synthesized
sample in ``fixtures/nics/vnm_action_vm.xml``, built like one_vmm_exec.rb's VNM action document),
the owner from ``vm.xml``, the tenant policy, the plugins, the lifecycle journal, and VF settings
read back from a netlink peer speaking pyroute2's wire format."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from fixtures.nics.netlink_double import NetlinkDouble
from test_sriov_pool import make_pf

from aifactory_core.config import Config, parse_config
from aifactory_core.domain import load_domain
from aifactory_core.errors import PolicyRefused
from aifactory_core.host import netlink_vf
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle.journal import Journal
from aifactory_core.vnm import hook
from aifactory_core.vnm import vf as vf_actions
from aifactory_core.vnm.domain import reconcile_hostdev_interfaces

SAMPLE = Path(__file__).parent / "fixtures/nics/vnm_action_vm.xml"
POLICY = """
[opennebula]
version = "7.0"
[tenant.llm]
group = "llm"
group_id = 100
max_gpus = 1
networks = [0, 7]
vlans = ["1000-1009"]
ib_pkeys = ["0x0010-0x001f"]
[tenant.other]
group = "other"
group_id = 101
max_gpus = 1
networks = [8]
vlans = ["300-309"]
"""
VM_XML = "<VM><ID>42</ID><UID>5</UID><GID>{gid}</GID><UNAME>alice</UNAME><GNAME>{gname}</GNAME><TEMPLATE/></VM>"


def stdin(vlan: str = "1001") -> bytes:
    text = SAMPLE.read_text().replace("<VLAN_ID><![CDATA[1001]]>", f"<VLAN_ID><![CDATA[{vlan}]]>")
    return base64.b64encode(text.encode())


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[HostRoot, Config, NetlinkDouble]:
    host = make_pf(tmp_path)
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    config = parse_config({"plugins": {"enabled": ["sriov", "infiniband", "bluefield"]},
                           "plugin": {"policy": {"file": str(policy)}}})
    peer = NetlinkDouble({5: 4})
    monkeypatch.setattr(vf_actions, "_netlink", peer)
    monkeypatch.delenv("AIFACTORY_POLICY", raising=False)
    return host, config, peer


def owner(host: HostRoot, gid: int = 100, gname: str = "llm") -> None:
    directory = host.path("/var/lib/one/datastores/0/42")
    directory.mkdir(parents=True)
    (directory / "vm.xml").write_text(VM_XML.format(gid=gid, gname=gname))


def test_pre_configures_post_reapplies_clean_scrubs(world: tuple[HostRoot, Config, NetlinkDouble]) -> None:
    host, config, peer = world
    owner(host)
    assert hook.run("pre", stdin(), host, config) == "VM 42: 1 network action(s) made"
    vf0 = netlink_vf.read_vfs(peer, 5)[0]
    assert (vf0.mac, vf0.vlan, vf0.spoofchk, vf0.trust) == ("02:00:c0:a8:c9:0a", 1001, True, False)
    assert vf_actions.vf_owners(hook.vnm_host(host)) == {"ens1f0np0/0": 42}

    peer.vfs[5][0].update(vlan=0, spoofchk=0)  # OpenNebula's activate_vf (post) writes its own view
    assert "1 network action(s) made or re-applied" in hook.run("post", stdin(), host, config)
    assert netlink_vf.read_vfs(peer, 5)[0] == vf0

    assert hook.run("clean", stdin(), host, config) == "VM 42: network released"
    assert netlink_vf.read_vfs(peer, 5)[0] == netlink_vf.CLEAN
    assert vf_actions.vf_owners(hook.vnm_host(host)) == {}
    assert Journal.load(hook.vnm_host(host), 42) is None


def test_clean_after_the_pool_shrank_past_the_vf_sets_nothing_and_releases_it(
        world: tuple[HostRoot, Config, NetlinkDouble]) -> None:
    """A VF the pool no longer has (sriov_numvfs lowered since) is gone with its settings: the
    scrub makes no netlink change, and the VM's owner token is released."""
    host, config, peer = world
    owner(host)
    hook.run("pre", stdin(), host, config)
    (host.pci_devices / "0000:18:00.0" / "sriov_numvfs").write_text("0\n")
    sets = peer.sets()
    assert hook.run("clean", stdin(), host, config) == "VM 42: network released"
    assert peer.sets() == sets
    assert vf_actions.vf_owners(hook.vnm_host(host)) == {}


def test_vlan_outside_the_tenant_grant_configures_nothing(world: tuple[HostRoot, Config, NetlinkDouble]) -> None:
    host, config, peer = world
    owner(host)
    with pytest.raises(PolicyRefused, match="VLAN 300 is outside tenant llm"):
        hook.run("pre", stdin("300"), host, config)
    assert peer.sets() == 0
    assert Journal.load(hook.vnm_host(host), 42) is None


def test_another_tenants_vm_is_refused_its_network(world: tuple[HostRoot, Config, NetlinkDouble]) -> None:
    host, config, peer = world
    owner(host, gid=101, gname="other")
    with pytest.raises(PolicyRefused, match="network 7 is not granted to tenant other"):
        hook.run("pre", stdin(), host, config)
    assert peer.sets() == 0


def full_vm_document(host: HostRoot, vlan: str = "1001", gid: int = 100, gname: str = "llm") -> Path:
    """The ``vm.xml`` OpenNebula writes to the VM directory between ``pre`` and ``deploy``: the
    sample's PCI NIC with the owner the full ``<VM>`` carries."""
    text = SAMPLE.read_text().replace("<VLAN_ID><![CDATA[1001]]>", f"<VLAN_ID><![CDATA[{vlan}]]>")
    text = text.replace("<ID>42</ID>", f"<ID>42</ID><UID>5</UID><GID>{gid}</GID><UNAME>alice</UNAME>"
                                       f"<GNAME>{gname}</GNAME>", 1)
    directory = host.path("/var/lib/one/datastores/0/42")
    directory.mkdir(parents=True)
    (directory / "vm.xml").write_text(text)
    return directory / "vm.xml"


DEPLOY_DOMAIN = b"""<domain type='kvm'><name>one-42</name><devices/>
  <metadata><one:vm xmlns:one='http://opennebula.org/xmlns/libvirt/1.0'><one:uid>5</one:uid>
  <one:gid>100</one:gid></one:vm></metadata></domain>"""


@pytest.fixture
def device_prepare_sees(monkeypatch: pytest.MonkeyPatch, world: tuple[HostRoot, Config, NetlinkDouble]) -> list[int]:
    """The VF's VLAN as the VMM's device step (which binds VFs to vfio-pci) finds it."""
    from aifactory_core.lifecycle import executor

    _host, _config, peer = world
    seen: list[int] = []
    original = executor.prepare

    def recording(host: HostRoot, vm: int, actions: object, writer: object = None, **scopes: object) -> object:
        if not str(host.state_dir).endswith("vnm"):
            seen.append(netlink_vf.read_vfs(peer, 5)[0].vlan)
        return original(host, vm, actions, writer, **scopes)  # type: ignore[arg-type]

    monkeypatch.setattr(executor, "prepare", recording)
    return seen


def test_first_deploy_configures_the_vf_in_deploy_before_the_device_step(
        world: tuple[HostRoot, Config, NetlinkDouble], device_prepare_sees: list[int]) -> None:
    from aifactory_core import vmm

    host, config, peer = world
    assert "not known before the VM directory exists" in hook.run("pre", stdin(), host, config)
    assert peer.sets() == 0
    document = full_vm_document(host)
    _domain, network_made = vmm.prepare_deploy(host, config, DEPLOY_DOMAIN, 42, document)
    assert network_made and device_prepare_sees == [1001]  # tagged before anything is bound
    assert vf_actions.vf_owners(hook.vnm_host(host)) == {"ens1f0np0/0": 42}
    peer.vfs[5][0].update(vlan=0)  # OpenNebula's activate_vf in post
    assert "1 network action(s) made or re-applied" in hook.run("post", stdin(), host, config)
    assert netlink_vf.read_vfs(peer, 5)[0].vlan == 1001
    _domain, again = vmm.prepare_deploy(host, config, DEPLOY_DOMAIN, 42, document)  # a retried deploy
    assert not again
    hook.run("clean", stdin(), host, config)
    assert netlink_vf.read_vfs(peer, 5)[0] == netlink_vf.CLEAN


def test_deploy_after_pre_configured_leaves_the_network_to_vnm(
        world: tuple[HostRoot, Config, NetlinkDouble], device_prepare_sees: list[int]) -> None:
    from aifactory_core import vmm

    host, config, peer = world
    document = full_vm_document(host)
    hook.run("pre", stdin(), host, config)
    sets = peer.sets()
    _domain, network_made = vmm.prepare_deploy(host, config, DEPLOY_DOMAIN, 42, document)
    assert not network_made and peer.sets() == sets and device_prepare_sees == [1001]


def test_deploy_refused_its_vlan_configures_nothing(
        world: tuple[HostRoot, Config, NetlinkDouble], device_prepare_sees: list[int]) -> None:
    from aifactory_core import vmm

    host, config, peer = world
    document = full_vm_document(host, vlan="300")
    with pytest.raises(PolicyRefused, match="VLAN 300 is outside tenant llm"):
        vmm.prepare_deploy(host, config, DEPLOY_DOMAIN, 42, document)
    assert peer.sets() == 0 and device_prepare_sees == []
    assert Journal.load(hook.vnm_host(host), 42) is None


def test_device_step_failing_at_deploy_gives_the_vf_back_clean(
        world: tuple[HostRoot, Config, NetlinkDouble], monkeypatch: pytest.MonkeyPatch) -> None:
    from aifactory_core import vmm
    from aifactory_core.errors import HostError
    from aifactory_core.lifecycle import executor

    host, config, peer = world
    document = full_vm_document(host)
    original = executor.prepare

    def failing(host_: HostRoot, vm: int, actions: object, writer: object = None, **scopes: object) -> object:
        if not str(host_.state_dir).endswith("vnm"):
            raise HostError("0000:18:00.2: unbind timed out")
        return original(host_, vm, actions, writer, **scopes)  # type: ignore[arg-type]

    monkeypatch.setattr(executor, "prepare", failing)
    with pytest.raises(HostError, match="unbind timed out"):
        vmm.prepare_deploy(host, config, DEPLOY_DOMAIN, 42, document)
    assert peer.sets() > 0 and netlink_vf.read_vfs(peer, 5)[0] == netlink_vf.CLEAN
    assert Journal.load(hook.vnm_host(host), 42) is None
    assert vf_actions.vf_owners(hook.vnm_host(host)) == {}


def test_vm_without_pci_nics_needs_no_tenant_grant(world: tuple[HostRoot, Config, NetlinkDouble]) -> None:
    host, _config, peer = world
    no_policy = parse_config({"plugins": {"enabled": ["sriov"]}})
    text = SAMPLE.read_text()
    text = text[:text.index("<PCI>")] + text[text.index("</PCI>") + len("</PCI>"):]
    assert hook.run("pre", base64.b64encode(text.encode()), host, no_policy) == "VM 42: 0 network action(s) made"
    assert peer.sets() == 0


def test_post_configures_when_nothing_earlier_could(world: tuple[HostRoot, Config, NetlinkDouble]) -> None:
    host, config, peer = world
    assert "configured at deploy, else at post" in hook.run("pre", stdin(), host, config)
    assert peer.sets() == 0
    owner(host)  # a deploy that did not go through the suite's wrapper
    hook.run("post", stdin(), host, config)
    assert netlink_vf.read_vfs(peer, 5)[0].vlan == 1001
    hook.run("clean", stdin(), host, config)
    assert netlink_vf.read_vfs(peer, 5)[0] == netlink_vf.CLEAN


def refuse_vlan(peer: NetlinkDouble, vlan: int) -> None:
    """The kernel refuses ``vlan`` on a VF after the MAC went in: a configuration made half-way."""
    from pyroute2.netlink.exceptions import NetlinkError

    original = peer._set

    def refusing(index: int, spec: dict[str, object]) -> list[object]:
        if spec.get("vlan") == {"vlan": vlan, "qos": 0}:
            original(index, {"vf": spec["vf"], "mac": spec["mac"]})
            raise NetlinkError(22, "Invalid argument")
        return original(index, spec)

    peer._set = refusing  # type: ignore[method-assign]


def test_failure_half_way_rolls_back(world: tuple[HostRoot, Config, NetlinkDouble]) -> None:
    host, config, peer = world
    owner(host)
    refuse_vlan(peer, 1001)
    with pytest.raises(Exception, match="cannot configure VF 0"):
        hook.run("pre", stdin(), host, config)
    assert netlink_vf.read_vfs(peer, 5)[0] == netlink_vf.CLEAN
    assert Journal.load(hook.vnm_host(host), 42) is None
    assert vf_actions.vf_owners(hook.vnm_host(host)) == {}


def test_main_reports_bad_documents_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AIFACTORY_HOST_ROOT", str(tmp_path))
    monkeypatch.setenv("AIFACTORY_CONFIG", str(tmp_path / "none.conf"))
    assert hook.main(["pre"], io.BytesIO(b"not base64 !!")) == 2
    err = capsys.readouterr().err
    assert err.startswith("aifactory: ") and len(err.strip().splitlines()) == 1
    assert hook.main(["bogus"], io.BytesIO(stdin())) == 2


def test_main_refuses_oversized_input_by_its_size(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AIFACTORY_HOST_ROOT", str(tmp_path))
    monkeypatch.setenv("AIFACTORY_CONFIG", str(tmp_path / "none.conf"))
    assert hook.main(["pre"], io.BytesIO(b"A" * (hook.MAX_STDIN + 1))) != 0
    err = capsys.readouterr().err
    assert "larger than" in err and len(err.strip().splitlines()) == 1


def test_main_reports_a_defect_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AIFACTORY_HOST_ROOT", str(tmp_path))
    monkeypatch.setenv("AIFACTORY_CONFIG", str(tmp_path / "none.conf"))
    monkeypatch.delenv("AIFACTORY_DEBUG", raising=False)

    def broken(*_args: object) -> str:
        raise KeyError("boom")

    monkeypatch.setattr(hook, "run", broken)
    monkeypatch.setattr("aifactory_core.config.load_config", lambda *_args: None)
    assert hook.main(["pre"], io.BytesIO(stdin())) == 1
    err = capsys.readouterr().err
    assert err.startswith("aifactory: internal error: KeyError") and len(err.strip().splitlines()) == 1


def test_domain_hostdev_interface_follows_the_journal(world: tuple[HostRoot, Config, NetlinkDouble]) -> None:
    host, config, _peer = world
    owner(host)
    hook.run("pre", stdin(), host, config)
    domain = load_domain(b"""<domain type='kvm'><name>one-42</name><devices>
      <interface type='hostdev' managed='no'><mac address='02:00:00:00:00:99'/>
        <source><address type='pci' domain='0x0000' bus='0x18' slot='0x00' function='0x2'/></source>
        <vlan><tag id='55'/></vlan></interface></devices></domain>""")
    assert reconcile_hostdev_interfaces(domain, hook.vnm_host(host), 42) == 1
    interface = domain.find("devices/interface")
    assert interface is not None and interface.find("vlan") is None
    assert interface.find("mac").get("address") == "02:00:c0:a8:c9:0a"  # type: ignore[union-attr]


SECOND_PCI_NIC = ("<PCI><ADDRESS><![CDATA[0000:18:00:3]]></ADDRESS><CLASS><![CDATA[0200]]></CLASS>"
                  "<DEVICE><![CDATA[101e]]></DEVICE><MAC><![CDATA[02:00:c0:a8:c9:0b]]></MAC>"
                  "<NETWORK_ID><![CDATA[7]]></NETWORK_ID><NIC_ID><![CDATA[2]]></NIC_ID><PCI_ID><![CDATA[2]]></PCI_ID>"
                  "<PHYDEV><![CDATA[ens1f0np0]]></PHYDEV><SHORT_ADDRESS><![CDATA[18:00.3]]></SHORT_ADDRESS>"
                  "<TYPE><![CDATA[NIC]]></TYPE><VENDOR><![CDATA[15b3]]></VENDOR><VLAN_ID><![CDATA[1002]]></VLAN_ID>"
                  "<VN_MAD><![CDATA[802.1Q]]></VN_MAD>"
                  "{attach}</PCI>")


def hotplug_stdin(second: bool = True, attach: str = "pci") -> bytes:
    """The VNM document of ``onevm nic-attach``/``nic-detach``: the whole VM, with the NIC the action
    is about marked ``ATTACH = "YES"`` (OpenNebula's get_vnm_drivers keeps every NIC/PCI)."""
    text = SAMPLE.read_text()
    marker = "<ATTACH><![CDATA[YES]]></ATTACH>"
    if second:
        text = text.replace("</PCI>", "</PCI>" + SECOND_PCI_NIC.format(attach=marker if attach == "pci" else ""), 1)
    if attach == "nic":
        bridge = "<VN_MAD><![CDATA[bridge]]></VN_MAD>"
        text = text.replace(f"{bridge}</NIC>", f"{bridge}{marker}</NIC>")
    return base64.b64encode(text.encode())


def test_hot_attached_nic_joins_and_its_detach_leaves_the_other_vfs_configured(
        world: tuple[HostRoot, Config, NetlinkDouble]) -> None:
    host, config, peer = world
    owner(host)
    hook.run("pre", stdin(), host, config)
    before = netlink_vf.read_vfs(peer, 5)[0]
    assert hook.run("pre", hotplug_stdin(), host, config) == "VM 42: 1 network action(s) made"
    vfs = netlink_vf.read_vfs(peer, 5)
    assert vfs[0] == before and (vfs[1].mac, vfs[1].vlan) == ("02:00:c0:a8:c9:0b", 1002)
    assert vf_actions.vf_owners(hook.vnm_host(host)) == {"ens1f0np0/0": 42, "ens1f0np0/1": 42}
    journal = Journal.load(hook.vnm_host(host), 42)
    assert journal is not None and sorted({step.scope for step in journal.steps}) == ["nic1", "nic2"]
    assert hook.run("pre", hotplug_stdin(), host, config) == "VM 42: 1 network action(s) made"  # repeated pre
    assert len(Journal.load(hook.vnm_host(host), 42).steps) == len(journal.steps)  # type: ignore[union-attr]

    assert hook.run("clean", hotplug_stdin(), host, config) == "VM 42: PCI 2 released"
    vfs = netlink_vf.read_vfs(peer, 5)
    assert vfs[0] == before and vfs[1] == netlink_vf.CLEAN  # the VM's other VF keeps its VLAN
    assert vf_actions.vf_owners(hook.vnm_host(host)) == {"ens1f0np0/0": 42}
    assert hook.run("clean", stdin(), host, config) == "VM 42: network released"
    assert netlink_vf.read_vfs(peer, 5)[0] == netlink_vf.CLEAN
    assert Journal.load(hook.vnm_host(host), 42) is None


def test_detaching_a_plain_nic_touches_no_vf(world: tuple[HostRoot, Config, NetlinkDouble]) -> None:
    host, config, peer = world
    owner(host)
    hook.run("pre", stdin(), host, config)
    before, sets = netlink_vf.read_vfs(peer, 5)[0], peer.sets()
    for phase in ("pre", "post", "clean"):
        hook.run(phase, hotplug_stdin(second=False, attach="nic"), host, config)
    assert netlink_vf.read_vfs(peer, 5)[0] == before and peer.sets() == sets
    assert vf_actions.vf_owners(hook.vnm_host(host)) == {"ens1f0np0/0": 42}


def test_hot_attach_failing_half_way_undoes_only_the_new_nic(world: tuple[HostRoot, Config, NetlinkDouble]) -> None:
    host, config, peer = world
    owner(host)
    hook.run("pre", stdin(), host, config)
    before = netlink_vf.read_vfs(peer, 5)[0]
    refuse_vlan(peer, 1002)
    with pytest.raises(Exception, match="cannot configure VF 1"):
        hook.run("pre", hotplug_stdin(), host, config)
    vfs = netlink_vf.read_vfs(peer, 5)
    assert vfs[0] == before and vfs[1] == netlink_vf.CLEAN
    journal = Journal.load(hook.vnm_host(host), 42)
    assert journal is not None and {step.scope for step in journal.steps} == {"nic1"}
    assert vf_actions.vf_owners(hook.vnm_host(host)) == {"ens1f0np0/0": 42}


def test_unprivileged_vf_changes_go_through_the_root_helper(world: tuple[HostRoot, Config, NetlinkDouble],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """As oneadmin (the live host, not root) the VF settings and the scrub are handed to the root
    helper's closed grammar; the helper judges them by its root-owned config (the PF is in
    ``[host] vf_pools``) and makes them (here on the test's host root and netlink double), and the
    unprivileged side reads them back."""
    from aifactory_core import roothelper
    from aifactory_core.config import HostConfig

    host, config, peer = world
    handed: list[list[str]] = []
    root_config = HostConfig(vf_pools=("0000:18:00.0",))

    def helper(verb: str, pf: str, vf: int, *rest: str) -> None:
        argv = [verb, pf, str(vf), *rest]
        roothelper.parse(argv)  # what run_privileged checks before sudo
        handed.append(argv)
        roothelper.serve(host, root_config, argv)

    monkeypatch.setattr(vf_actions, "_unprivileged", lambda _host: True)
    monkeypatch.setattr(vf_actions, "_through_root_helper", helper)
    monkeypatch.setattr(netlink_vf, "open_netlink", lambda: peer)
    owner(host)
    assert hook.run("pre", stdin(), host, config) == "VM 42: 1 network action(s) made"
    assert handed[0][:3] == ["vf-set", "ens1f0np0", "0"]
    assert {"mac=02:00:c0:a8:c9:0a", "vlan=1001", "spoofchk=on", "trust=off"} <= set(handed[0][3:])
    assert netlink_vf.read_vfs(peer, 5)[0].vlan == 1001
    hook.run("clean", stdin(), host, config)
    assert handed[-1] == ["vf-scrub", "ens1f0np0", "0", "eth"]
    assert netlink_vf.read_vfs(peer, 5)[0] == netlink_vf.CLEAN


@pytest.mark.parametrize("argv", [
    ["vf-set", "ens1/0", "0", "vlan=5"], ["vf-set", "ens1f0", "-1", "vlan=5"], ["vf-set", "ens1f0", "x", "vlan=5"],
    ["vf-set", "ens1f0", "0", "vlan=4095"], ["vf-set", "ens1f0", "0", "color=red"],
    ["vf-set", "ens1f0", "0", "vlan=5", "vlan=6"], ["vf-set", "ens1f0", "0", "spoofchk=yes"],
    ["vf-set", "ens1f0", "0", "mac=01:00:5e:00:00:01"], ["vf-set", "ens1f0", "0", "node_guid=zz"],
    ["vf-scrub", "ens1f0", "0"], ["vf-scrub", "ens1f0", "0", "all"], ["vf-scrub", "ens1f0", "0", "eth", "x"],
])
def test_root_helper_vf_grammar_is_closed(argv: list[str]) -> None:
    from aifactory_core.errors import UsageError
    from aifactory_core.roothelper import parse

    with pytest.raises(UsageError):
        parse(argv)


def test_root_helper_names_a_non_numeric_vf_index() -> None:
    from aifactory_core.errors import UsageError
    from aifactory_core.roothelper import parse

    with pytest.raises(UsageError, match="invalid VF index 'x': not an integer"):
        parse(["vf-set", "ens1f0", "x", "vlan=5"])


def test_root_helper_vf_arguments_round_trip() -> None:
    from aifactory_core.roothelper import vf_arguments, vf_settings_of

    for wanted in (netlink_vf.settings(mac="02:00:00:00:00:01", vlan=12, qos=3, spoofchk=False, trust=True,
                                       min_tx_rate=10, max_tx_rate=100, link_state="enable"),
                   netlink_vf.settings(link_state="disable", node_guid="a1:f0:00:00:00:54:02:00",
                                       port_guid="a1:f0:00:00:00:54:03:00"),
                   netlink_vf.CLEAN):
        assert vf_settings_of(vf_arguments(wanted)) == wanted
