"""aifactory_core.one.vm / payload: OpenNebula documents into typed requests.

Expected values are read from the samples in tests/fixtures/opennebula/samples/ (VM 42 of alice,
tenant-a, on host 3 gpu-node-01 with GPU 17:00.0 and VF 18:00.2).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from aifactory_core.errors import DocumentError
from aifactory_core.one import payload
from aifactory_core.one.vm import LCM_STATES, VM_STATES, PciRequest, VmRequest, parse_vm

FIXTURES = Path(__file__).parent / "fixtures" / "opennebula" / "samples"
SAMPLES = FIXTURES / "synthesized"
DEPLOY_ID = "6f1c2c1e-5d0a-4d43-9a53-7d0c6f1b2a42"

FULL_VM_SAMPLES = ["vm_gpu_pinned.xml", "vmm_driver_action_deploy.xml", "hook_message_state_vm_running.xml"]


def load(name: str) -> VmRequest:
    return payload.parse_vm_payload((SAMPLES / name).read_bytes(), name)


def check_gpu(gpu: PciRequest) -> None:
    assert gpu.pci_id == 0
    assert gpu.type is None and not gpu.is_nic and gpu.allocated
    assert gpu.address == "0000:17:00.0"  # ADDRESS 0000:17:00:0 canonicalised
    assert gpu.short_address == "17:00.0"
    assert (gpu.vendor, gpu.device, gpu.device_class) == (0x10DE, 0x2330, 0x0302)
    assert gpu.numa_node == 0
    assert gpu.vm_address == "0000:23:00.0"
    assert gpu.vm_bus == 1
    assert gpu.vm_bus_index == 26
    assert gpu.network is None and gpu.mac is None
    assert gpu.attributes["VM_BUS"] == "0x01"


def check_vf(vf: PciRequest, *, full: bool = True) -> None:
    assert vf.pci_id == 1
    assert vf.is_nic and vf.type == "NIC"
    assert vf.address == "0000:18:00.2"
    assert vf.short_address == "18:00.2"
    assert vf.network_id == 7
    assert vf.vlan_id == 1001
    assert vf.mac == "02:00:c0:a8:c9:0a"
    assert vf.nic_id == 1
    assert vf.phydev == "ens1f0np0"
    assert vf.vn_mad == "802.1Q"
    if full:
        assert vf.network == "sriov-tenant-a"
        assert (vf.vendor, vf.device, vf.device_class) == (0x15B3, 0x101E, 0x0200)
        assert vf.vm_address == "0000:24:00.0"
        assert vf.vm_bus_index == 27


@pytest.mark.parametrize("name", FULL_VM_SAMPLES)
def test_full_vm_documents(name: str) -> None:
    vm = load(name)
    assert vm.vm_id == 42
    assert vm.name == "llm-train-42"
    assert (vm.uid, vm.gid, vm.uname, vm.gname) == (5, 100, "alice", "tenant-a")
    assert (vm.state, vm.lcm_state) == (3, 3)
    assert (vm.state_name, vm.lcm_state_name) == ("ACTIVE", "RUNNING")
    assert vm.deploy_id == DEPLOY_ID
    assert (vm.host, vm.host_id, vm.cluster_id) == ("gpu-node-01", 3, 100)
    assert (vm.vcpu, vm.cpu, vm.memory_mib) == (4, 4.0, 65536)
    assert vm.template_id == 8
    assert vm.hugepage_size == 1024
    assert vm.topology is not None
    assert vm.topology.pin_policy == "THREAD" and vm.topology.pinned
    assert (vm.topology.sockets, vm.topology.cores, vm.topology.threads) == (1, 2, 2)
    assert vm.topology.memory_access is None and vm.topology.node_affinity is None
    (node,) = vm.numa_nodes
    assert node.node_id == 0
    assert node.cpus == (0, 8, 1, 9)  # order kept: vCPU i is pinned to cpus[i]
    assert (node.memory_kib, node.memory_node_id, node.total_cpus) == (67108864, 0, 4)
    gpu, vf = vm.pci
    check_gpu(gpu)
    check_vf(vf)
    assert vm.gpus == (gpu,) and vm.pci_nics == (vf,)
    (nic,) = vm.nics
    assert (nic.nic_id, nic.network, nic.network_id) == (0, "mgmt", 0)
    assert (nic.bridge, nic.vn_mad, nic.model, nic.target) == ("br-mgmt", "bridge", "virtio", "one-42-0")
    assert nic.mac == "02:00:0a:0a:00:2a" and nic.ip == "10.10.0.42"
    assert nic.vlan_id is None and nic.security_groups == (0,) and not nic.alias
    assert dict(vm.user_template) == {
        "DESCRIPTION": "Fine-tuning job, 1x H100",
        "GPU": "1",
        "SCHED_REQUIREMENTS": 'ID="3"',
    }


def test_plain_parse_vm_and_to_dict_is_json() -> None:
    vm = parse_vm((SAMPLES / "vm_gpu_pinned.xml").read_bytes())
    data = vm.to_dict()
    text = json.dumps(data)
    assert json.loads(text)["pci"][0]["address"] == "0000:17:00.0"
    assert data["state_name"] == "ACTIVE"
    assert data["numa_nodes"][0]["cpus"] == [0, 8, 1, 9]
    assert data["user_template"]["GPU"] == "1"
    with pytest.raises(AttributeError):
        vm.vm_id = 1  # type: ignore[misc]


def test_vnm_reduced_vm_base64_and_xml_agree() -> None:
    from_b64 = load("vnm_action_vm.b64")
    from_xml = load("vnm_action_vm.xml")
    assert from_b64 == from_xml
    vm = from_b64
    assert vm.vm_id == 42 and vm.deploy_id == DEPLOY_ID
    assert (vm.name, vm.uid, vm.gid, vm.state) == (None, None, None, None)
    assert (vm.host, vm.host_id, vm.cluster_id) == ("gpu-node-01", 3, None)
    (vf,) = vm.pci  # the GPU has no VN_MAD and is not passed to VNM drivers
    check_vf(vf, full=False)
    (nic,) = vm.nics
    assert (nic.bridge, nic.vn_mad, nic.network_id) == ("br-mgmt", "bridge", 0)
    assert vm.topology is None and vm.numa_nodes == ()


def test_base64_of_a_full_vm_as_in_template_variable() -> None:
    raw = (SAMPLES / "vm_gpu_pinned.xml").read_bytes()
    encoded = base64.b64encode(raw)
    assert payload.parse_vm_payload(encoded, encoding="base64") == payload.parse_vm_payload(raw, encoding="xml")
    with pytest.raises(DocumentError, match="invalid base64"):
        payload.parse_vm_payload(raw, encoding="base64")


def test_allocate_extra_vm_pending_request() -> None:
    vm = load("hook_message_api_vm_allocate.xml")
    assert (vm.vm_id, vm.name, vm.uname, vm.gname) == (43, "one-43", "oneadmin", "oneadmin")
    assert (vm.state_name, vm.lcm_state_name) == ("PENDING", "LCM_INIT")
    assert vm.deploy_id is None and vm.host is None
    (request,) = vm.pci
    assert not request.allocated
    assert (request.vendor, request.device, request.device_class) == (0x10DE, None, 0x0302)
    assert request.pci_id == 0 and request.vm_bus == 1


def test_driver_action() -> None:
    action = payload.parse_driver_action((SAMPLES / "vmm_driver_action_deploy.xml").read_bytes())
    assert action.host == "gpu-node-01"
    assert action.migr_host is None and action.deploy_id is None
    assert action.local_deployment_file == "/var/lib/one/vms/42/deployment.0"
    assert action.remote_deployment_file == "/var/lib/one//datastores/0/42/deployment.0"
    assert action.vm.vm_id == 42
    assert json.loads(json.dumps(action.to_dict()))["vm"]["host"] == "gpu-node-01"
    with pytest.raises(DocumentError, match="expected <VMM_DRIVER_ACTION_DATA>"):
        payload.parse_driver_action((SAMPLES / "vm_gpu_pinned.xml").read_bytes())


def test_call_info_template_instantiate() -> None:
    raw = (SAMPLES / "hook_api_call_info_template_instantiate.xml").read_bytes()
    for data in (raw, base64.b64encode(raw)):
        info = payload.parse_call_info(data, method="one.template.instantiate")
        assert info.method == "one.template.instantiate"
        assert info.success
        assert len(info.parameters) == 9
        inputs = info.inputs()
        assert inputs[1] == "****" and info.parameters[0].hidden
        assert inputs[2] == "8" and inputs[3] == "llm-train-42" and inputs[4] == "1"
        assert inputs[5] == 'MEMORY="65536"\nVCPU="4"\nGPU="1"'
        assert info.outputs() == {1: "true", 2: "42", 3: "0"}
        assert info.object_id == 42 and info.error is None
        assert info.extra_vm is None and info.owner_uid is None


def test_call_info_from_hook_message_with_extra_vm() -> None:
    info = payload.parse_call_info((SAMPLES / "hook_message_api_vm_allocate.xml").read_bytes())
    assert info.method == "one.vm.allocate"
    assert info.success and info.object_id == 43
    assert info.inputs()[2].endswith('PCI=[VENDOR="10de",CLASS="0302"]')
    assert info.extra_vm is not None and info.extra_vm.vm_id == 43
    assert (info.owner_uid, info.owner_gid) == (0, 0)
    assert json.loads(json.dumps(info.to_dict()))["extra_vm"]["vm_id"] == 43


def test_call_info_failure_and_structured_value() -> None:
    document = (
        "<CALL_INFO><RESULT>0</RESULT><PARAMETERS>"
        "<PARAMETER><POSITION>2</POSITION><TYPE>IN</TYPE><VALUE><TEMPLATE><A>1</A></TEMPLATE></VALUE></PARAMETER>"
        "<PARAMETER><POSITION>2</POSITION><TYPE>OUT</TYPE><VALUE>[one.vm.allocate] quota exceeded</VALUE>"
        "</PARAMETER></PARAMETERS><EXTRA/></CALL_INFO>"
    )
    info = payload.parse_call_info(document)
    assert not info.success
    assert info.error == "[one.vm.allocate] quota exceeded"
    assert info.object_id is None
    assert info.parameters[0].structured and info.parameters[0].value == "1"


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ("<CALL_INFO><RESULT>2</RESULT></CALL_INFO>", "CALL_INFO/RESULT '2': outside 0..1"),
        ("<CALL_INFO/>", "CALL_INFO/RESULT is missing"),
        (
            "<CALL_INFO><RESULT>1</RESULT><PARAMETERS><PARAMETER><POSITION>x</POSITION></PARAMETER>"
            "</PARAMETERS></CALL_INFO>",
            "CALL_INFO/PARAMETERS/PARAMETER/POSITION 'x': not an integer",
        ),
        (
            "<CALL_INFO><RESULT>1</RESULT><PARAMETERS><PARAMETER><POSITION>1</POSITION><TYPE>INOUT</TYPE>"
            "<VALUE/></PARAMETER></PARAMETERS></CALL_INFO>",
            "expected IN or OUT",
        ),
        ("<HOOK_MESSAGE><HOOK_TYPE>STATE</HOOK_TYPE></HOOK_MESSAGE>", "not API"),
        ("<VM><ID>1</ID></VM>", "expected <CALL_INFO> or <HOOK_MESSAGE>"),
        # oned inserts IN strings raw: a template with '<' makes the payload malformed
        ("<CALL_INFO><RESULT>1</RESULT><PARAMETERS><PARAMETER><POSITION>2</POSITION><TYPE>IN</TYPE>"
         "<VALUE>A=\"a<b\"</VALUE></PARAMETER></PARAMETERS></CALL_INFO>", "not well-formed"),
    ],
)  # fmt: skip
def test_call_info_errors(document: str, fragment: str) -> None:
    with pytest.raises(DocumentError) as caught:
        payload.parse_call_info(document)
    assert fragment in str(caught.value)


def _vm(template: str = "", top: str = "") -> str:
    return f"<VM><ID>7</ID>{top}<TEMPLATE>{template}</TEMPLATE></VM>"


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ("<VM><NAME>x</NAME></VM>", "VM/ID is missing"),
        ("<VM><ID>seven</ID></VM>", "VM/ID 'seven': not an integer"),
        ("<VM><ID>-3</ID></VM>", "VM/ID '-3': outside 0.."),
        (_vm(top="<UID>5a</UID>"), "VM/UID '5a'"),
        (_vm(top="<STATE>3.0</STATE>"), "VM/STATE '3.0'"),
        (_vm("<VCPU>four</VCPU>"), "VM/TEMPLATE/VCPU 'four'"),
        (_vm("<CPU>-1</CPU>"), "VM/TEMPLATE/CPU '-1'"),
        (_vm("<CPU>nan</CPU>"), "VM/TEMPLATE/CPU 'nan'"),
        (_vm("<MEMORY>1e3</MEMORY>"), "VM/TEMPLATE/MEMORY '1e3'"),
        (_vm("<PCI><VENDOR>zzzz</VENDOR></PCI>"), "VM/TEMPLATE/PCI/VENDOR 'zzzz'"),
        (_vm("<PCI><VENDOR>10de</VENDOR></PCI><PCI><CLASS>12345</CLASS></PCI>"), "VM/TEMPLATE/PCI[1]/CLASS"),
        (_vm("<PCI><ADDRESS>0000:17:00:0/../x</ADDRESS></PCI>"), "VM/TEMPLATE/PCI/ADDRESS"),
        (_vm("<PCI><ADDRESS>0000:17:00:0</ADDRESS><SHORT_ADDRESS>18:00.0</SHORT_ADDRESS></PCI>"),
         "name different devices"),
        (_vm("<PCI><NUMA_NODE>zero</NUMA_NODE></PCI>"), "VM/TEMPLATE/PCI/NUMA_NODE 'zero'"),
        (_vm("<PCI><VLAN_ID>100000000</VLAN_ID></PCI>"), "VM/TEMPLATE/PCI/VLAN_ID"),
        (_vm("<PCI><MAC>01:00:5e:00:00:01</MAC></PCI>"), "multicast"),
        (_vm("<PCI><TYPE>NIC;rm</TYPE></PCI>"), "VM/TEMPLATE/PCI/TYPE"),
        (_vm("<PCI><VM_BUS>0xzz</VM_BUS></PCI>"), "VM/TEMPLATE/PCI/VM_BUS"),
        (_vm("<NIC><PHYDEV>../../etc</PHYDEV></NIC>"), "VM/TEMPLATE/NIC/PHYDEV"),
        (_vm("<NIC><BRIDGE>br 0</BRIDGE></NIC>"), "VM/TEMPLATE/NIC/BRIDGE"),
        (_vm("<NIC><SECURITY_GROUPS>0,x</SECURITY_GROUPS></NIC>"), "VM/TEMPLATE/NIC/SECURITY_GROUPS"),
        (_vm("<NIC><VN_MAD>../../bin/sh</VN_MAD></NIC>"), "VM/TEMPLATE/NIC/VN_MAD"),
        (_vm("<TOPOLOGY><PIN_POLICY>PINNED</PIN_POLICY></TOPOLOGY>"), "VM/TEMPLATE/TOPOLOGY/PIN_POLICY"),
        (_vm("<TOPOLOGY><SOCKETS>0</SOCKETS></TOPOLOGY>"), "VM/TEMPLATE/TOPOLOGY/SOCKETS '0'"),
        (_vm("<TOPOLOGY><MEMORY_ACCESS>both</MEMORY_ACCESS></TOPOLOGY>"), "MEMORY_ACCESS"),
        (_vm("<NUMA_NODE><CPUS>0-3</CPUS></NUMA_NODE>"), "VM/TEMPLATE/NUMA_NODE/CPUS '0-3'"),
        (_vm("<NUMA_NODE><MEMORY>lots</MEMORY></NUMA_NODE>"), "VM/TEMPLATE/NUMA_NODE/MEMORY"),
        (_vm("<VCPU><X>1</X></VCPU>"), "VM/TEMPLATE/VCPU must be a simple value"),
        (_vm(top="<DEPLOY_ID>a b</DEPLOY_ID>"), "VM/DEPLOY_ID"),
        ("<VM><ID>1</ID><HISTORY_RECORDS><HISTORY><HOSTNAME>h/../x</HOSTNAME></HISTORY></HISTORY_RECORDS></VM>",
         "VM/HISTORY_RECORDS/HISTORY/HOSTNAME"),
        ("<VM><ID>1</ID><HISTORY_RECORDS><HISTORY><HID>3</HID></HISTORY><HISTORY><HID>x</HID></HISTORY>"
         "</HISTORY_RECORDS></VM>", "VM/HISTORY_RECORDS/HISTORY[1]/HID 'x'"),
        ("<HOST><ID>1</ID></HOST>", "found <HOST>"),
        ("<HOOK_MESSAGE><HOOK_TYPE>STATE</HOOK_TYPE></HOOK_MESSAGE>", "<HOOK_MESSAGE> carries no <VM>"),
        ("<CALL_INFO><RESULT>1</RESULT><EXTRA/></CALL_INFO>", "carries no <VM> in EXTRA"),
    ],
)  # fmt: skip
def test_malformed_values_name_the_element(document: str, fragment: str) -> None:
    with pytest.raises(DocumentError) as caught:
        payload.parse_vm_payload(document)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message


def test_optional_values_and_placeholders() -> None:
    vm = payload.parse_vm_payload(
        _vm(
            "<PCI><SHORT_ADDRESS>9F:00.0</SHORT_ADDRESS><NUMA_NODE>-</NUMA_NODE><VENDOR>0x10DE</VENDOR></PCI>"
            "<PCI><DOMAIN>0000</DOMAIN><BUS>3b</BUS><SLOT>00</SLOT><FUNCTION>1</FUNCTION><NUMA_NODE>-1</NUMA_NODE></PCI>"
            "<NIC_ALIAS><NIC_ID>3</NIC_ID><PARENT>NIC0</PARENT></NIC_ALIAS>"
            "<TOPOLOGY><PIN_POLICY>core</PIN_POLICY><MEMORY_ACCESS>SHARED</MEMORY_ACCESS></TOPOLOGY>"
            "<CPU>0.5</CPU>",
            top="<DEPLOY_ID></DEPLOY_ID><USER_TEMPLATE><SCHED_ACTION><ACTION>hold</ACTION></SCHED_ACTION>"
            "<A>1</A><A>2</A></USER_TEMPLATE>",
        )
    )
    first, second = vm.pci
    assert first.short_address == "9f:00.0" and first.address is None and first.numa_node is None
    assert first.vendor == 0x10DE
    assert second.address == "0000:3b:00.1" and second.numa_node is None
    (alias,) = vm.nics
    assert alias.alias and alias.nic_id == 3
    assert vm.topology is not None
    assert vm.topology.pin_policy == "CORE" and vm.topology.memory_access == "shared"
    assert vm.cpu == 0.5 and vm.deploy_id is None
    assert dict(vm.user_template) == {"SCHED_ACTION/ACTION": "hold", "A": "1"}


def test_legacy_oca_fixture() -> None:
    """OpenNebula's own 2011-era OCA fixture (HISTORY directly under VM, no GID) still parses."""
    vm = payload.parse_vm_payload((FIXTURES / "upstream" / "oca-ruby-fixtures" / "vm.xml").read_bytes())
    assert (vm.vm_id, vm.name, vm.uid, vm.gid) == (6, "vm-example", 0, None)
    assert (vm.host, vm.host_id, vm.deploy_id) == ("dummyhost", 0, "dummy")
    assert vm.nics[0].mac == "50:20:20:20:20:20"
    assert (vm.cpu, vm.memory_mib) == (1.0, 512)


def test_state_tables_match_opennebula_numbering() -> None:
    assert VM_STATES[8] == "POWEROFF" and VM_STATES[11] == "CLONING_FAILURE"
    assert LCM_STATES[3] == "RUNNING" and LCM_STATES[15] == "CLEANUP_RESUBMIT"
    assert LCM_STATES[36] == "BOOT_FAILURE" and LCM_STATES[60] == "PROLOG_MIGRATE_UNKNOWN"
    assert LCM_STATES[69] == "BACKUP" and LCM_STATES[71] == "RESTORE" and len(LCM_STATES) == 72
    assert all(re.fullmatch(r"[A-Z_]+", name) for name in LCM_STATES.values())
