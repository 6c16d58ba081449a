"""The host gate: the frontend's decision on what the host has at deploy -- the deployment file
(the synthesized ``deployment.0.xml``), the ``vm.xml`` beside it (``vm_gpu_pinned.xml``) and the
host's sysfs (a device table, the real H100 capture, the synthetic DGX host) -- through the plugin
manager and through the real deploy wrapper run as a process with ``examples/policy.toml``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from aifactory_core.config import parse_config
from aifactory_core.domain import load_domain
from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot
from aifactory_core.model import DeployRequest
from aifactory_core.one.vm import VmRequest, parse_vm
from aifactory_core.policy.decide import decide
from aifactory_core.policy.hostgate import decide_on_host, sysfs_identity
from aifactory_core.policy.schema import parse_policy
from aifactory_core.vmm import deploy_request

SAMPLES = Path(__file__).parent / "fixtures" / "opennebula" / "samples" / "synthesized"
POLICY = """
[tenant.a]
group = "tenant-a"
group_id = 100
clusters = [100]
max_gpus = {cap}
networks = [0, 7]
vlans = ["1000-1009"]

[[tenant.a.devices]]
name = "H100"
vendor = "10de"
device = "{device}"
clusters = [100]
"""


def policy(cap: int = 2, device: str = "2330"):
    return parse_policy(POLICY.format(cap=cap, device=device))


SAMPLE_DEVICES = {"0000:17:00.0": (0x10DE, 0x2330, 0x0302), "0000:18:00.2": (0x15B3, 0x101E, 0x0200)}


def domain(text: str | None = None):
    return load_domain(text if text is not None else (SAMPLES / "deployment.0.xml").read_bytes())


def deploy(text: str | None = None, vm: int = 42, document: Path | None = None) -> DeployRequest:
    """What the deploy wrapper hands the gate for the deployment file ``text`` (default: the sample)."""
    return deploy_request(domain(text), vm, document)


def sample_vm(**replacements: str) -> VmRequest:
    """The sample ``vm.xml`` (VM 42 of tenant-a: GPU 17:00.0, VF 18:00.2 on network 7 VLAN 1001)."""
    text = (SAMPLES / "vm_gpu_pinned.xml").read_text()
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    return parse_vm(text.encode())


def identify(address: str):
    return SAMPLE_DEVICES.get(address)


def host_refusals(policy_, request: DeployRequest, document: VmRequest | None, cluster: int | None = None,
                  ident=identify) -> list[str]:
    return [str(refusal) for refusal in decide_on_host(policy_, request, document, ident, cluster).refusals]


def test_sample_deployment_with_its_vm_xml_is_decided_as_the_frontend_decides_it() -> None:
    """GPU 10de:2330 plus a ConnectX VF on network 7 VLAN 1001 (a network function, not a GPU): the
    host gate's decision is the frontend's decision on the same vm.xml, rule for rule."""
    vm = sample_vm()
    for candidate in (policy(), policy(cap=0), policy(device="2335")):
        assert decide_on_host(candidate, deploy(), vm, identify, None) == decide(candidate, vm)
    assert host_refusals(policy(), deploy(), vm) == []
    assert host_refusals(policy(cap=0), deploy(), vm) == [
        "policy rule tenant.a.max_gpus: tenant a holds 0 GPUs; 1 more exceed its cap of 0"]
    (refusal,) = host_refusals(policy(device="2335"), deploy(), vm)
    assert refusal.startswith("policy rule tenant.a.devices: device 10de:2330 class 0302 is not granted")
    moved = sample_vm(**{"<CID>100</CID>": "<CID>101</CID>"})
    (refusal,) = host_refusals(policy(), deploy(), moved)
    assert "only on clusters 100" in refusal
    vlan = sample_vm(**{"<VLAN_ID><![CDATA[1001]]>": "<VLAN_ID><![CDATA[1500]]>"})
    (refusal,) = host_refusals(policy(), deploy(), vlan)  # the NIC rules hold on the host too
    assert refusal.startswith("policy rule tenant.a.vlans: VLAN 1500 is outside")


def test_devices_are_what_the_host_says_not_what_vm_xml_says() -> None:
    lying = sample_vm(**{"<DEVICE><![CDATA[2330]]>": "<DEVICE><![CDATA[2335]]>"})
    assert host_refusals(policy(), deploy(), lying) == []  # sysfs says 2330: granted
    assert host_refusals(policy(device="2335"), deploy(), lying)[0].startswith(
        "policy rule tenant.a.devices: device 10de:2330")
    absent = sample_vm(**{"0000:17:00:0": "0000:7e:00:0", "17:00.0": "7e:00.0", "<BUS><![CDATA[17]]>":
                          "<BUS><![CDATA[7e]]>"})  # fmt: skip
    (refusal,) = host_refusals(policy(), deploy(), absent)
    assert refusal == "policy rule devices: PCI device 0000:7e:00.0 is not a PCI function of this host"


def test_a_hostdev_vm_xml_does_not_list_is_a_plain_device() -> None:
    """A VF hostdev vm.xml does not describe as the VM's NIC needs a device grant like any device."""
    head, devices, body = (SAMPLES / "deployment.0.xml").read_text().partition("<devices>")
    text = head + devices + body
    gpu_only = sample_vm()
    gpu_only = replace(gpu_only, pci=gpu_only.pci[:1])
    (refusal,) = host_refusals(policy(), deploy(text), gpu_only)
    assert refusal.startswith("policy rule tenant.a.devices: device 15b3:101e class 0200 is not granted")


