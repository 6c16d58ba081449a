"""The admission hook as OpenNebula runs it: a process fed ``$API METHOD`` on stdin.

oned is the XML-RPC test server of ``tests/onetestserver.py`` (real HTTP; every answer validated
against OpenNebula 7.0.2's XSDs before it is sent); the hook talks to it with pyone's transport.
The payloads are the synthesized OpenNebula hook samples in ``tests/fixtures/opennebula``.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aifactory_core.one.xmlsafe import parse_xml

ROOT = Path(__file__).parent.parent
SAMPLES = ROOT / "tests" / "fixtures" / "opennebula" / "samples" / "synthesized"
HOOK = ROOT / "hooks" / "aifactory-admission"
PYTHON = sys.executable  # the hook runs on the environment running the tests

POLICY = """
[opennebula]
version = "7.0"

[tenant.tenant-a]
group = "tenant-a"
group_id = 100
clusters = [100]
max_gpus = {max_gpus}
networks = [0, 7]
vlans = ["1000-1009"]
price_per_gpu_hour = 2.0

[[tenant.tenant-a.devices]]
name = "H100"
vendor = "10de"
device = "2330"
clusters = [100]
"""


def call_info(name: str) -> bytes:
    """The CALL_INFO element of a sample, as HEM base64-encodes it for $API."""
    root = parse_xml((SAMPLES / name).read_bytes(), name)
    from lxml import etree

    element = root if root.tag == "CALL_INFO" else root.find("CALL_INFO")
    return base64.b64encode(etree.tostring(element))


def run_hook(server, tmp_path: Path, stdin: bytes, max_gpus: int = 2, extra_env: dict[str, str] | None = None):
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY.format(max_gpus=max_gpus))
    auth = tmp_path / "one_auth"
    auth.write_text("oneadmin:secret\n")
    env = {**os.environ, "AIFACTORY_PYTHON": str(PYTHON), "AIFACTORY_POLICY": str(policy),
           "AIFACTORY_CONFIG": str(tmp_path / "absent.conf"), "ONE_XMLRPC": server.endpoint,
           "ONE_AUTH": str(auth), "AIFACTORY_ACCOUNTING_DIR": str(tmp_path / "state"), **(extra_env or {})}  # fmt: skip
    return subprocess.run([str(HOOK)], input=stdin, capture_output=True, env=env, timeout=60, check=False)


def test_instantiate_sample_within_policy_is_released(one_server, tmp_path: Path) -> None:
    one_server.add_vm(42, state=2)  # the sample VM (GPU 17:00.0, VF on network 7 VLAN 1001), on hold
    result = run_hook(one_server, tmp_path, call_info("hook_api_call_info_template_instantiate.xml")
                      + b" one.template.instantiate")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert b"VM 42: admitted" in result.stdout
    assert [call[0] for call in one_server.writes()] == ["one.vm.update", "one.vm.action"]
    assert one_server.writes()[1][1] == ("release", 42)
    assert one_server.vms[42].findtext("STATE") == "1"
    assert one_server.vms[42].findtext("USER_TEMPLATE/AIFACTORY_ADMISSION") == "ADMITTED"


def test_instantiate_sample_over_the_gpu_cap_stays_on_hold_with_reason(one_server, tmp_path: Path) -> None:
    one_server.add_vm(42, state=2)
    one_server.add_vm(50, state=3, pci=[{"CLASS": "0302", "DEVICE": "2330", "PCI_ID": "0", "VENDOR": "10de"}],
                      nics=[])  # fmt: skip  # another running VM of the tenant holding a GPU
    result = run_hook(one_server, tmp_path, call_info("hook_api_call_info_template_instantiate.xml")
                      + b" one.template.instantiate", max_gpus=1)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert b"refused" in result.stdout
    assert [call[0] for call in one_server.writes()] == ["one.vm.update"]
    assert one_server.vms[42].findtext("STATE") == "2"
    reason = one_server.vms[42].findtext("USER_TEMPLATE/AIFACTORY_POLICY_ERROR")
    assert "tenant.tenant-a.max_gpus" in reason and "holds 1 GPUs" in reason


def test_allocate_sample_by_oneadmin_is_admitted_without_change(one_server, tmp_path: Path) -> None:
    """The one.vm.allocate sample: oneadmin's PENDING VM 43 asking a GPU (infrastructure admin)."""
    one_server.add_vm(43, uid=0, gid=0, gname="oneadmin", state=1,
                      pci=[{"CLASS": "0302", "PCI_ID": "0", "VENDOR": "10de", "VM_BUS": "0x01"}], nics=[])  # fmt: skip
    result = run_hook(one_server, tmp_path, call_info("hook_message_api_vm_allocate.xml") + b" one.vm.allocate")
    assert result.returncode == 0, result.stderr
    assert b"VM 43: admitted" in result.stdout and one_server.writes() == []


