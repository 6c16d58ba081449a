"""Domain rewrite for pinning: every emitted domain passes libvirt's own schema
(``virt-xml-validate FILE domain``), including OpenNebula-shaped deployment files derived from the
synthesized oned sample (second top-level ``<devices>`` merged by ``load_domain``); the
OpenNebula/one#7408 expander-bus node numbering; held-CPU records; the plugin's deploy hook."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import needs
import pytest
from aifactory_plugins.cpu_pinning import plugin
from aifactory_plugins.cpu_pinning.domain_rewrite import minimal_domain, rewrite_domain
from aifactory_plugins.cpu_pinning.held import DomainXmlHeld, StateFileHeld, usage_of
from aifactory_plugins.cpu_pinning.planner import HostUsage, Placement, VmSpec, plan
from aifactory_plugins.cpu_pinning.spec import Policies, spec_from_domain
from aifactory_plugins.cpu_pinning.topology import HostTopology
from hostroots import FIXTURES, dgx_root  # noqa: F401

from aifactory_core.config import parse_config
from aifactory_core.domain import dump_domain, load_domain, pci_hostdevs
from aifactory_core.errors import ConfigError, DocumentError, HostError
from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot
from aifactory_core.model import DeployRequest

GIB = 1 << 20
SAMPLE = FIXTURES / "opennebula" / "samples" / "synthesized" / "deployment.0.xml"
DGX_GPU0, DGX_NIC0 = "0000:1b:00.0", "0000:18:00.0"  # node 0, same PCIe switch
DGX_GPU4, DGX_NIC4 = "0000:9d:00.0", "0000:9a:00.0"  # node 1, same PCIe switch
@pytest.fixture
def validator() -> str:
    return needs.tool("virt-xml-validate", hint="apt-get install libvirt-clients")


needs_validator = pytest.mark.usefixtures("validator")


def assert_valid(xml: bytes, tmp_path: Path, name: str = "domain.xml") -> None:
    path = tmp_path / name
    path.write_bytes(xml)
    done = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr + done.stdout


@pytest.fixture(scope="module")
def dgx(dgx_root: Path) -> tuple[HostInventory, HostTopology]:  # noqa: F811
    inventory = HostInventory(HostRoot(dgx_root))
    return inventory, HostTopology.from_inventory(inventory)


def _classes(inventory: HostInventory) -> dict[str, int]:
    return {address: device.class_code for address, device in inventory.pci.items()}


def _domain_spec(domain: Any, vm: int, inventory: HostInventory) -> VmSpec:
    """What the deploy hook plans from a deployment file (default policies)."""
    addresses = [ref.address for _, ref in pci_hostdevs(domain)]
    return spec_from_domain(domain, vm, addresses, _classes(inventory), Policies())


def oned_sample_on_dgx() -> str:
    """The synthesized oned deployment file with its hostdevs moved to the DGX GPU/NIC pair."""
    text = re.sub(r"<!--.*?-->", "", SAMPLE.read_text(), flags=re.S)
    text = text.replace("bus='0x17' slot='0x00' function='0x0'", "bus='0x1b' slot='0x00' function='0x0'")
    return text.replace("bus='0x18' slot='0x00' function='0x2'", "bus='0x18' slot='0x00' function='0x0'")


def unpinned_sample_on_node1() -> str:
    """oned output for a VM oned did not pin, with devices on host node 1: oned numbers the
    expander-bus node by the host node (index 34, ``<node>1</node>``), a guest cell that the
    single-cell guest does not have."""
    text = oned_sample_on_dgx()
    text = re.sub(r"<cputune>.*?</cputune>", "<cputune><shares>400</shares></cputune>", text, flags=re.S)
    text = re.sub(r"<numatune>.*?</numatune>", "", text, flags=re.S)
    text = re.sub(r"<numa>.*?</numa>", "", text, flags=re.S)
    text = text.replace("bus='0x1b' slot", "bus='0x9d' slot").replace("bus='0x18' slot", "bus='0x9a' slot")
    text = (
        text.replace("index='20'", "index='34'")
        .replace("bus='20'", "bus='34'")
        .replace("<node>0</node>", "<node>1</node>")
    )
    return text


@needs_validator
def test_oned_sample_as_is_fails_the_schema_and_merged_passes(tmp_path: Path) -> None:
    path = tmp_path / "raw.xml"
    path.write_bytes(SAMPLE.read_bytes())
    raw = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, check=False)
    assert raw.returncode != 0  # the second top-level <devices> block
    assert_valid(dump_domain(load_domain(SAMPLE.read_bytes())), tmp_path)


@needs_validator
def test_rewrite_within_oned_pinning_validates_and_stays_inside(
    dgx: tuple[HostInventory, HostTopology], tmp_path: Path
) -> None:
    inventory, topology = dgx
    domain = load_domain(oned_sample_on_dgx())
    spec = _domain_spec(domain, 42, inventory)
    assert spec.oned_cells and spec.oned_cells[0].cpus == {0, 1, 8, 9} and spec.hugepage_kib == GIB
    result = plan(topology, HostUsage(), spec)
    assert isinstance(result, Placement) and result.local and result.pairs == ((DGX_GPU0, DGX_NIC0),)
    notes = rewrite_domain(domain, result)
    assert notes == []
    xml = dump_domain(domain)
    assert_valid(xml, tmp_path)
    pins = {pin.get("vcpu"): pin.get("cpuset") for pin in domain.findall("cputune/vcpupin")}
    assert sorted(pins.values()) == ["0", "1", "8", "9"]
    assert domain.findtext("cputune/shares") == "400"  # the rest of cputune is kept
    assert domain.find("numatune/memnode").get("nodeset") == "0"
    assert domain.find("memoryBacking/hugepages/page").get("size") == str(GIB)
    # devices stay behind oned's node-0 expander, which is guest cell 0
    assert domain.find("devices/controller[@index='20']/target/node").text == "0"
    assert [h.find("address").get("bus") for h, _ in pci_hostdevs(domain)] == ["26", "27"]
    assert domain.find("devices/channel") is not None  # the merged guest-agent channel survives
    rewrite_domain(domain, result)
    assert dump_domain(domain) == xml  # idempotent


@needs_validator
def test_expander_node_follows_the_guest_cell_not_the_host_node(
    dgx: tuple[HostInventory, HostTopology], tmp_path: Path
) -> None:
    inventory, topology = dgx
    domain = load_domain(unpinned_sample_on_node1())
    spec = _domain_spec(domain, 43, inventory)
    assert spec.oned_cells == () and set(spec.devices) == {DGX_GPU4, DGX_NIC4}
    result = plan(topology, HostUsage(), spec)
    assert isinstance(result, Placement) and result.local and result.memory_nodes == (1,)
    rewrite_domain(domain, result)
    assert domain.find("devices/controller[@index='34']/target/node").text == "0"
    assert domain.findall("cpu/numa/cell")[0].get("id") == "0"
    assert_valid(dump_domain(domain), tmp_path)


@needs_validator
def test_minimal_domain_for_a_spilled_vm_validates(dgx: tuple[HostInventory, HostTopology], tmp_path: Path) -> None:
    _, topology = dgx
    usage = HostUsage(frozenset(list(topology.node(0).cpus)[:100]))
    result = plan(topology, usage, VmSpec(7, 24, 24 * GIB, GIB, gpus=(DGX_GPU0,), nics=(DGX_NIC0,)))
    assert isinstance(result, Placement) and len(result.cells) == 2 and result.cells[0].host_node == 0
    domain = minimal_domain(result, "one-7")
    assert_valid(dump_domain(domain), tmp_path)
    assert domain.find("numatune/memory").get("nodeset") == "0-1"
    expanders = domain.findall("devices/controller[@model='pcie-expander-bus']")
    assert [e.findtext("target/node") for e in expanders] == ["0"]


def test_rewrite_refuses_a_topology_that_disagrees(dgx: tuple[HostInventory, HostTopology]) -> None:
    _, topology = dgx
    result = plan(topology, HostUsage(), VmSpec(1, 2, GIB))
    assert isinstance(result, Placement)
    domain = load_domain(
        "<domain type='kvm'><name>x</name><memory>1048576</memory><vcpu>2</vcpu>"
        "<cpu><topology sockets='1' cores='4' threads='1'/></cpu></domain>"
    )
    with pytest.raises(DocumentError, match="topology"):
        rewrite_domain(domain, result)
    with pytest.raises(DocumentError, match="not a libvirt domain"):
        load_domain("<VM><ID>1</ID></VM>")


def test_state_records_are_atomic_and_ignore_vms_that_do_not_run(
    dgx: tuple[HostInventory, HostTopology], tmp_path: Path
) -> None:
    _, topology = dgx
    host = HostRoot(tmp_path / "root", tmp_path / "state")
    (tmp_path / "root").mkdir()
    held = StateFileHeld(host)
    first = plan(topology, HostUsage(), VmSpec(5, 4, 2 * GIB, GIB))
    assert isinstance(first, Placement)
    path = held.record(first)
    assert json.loads(path.read_text())["vm_id"] == 5 and not list(path.parent.glob(".*tmp"))
    usage = usage_of(held)
    assert usage.cpus == first.held_cpus and usage.pages == {(0, GIB): 2}
    assert usage_of(held, exclude_vm=5).cpus == frozenset()
    (path.parent / "6.json").write_text("{torn")  # a torn record holds nothing
    assert usage_of(held).cpus == first.held_cpus
    running = tmp_path / "root" / "run" / "libvirt" / "qemu"
    running.mkdir(parents=True)
    assert usage_of(held).cpus == frozenset()  # VM 5 is not among libvirt's running domains
    (running / "one-5.xml").write_text("<domstatus/>")
    assert usage_of(held).cpus == first.held_cpus
    assert held.forget(5) and not held.forget(5)


def test_held_from_domain_xml_directory(tmp_path: Path) -> None:
    (tmp_path / "one-9.xml").write_text(
        "<domstatus><domain type='kvm'><cputune><vcpupin vcpu='0' cpuset='4'/><vcpupin vcpu='1' cpuset='5-6'/>"
        "<emulatorpin cpuset='7'/></cputune></domain></domstatus>"
    )
    (tmp_path / "other.xml").write_text("<domain type='kvm'><cputune><vcpupin vcpu='0' cpuset='1'/></cputune></domain>")
    (tmp_path / "broken.xml").write_text("<domain")
    holdings = list(DomainXmlHeld(tmp_path).holdings())
    assert [(h.vm_id, sorted(h.cpus)) for h in holdings] == [(9, [4, 5, 6, 7]), (None, [1])]


@needs_validator
def test_deploy_hook_rewrites_and_records(dgx_root: Path, tmp_path: Path) -> None:  # noqa: F811
    host = HostRoot(dgx_root, tmp_path / "state")
    inventory = HostInventory(host)
    config = parse_config({"plugin": {"cpu_pinning": {"emulator_policy": "isolate"}}})
    domain = load_domain(unpinned_sample_on_node1())
    request = DeployRequest(vm_id=43, pci_addresses=(DGX_GPU4, DGX_NIC4))
    plugin.aifactory_domain_xml(inventory=inventory, request=request, domain=domain, config=config)
    assert_valid(dump_domain(domain), tmp_path)
    record = json.loads((tmp_path / "state" / "pinning" / "43.json").read_text())
    emulator = domain.find("cputune/emulatorpin").get("cpuset")
    vcpus = {pin.get("cpuset") for pin in domain.findall("cputune/vcpupin")}
    assert emulator not in vcpus and record["vm_id"] == 43
    # a second VM on the same host does not get the first one's CPUs
    second = load_domain(unpinned_sample_on_node1())
    plugin.aifactory_domain_xml(inventory=inventory, request=replace(request, vm_id=44), domain=second, config=config)
    other = {pin.get("cpuset") for pin in second.findall("cputune/vcpupin")}
    assert not other & (vcpus | {emulator})


def test_deploy_hook_refuses_impossible_and_full(dgx_root: Path, tmp_path: Path) -> None:  # noqa: F811
    inventory = HostInventory(HostRoot(dgx_root, tmp_path / "state"))
    config = parse_config({"plugin": {"cpu_pinning": {"plan_unpinned": "all"}}})
    big = load_domain("<domain type='kvm'><name>x</name><memory unit='GiB'>4</memory><vcpu>999</vcpu></domain>")
    with pytest.raises(DocumentError, match="asks for 999 CPUs"):
        plugin.aifactory_domain_xml(inventory=inventory, request=DeployRequest(1, ()), domain=big, config=config)
    bad = load_domain("<domain type='kvm'><name>x</name><memory>lots</memory><vcpu>2</vcpu></domain>")
    with pytest.raises(DocumentError, match="not a memory size"):
        plugin.aifactory_domain_xml(inventory=inventory, request=DeployRequest(1, ()), domain=bad, config=config)
    huge = load_domain(
        "<domain type='kvm'><name>x</name><memory unit='GiB'>4096</memory><vcpu>2</vcpu>"
        "<memoryBacking><hugepages><page size='1' unit='GiB'/></hugepages></memoryBacking></domain>"
    )
    with pytest.raises(HostError, match="hugepage"):
        plugin.aifactory_domain_xml(inventory=inventory, request=DeployRequest(1, ()), domain=huge, config=config)
    assert not (tmp_path / "state").exists()  # nothing recorded for refused VMs


def test_unpinned_vms_without_devices_are_left_alone_by_default(dgx_root: Path, tmp_path: Path) -> None:  # noqa: F811
    inventory = HostInventory(HostRoot(dgx_root, tmp_path / "state"))
    text = "<domain type='kvm'><name>x</name><memory unit='GiB'>4</memory><vcpu>2</vcpu></domain>"
    domain = load_domain(text)
    plugin.aifactory_domain_xml(
        inventory=inventory, request=DeployRequest(1, ()), domain=domain, config=parse_config({})
    )
    assert dump_domain(domain) == dump_domain(load_domain(text)) and not (tmp_path / "state").exists()
    config = parse_config({"plugin": {"cpu_pinning": {"plan_unpinned": "all"}}})
    plugin.aifactory_domain_xml(inventory=inventory, request=DeployRequest(1, ()), domain=domain, config=config)
    assert len(domain.findall("cputune/vcpupin")) == 2 and (tmp_path / "state" / "pinning" / "1.json").is_file()


def test_plugin_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="plugin.cpu_pinning.conflict"):
        plugin.policies_from({"conflict": "ignore"})
    with pytest.raises(ConfigError, match="unknown config key 'plugin.cpu_pinning.bogus'"):
        plugin.policies_from({"bogus": 1})
    assert plugin.policies_from({"thread_policy": "isolate"}).thread == "isolate"