def test_documents_that_contradict_each_other_refuse() -> None:
    head, devices, body = (SAMPLES / "deployment.0.xml").read_text().partition("<devices>")  # past the comment
    text = head + devices + body
    other_group = text.replace("<one:gid>100</one:gid>", "<one:gid>300</one:gid>").replace(
        "<one:gname>tenant-a</one:gname>", "<one:gname>intruders</one:gname>")
    assert host_refusals(policy(), deploy(other_group), sample_vm()) == [
        "policy rule deployment: the deployment file's owner (group intruders) is not vm.xml's (group tenant-a)"]
    assert host_refusals(policy(), deploy(vm=43), sample_vm()) == [
        "policy rule deployment: vm.xml describes VM 42, not VM 43"]


def test_without_vm_xml_the_deployment_file_alone_decides() -> None:
    head, devices, body = (SAMPLES / "deployment.0.xml").read_text().partition("<devices>")  # past the comment
    text = head + devices + body
    no_meta = head + devices + re.sub(r"<metadata>.*</metadata>", "", body, flags=re.DOTALL)
    assert host_refusals(policy(), deploy(no_meta), None) == [
        "policy rule tenant: the deployment file has no <one:vm> owner and there is no vm.xml beside it, "
        "so the owner is unknown"]
    other_group = text.replace("<one:gid>100</one:gid>", "<one:gid>300</one:gid>").replace(
        "<one:gname>tenant-a</one:gname>", "<one:gname>intruders</one:gname>")
    assert host_refusals(policy(), deploy(other_group), None)[0].startswith("policy rule tenant: group intruders")
    (refusal,) = host_refusals(policy(), deploy(), None, 100)  # the VF: no vm.xml names it the VM's NIC
    assert refusal.startswith("policy rule tenant.a.devices: device 15b3:101e class 0200 is not granted")


def test_devices_are_identified_by_the_real_captures_sysfs(h100_root: Path) -> None:
    """With the H100 capture's sysfs: the hostdev at the capture's GPU address is what sysfs says."""
    inventory = HostInventory(HostRoot(h100_root))
    gpu = next(item for item in inventory.pci.values() if item.vendor_id == 0x10DE and item.class_code >> 16 == 3)
    head, devices, body = (SAMPLES / "deployment.0.xml").read_text().partition("<devices>")  # past the comment
    bus, slot, function = gpu.address[5:7], gpu.address[8:10], gpu.address[11]
    one_gpu = head + devices + re.sub(
        r"<hostdev.*?</hostdev>\s*<hostdev.*?</hostdev>",
        f"<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' "
        f"bus='0x{bus}' slot='0x{slot}' function='0x{function}'/></source></hostdev>", body, flags=re.DOTALL)
    granted = policy(device=f"{gpu.device_id:04x}")
    sysfs = sysfs_identity(inventory)
    assert host_refusals(granted, deploy(one_gpu), None, 100, sysfs) == []
    assert "not granted" in host_refusals(policy(device="ffff"), deploy(one_gpu), None, 100, sysfs)[0]
    absent = one_gpu.replace(f"bus='0x{bus}'", "bus='0x7e'")
    assert "is not a PCI function of this host" in host_refusals(granted, deploy(absent), None, 100, sysfs)[0]