def test_attachpci_of_an_ungranted_device_on_a_powered_off_vm_detaches_it_again(one_server, tmp_path: Path) -> None:
    """oned attaches PCI only in POWEROFF/UNDEPLOYED: the refusal detaches the device the call gave
    (PCI_ID 1, not granted) and keeps the granted H100 (PCI_ID 0). The same on a real oned:
    tests/oned/test_oned_isolation.py."""
    one_server.add_vm(42, state=8, lcm_state=0, nics=[],
                      pci=[{"CLASS": "0302", "DEVICE": "2330", "PCI_ID": "0", "VENDOR": "10de"},
                           {"CLASS": "0302", "DEVICE": "20b5", "PCI_ID": "1", "VENDOR": "10de"}])  # fmt: skip
    payload = (b"<CALL_INFO><RESULT>1</RESULT><PARAMETERS>"
               b"<PARAMETER><POSITION>1</POSITION><TYPE>IN</TYPE><VALUE>****</VALUE></PARAMETER>"
               b"<PARAMETER><POSITION>2</POSITION><TYPE>IN</TYPE><VALUE>42</VALUE></PARAMETER>"
               b"<PARAMETER><POSITION>1</POSITION><TYPE>OUT</TYPE><VALUE>true</VALUE></PARAMETER>"
               b"<PARAMETER><POSITION>2</POSITION><TYPE>OUT</TYPE><VALUE>42</VALUE></PARAMETER>"
               b"</PARAMETERS><EXTRA></EXTRA></CALL_INFO>")  # fmt: skip
    result = run_hook(one_server, tmp_path, base64.b64encode(payload) + b" one.vm.attachpci")
    assert result.returncode == 0, result.stderr
    assert [call for call in one_server.writes() if call[0] != "one.vm.update"] == [("one.vm.detachpci", (42, 1))]
    assert [pci.findtext("DEVICE") for pci in one_server.vms[42].findall("TEMPLATE/PCI")] == ["2330"]
    assert one_server.vms[42].findtext("STATE") == "8"
    assert "tenant.tenant-a.devices" in one_server.vms[42].findtext("USER_TEMPLATE/AIFACTORY_POLICY_ERROR")


def test_failed_call_is_ignored_without_contacting_oned(one_server, tmp_path: Path) -> None:
    text = (SAMPLES / "hook_api_call_info_template_instantiate.xml").read_bytes()
    failed = text.replace(b"<RESULT>1</RESULT>", b"<RESULT>0</RESULT>")
    root = parse_xml(failed)
    from lxml import etree

    result = run_hook(one_server, tmp_path, base64.b64encode(etree.tostring(root)) + b" one.template.instantiate")
    assert result.returncode == 0 and b"failed in oned" in result.stdout
    assert one_server.calls == []


XXE = b'<?xml version="1.0"?><!DOCTYPE c [<!ENTITY x SYSTEM "file:///etc/passwd">]><CALL_INFO>&x;</CALL_INFO>'
LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
          b"<CALL_INFO>&b;</CALL_INFO>")  # fmt: skip
NO_RESULT = b"<CALL_INFO><PARAMETERS></PARAMETERS><EXTRA/></CALL_INFO>"
NO_VM_ID = (b"<CALL_INFO><RESULT>1</RESULT><PARAMETERS><PARAMETER><POSITION>1</POSITION><TYPE>IN</TYPE>"
            b"<VALUE>****</VALUE></PARAMETER></PARAMETERS><EXTRA/></CALL_INFO>")  # fmt: skip


@pytest.mark.parametrize(
    ("stdin", "fragment"),
    [
        (base64.b64encode(XXE) + b" one.vm.allocate", "DOCTYPE"),
        (base64.b64encode(LAUGHS) + b" one.vm.allocate", "DOCTYPE"),
        (b"%%%not-base64%%% one.vm.allocate", "base64"),
        (base64.b64encode(b"<CALL_INFO>") + b" one.vm.allocate", "XML"),
        (base64.b64encode(NO_RESULT) + b" one.vm.allocate", "RESULT is missing"),
        (base64.b64encode(NO_VM_ID) + b" one.vm.attachpci", "VM id"),
        (base64.b64encode(NO_VM_ID) + b" one.vm.shutdown", "expected one of"),
        (base64.b64encode(NO_VM_ID), "names no method"),
        (b"", "empty"),
        (b"A" * (25 * 1024 * 1024), "larger than"),
        (base64.b64encode(b"<VM><ID>1</ID></VM>") + b" one.vm.allocate", "CALL_INFO"),
    ],
    ids=["xxe", "billion-laughs", "bad-base64", "truncated-xml", "no-result", "no-vm-id", "unhooked-method",
         "no-method", "empty", "huge", "wrong-root"],
)  # fmt: skip
def test_hostile_or_malformed_payloads_are_refused_and_change_nothing(
    one_server, tmp_path: Path, stdin: bytes, fragment: str
) -> None:
    from lxml import etree

    one_server.add_vm(42, state=2)
    before = etree.tostring(one_server.vms[42])
    result = run_hook(one_server, tmp_path, stdin)
    assert result.returncode == 2, (result.returncode, result.stderr)
    message = result.stderr.decode()
    assert message.startswith("aifactory-admission: ") and message.count("\n") == 1, message
    assert fragment in message, message
    assert one_server.calls == []  # oned was never even asked
    assert etree.tostring(one_server.vms[42]) == before