def test_admit_hook_through_the_plugin_manager(tmp_path: Path, h100_root: Path) -> None:
    from aifactory_core.plugins import build_manager

    path = tmp_path / "policy.toml"
    path.write_text(POLICY.format(cap=1, device="2330"))
    config = parse_config({"plugins": {"enabled": ["policy"]}, "plugin": {"policy": {"file": str(path)}}})
    manager, _ = build_manager(config)
    inventory = HostInventory(HostRoot(h100_root))
    vm = parse_vm((SAMPLES / "vm_gpu_pinned.xml").read_bytes())
    assert [r for result in manager.hook.aifactory_admit(inventory=inventory, request=vm, config=config)
            for r in result] == []  # fmt: skip
    path.write_text(POLICY.format(cap=0, device="2330"))
    reasons = [r for out in manager.hook.aifactory_admit(inventory=inventory, request=vm, config=config) for r in out]
    assert reasons == ["policy rule tenant.a.max_gpus: tenant a holds 0 GPUs; 1 more exceed its cap of 0"]
    path.write_text("[tenant.a]\nmax_gpus = 1\n")  # broken policy: fail closed
    reasons = [r for out in manager.hook.aifactory_admit(inventory=inventory, request=vm, config=config) for r in out]
    assert len(reasons) == 1 and "policy-file" in reasons[0] and "missing required key 'group'" in reasons[0]


def test_no_policy_file_and_not_required_admits(tmp_path: Path, h100_root: Path) -> None:
    from aifactory_plugins.policy import aifactory_admit

    config = parse_config({"plugin": {"policy": {"file": str(tmp_path / "absent.toml"), "required": False}}})
    vm = parse_vm((SAMPLES / "vm_gpu_pinned.xml").read_bytes())
    assert aifactory_admit(HostInventory(HostRoot(h100_root)), vm, config) is None
    required = parse_config({"plugin": {"policy": {"file": str(tmp_path / "absent.toml")}}})
    (reason,) = aifactory_admit(HostInventory(HostRoot(h100_root)), vm, required)
    assert "cannot read policy" in reason


@pytest.mark.parametrize("section", [{"colour": 1}, {"file": 3}, {"required": "yes"}, {"cluster_id": -1},
                                     {"on_refusal": "explode"}])  # fmt: skip
def test_plugin_config_is_validated(section: dict) -> None:
    from aifactory_plugins.policy import aifactory_configure

    from aifactory_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"plugin\.policy"):
        aifactory_configure(parse_config({}), "policy", section)


# ---- the deploy wrapper as OpenNebula runs it: a process, the shipped example policy ----------------

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_POLICY = REPO / "examples" / "policy.toml"
DEPLOYMENT = "/var/lib/one//datastores/0/{vm}/deployment.0"
RECORDER = """#!/bin/sh
printf '%s\\n' "$@" >> "$(dirname "$0")/deploy.argv"
cat > /dev/null
echo one-$3-deployed
"""
DGX_GPUS = ("0000:1b:00.0", "0000:43:00.0", "0000:52:00.0")
DGX_VF = "0000:aa:00.2"
NVSWITCH = "0000:04:00.0"
OWNERS = {"llm-lab": (100, "alice"), "vision": (101, "victor")}
NETWORKS = {"llm-lab": 20, "vision": 30}  # each tenant's management network in the example policy


def _set_pci_address(pci, address: str) -> None:
    domain_, bus, slot_function = address.split(":")
    slot, function = slot_function.split(".")
    for tag, value in (("ADDRESS", f"{domain_}:{bus}:{slot}:{function}"), ("DOMAIN", domain_), ("BUS", bus),
                       ("SLOT", slot), ("FUNCTION", function), ("SHORT_ADDRESS", address[5:])):  # fmt: skip
        pci.find(tag).text = value


def vm_xml(vm: int, tenant: str, gpus: tuple[str, ...], vf: str | None = None, network: int = 20,
           vlan: int = 201, cluster: int = 101) -> bytes:
    """The sample vm.xml reshaped as oned writes it for ``vm`` of ``tenant`` on the DGX host: one
    PCI per GPU (VENDOR/DEVICE/CLASS as oned copies them from the host's device), the VF as a
    ``TYPE = "NIC"`` PCI on ``network``/``vlan`` and the bridged NIC on ``network``."""
    import copy

    from lxml import etree

    root = etree.fromstring((SAMPLES / "vm_gpu_pinned.xml").read_bytes())
    gid, user = OWNERS.get(tenant, (300, "mallory"))
    for path, value in (("ID", vm), ("GID", gid), ("GNAME", tenant), ("UNAME", user), ("TEMPLATE/VMID", vm),
                        ("HISTORY_RECORDS/HISTORY/OID", vm), ("HISTORY_RECORDS/HISTORY/CID", cluster)):  # fmt: skip
        root.find(path).text = str(value)
    template = root.find("TEMPLATE")
    template.find("NIC/NETWORK_ID").text = str(network)  # the bridged NIC on the tenant's network too
    gpu_pci, vf_pci = template.findall("PCI")
    anchor = gpu_pci.getprevious()
    template.remove(gpu_pci)
    template.remove(vf_pci)
    made = []
    for address in gpus:
        item = copy.deepcopy(gpu_pci)
        _set_pci_address(item, address)
        made.append(item)
    if vf is not None:
        item = copy.deepcopy(vf_pci)
        _set_pci_address(item, vf)
        item.find("NETWORK_ID").text, item.find("VLAN_ID").text = str(network), str(vlan)
        made.append(item)
    for index, item in enumerate(made):
        item.find("PCI_ID").text = str(index)
        anchor.addnext(item)
        anchor = item
    return etree.tostring(root)


def deployment_xml(vm: int, tenant: str, hostdevs: tuple[str, ...]) -> bytes:
    """The sample deployment file reshaped for ``vm``: its owner in ``<one:vm>``, one PCI hostdev per
    address (the shape LibVirtDriverKVM writes), the two ``<devices>`` blocks kept."""
    import copy

    from lxml import etree

    root = etree.fromstring((SAMPLES / "deployment.0.xml").read_bytes())
    one = "{http://opennebula.org/xmlns/libvirt/1.0}"
    gid, user = OWNERS.get(tenant, (300, "mallory"))
    meta = root.find(f"metadata/{one}vm")
    for tag, value in (("gid", gid), ("gname", tenant), ("uname", user), ("name", f"vm-{vm}")):
        meta.find(one + tag).text = str(value)
    root.find("name").text = f"one-{vm}"
    devices = root.find("devices")
    template = devices.find("hostdev")
    for old in devices.findall("hostdev"):
        devices.remove(old)
    for index, address in enumerate(hostdevs):
        item = copy.deepcopy(template)
        domain_, bus, slot_function = address.split(":")
        slot, function = slot_function.split(".")
        item.find("source/address").attrib.update({"domain": f"0x{domain_}", "bus": f"0x{bus}",
                                                   "slot": f"0x{slot}", "function": f"0x{function}"})
        item.find("address").set("bus", str(26 + index))  # a downstream port per device, as oned numbers them
        devices.append(item)
    return etree.tostring(root)


@pytest.fixture
def dgx_host(tmp_path: Path) -> dict[str, object]:
    """A DGX-shaped host root, the deploy wrapper's environment with ``[plugin.policy] file`` set to
    the shipped example policy as docs/tenant-policy.md says, and OpenNebula's original ``deploy``
    as a recorder."""
    from hostroots import generate_host

    root = generate_host("dgx-h100", tmp_path / "root")
    originals = tmp_path / "remotes"
    originals.mkdir()
    (originals / "deploy.one").write_text(RECORDER)
    (originals / "deploy.one").chmod(0o755)
    config = tmp_path / "aifactory.conf"
    config.write_text(f'[plugins]\nenabled = ["policy"]\n\n[plugin.policy]\nfile = "{EXAMPLE_POLICY}"\n'
                      "cluster_id = 101\n")
    env = {**os.environ, "AIFACTORY_PYTHON": sys.executable, "AIFACTORY_HOST_ROOT": str(root),
           "AIFACTORY_STATE_DIR": str(tmp_path / "state"), "AIFACTORY_CONFIG": str(config),
           "AIFACTORY_VMM_ORIGINAL_DIR": str(originals)}  # fmt: skip
    env.pop("AIFACTORY_POLICY", None)
    return {"root": root, "originals": originals, "env": env}


def run_deploy(host: dict[str, object], vm: int, tenant: str, vm_gpus: tuple[str, ...], vf: str | None = None,
               hostdevs: tuple[str, ...] | None = None, **vm_fields: int) -> subprocess.CompletedProcess[bytes]:
    """OpenNebula's deploy step: vm.xml written to the VM directory, then ``deploy '<deployment
    file>' '<host>' <vmid> <host>`` with the domain on stdin."""
    directory = Path(str(host["root"])) / f"var/lib/one/datastores/0/{vm}"
    directory.mkdir(parents=True, exist_ok=True)
    vm_fields.setdefault("network", NETWORKS.get(tenant, 20))
    (directory / "vm.xml").write_bytes(vm_xml(vm, tenant, vm_gpus, vf, **vm_fields))
    domain_xml = deployment_xml(vm, tenant, hostdevs if hostdevs is not None else (*vm_gpus, *((vf,) if vf else ())))
    (directory / "deployment.0").write_bytes(domain_xml)
    argv = [str(REPO / "drivers" / "vmm" / "kvm" / "deploy"), DEPLOYMENT.format(vm=vm), "dgx-01", str(vm), "dgx-01"]
    return subprocess.run(argv, input=domain_xml, capture_output=True, env=host["env"], timeout=120, check=False)


def test_deploy_wrapper_process_admits_one_tenant_and_refuses_anothers_gpu(dgx_host: dict[str, object]) -> None:
    """``[plugin.policy] file`` set as the docs say made every deploy exit 1 with an AttributeError;
    the example policy's llm-lab VM (an H100 and an SR-IOV VF on its network 20, VLAN 201) starts,
    vision's VM asking 3 H100s (cap 2) does not, nor does vision's VM whose vm.xml calls the NVSwitch
    it was given an H100 (the host's sysfs says 10de:22a3), nor a VM of a group that is no tenant."""
    originals = Path(str(dgx_host["originals"]))
    admitted = run_deploy(dgx_host, 42, "llm-lab", DGX_GPUS[:1], DGX_VF)
    assert (admitted.returncode, admitted.stderr.decode()) == (0, "")
    assert admitted.stdout == b"one-42-deployed\n"
    assert (originals / "deploy.argv").read_text().split() == [DEPLOYMENT.format(vm=42), "dgx-01", "42", "dgx-01"]

    refused = run_deploy(dgx_host, 43, "vision", DGX_GPUS)
    assert refused.returncode == 1 and refused.stdout == b""
    assert refused.stderr.decode() == (
        "aifactory deploy: VM 43 refused: policy rule tenant.vision.max_gpus: tenant vision holds 0 GPUs; 3 more "
        "exceed its cap of 2\n")
    disguised = run_deploy(dgx_host, 44, "vision", (NVSWITCH,))
    assert disguised.returncode == 1
    assert disguised.stderr.decode().startswith(
        "aifactory deploy: VM 44 refused: policy rule tenant.vision.devices: device 10de:22a3 class 0680 is not "
        "granted to tenant vision")
    stranger = run_deploy(dgx_host, 45, "intruders", DGX_GPUS[:1])
    assert stranger.returncode == 1 and b"policy rule tenant: group intruders is no tenant" in stranger.stderr
    assert (originals / "deploy.argv").read_text().split().count("dgx-01") == 2  # only VM 42 reached oned's deploy


def test_deploy_wrapper_counts_what_the_tenant_already_holds_on_the_host(dgx_host: dict[str, object]) -> None:
    """vision (max_gpus = 2) holds 2 H100s on the host through VM 50: VM 51's 2 more are refused
    (the gate once admitted it, counting only the request); llm-lab is not charged for vision's
    GPUs; once VM 50 is cancelled (its devices given back) VM 51 starts."""
    from aifactory_core.hostroot import HostRoot
    from aifactory_core.lifecycle import ownership

    originals = Path(str(dgx_host["originals"]))
    (originals / "cancel.one").write_text("#!/bin/sh\ncat > /dev/null\n")
    (originals / "cancel.one").chmod(0o755)
    host = HostRoot(Path(str(dgx_host["root"])), Path(str(dgx_host["env"]["AIFACTORY_STATE_DIR"])))  # type: ignore[index]
    first = run_deploy(dgx_host, 50, "vision", DGX_GPUS[:2], DGX_VF, vlan=301)
    assert first.returncode == 0, first.stderr
    assert ownership.held_devices(host) == {DGX_GPUS[0]: 50, DGX_GPUS[1]: 50, DGX_VF: 50}
    over = run_deploy(dgx_host, 51, "vision", ("0000:61:00.0", "0000:9d:00.0"))
    assert over.returncode == 1
    assert over.stderr.decode() == (
        "aifactory deploy: VM 51 refused: policy rule tenant.vision.max_gpus: tenant vision holds 2 GPUs; 2 more "
        "exceed its cap of 2\n")
    other_tenant = run_deploy(dgx_host, 52, "llm-lab", ("0000:c3:00.0", "0000:d1:00.0"))
    assert other_tenant.returncode == 0, other_tenant.stderr
    cancel = subprocess.run([str(REPO / "drivers" / "vmm" / "kvm" / "cancel"), "one-50", "dgx-01", "50", "dgx-01"],
                            input=b"", capture_output=True, env=dgx_host["env"], timeout=120, check=False)
    assert cancel.returncode == 0, cancel.stderr
    again = run_deploy(dgx_host, 51, "vision", ("0000:61:00.0", "0000:9d:00.0"))
    assert again.returncode == 0, again.stderr


def test_devices_held_by_a_vm_without_tenancy_record_count_through_its_vm_xml(dgx_host: dict[str, object]) -> None:
    """A VM that held its GPUs before the gate kept tenancy records (claimed in the ownership records
    only) is attributed through the vm.xml in its directory; its VF is no GPU."""
    from aifactory_core.hostroot import HostRoot
    from aifactory_core.lifecycle import ownership

    root = Path(str(dgx_host["root"]))
    host = HostRoot(root, Path(str(dgx_host["env"]["AIFACTORY_STATE_DIR"])))  # type: ignore[index]
    directory = root / "var/lib/one/datastores/0/60"
    directory.mkdir(parents=True)
    (directory / "vm.xml").write_bytes(vm_xml(60, "vision", DGX_GPUS[:1], DGX_VF, network=30, vlan=301))
    for address in (DGX_GPUS[0], DGX_VF):
        ownership.claim(host, address, 60)
    refused = run_deploy(dgx_host, 61, "vision", ("0000:61:00.0", "0000:9d:00.0"))
    assert "tenant vision holds 1 GPUs; 2 more exceed its cap of 2" in refused.stderr.decode()
    assert run_deploy(dgx_host, 62, "vision", ("0000:61:00.0",)).returncode == 0


@pytest.mark.parametrize("pci_type", ["NIC", "nic", "GPU"])
def test_a_gpu_counts_and_needs_its_grant_whatever_its_type(pci_type: str) -> None:
    """``PCI = [TYPE = "NIC", VENDOR = "10de", DEVICE = "2330"]``: oned matches the device by
    vendor/device/class whatever the TYPE, so the GPU it gets is counted and must be granted, on the
    frontend (the template's selectors) and on the host (the allocated device in vm.xml)."""
    typed = f"<NETWORK_ID>7</NETWORK_ID><TYPE><![CDATA[{pci_type}]]></TYPE><VENDOR><![CDATA[10de]]></VENDOR>"
    before = sample_vm(**{"<VENDOR><![CDATA[10de]]></VENDOR>": typed})
    request = replace(before, pci=(replace(before.pci[0], address=None, short_address=None, device_class=None),
                                   *before.pci[1:]))  # on hold: only the template's VENDOR/DEVICE
    for vm in (request, before):
        assert [r.rule for r in decide(policy(cap=0), vm).refusals] == ["tenant.a.max_gpus"]
        assert [r.rule for r in decide(policy(device="2335"), vm).refusals] == ["tenant.a.devices"]
    assert host_refusals(policy(cap=0), deploy(), before) == [
        "policy rule tenant.a.max_gpus: tenant a holds 0 GPUs; 1 more exceed its cap of 0"]


def test_a_request_naming_only_a_short_address_is_the_device_there() -> None:
    """``PCI = [SHORT_ADDRESS = "17:00.0"]`` gets the device at that address: counted and granted as
    what the host (or a device list) says sits there; not identified, it matches no grant."""
    from aifactory_core.policy.decide import resolve_addresses

    vm = sample_vm()
    gpu = replace(vm.pci[0], address=None, vendor=None, device=None, device_class=None, type="NIC", network_id=7)
    held = replace(vm, pci=(gpu, *vm.pci[1:]))
    (refusal,) = decide(policy(), held).refusals
    assert str(refusal) == ("policy rule tenant.a.devices: device at SHORT_ADDRESS 17:00.0 (not identified) is not "
                            "granted to tenant a")
    resolved = resolve_addresses(held, {"17:00.0": (0x10DE, 0x2330, 0x0302)}.get)
    assert decide(policy(), resolved).admitted
    assert [r.rule for r in decide(policy(cap=0), resolved).refusals] == ["tenant.a.max_gpus"]
