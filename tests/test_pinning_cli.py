"""``aifactory plan`` as a real process on the DGX-H100 tree, with oned's synthesized VM document
and deployment file moved onto the DGX's GPU/NIC pair: placement, schema-valid domain XML, and
bad input answered with one line and exit 2, the host untouched."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hostroots import FIXTURES, dgx_root, run_cli  # noqa: F401
from test_pinning_domain import oned_sample_on_dgx

VM_SAMPLE = FIXTURES / "opennebula" / "samples" / "synthesized" / "vm_gpu_pinned.xml"


def vm_on_dgx(text: str | None = None) -> str:
    text = text or VM_SAMPLE.read_text()
    for old, new in (("0000:17:00:0", "0000:1b:00:0"), ("17:00.0", "1b:00.0"),
                     ("0000:18:00:2", "0000:18:00:0"), ("18:00.2", "18:00.0")):  # fmt: skip
        text = text.replace(old, new)
    return text


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    result = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            stat = os.lstat(path)
            result[path] = (stat.st_mtime_ns, stat.st_size)
    return result


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "vm.xml").write_text(vm_on_dgx())
    (tmp_path / "deployment.xml").write_text(oned_sample_on_dgx())
    return tmp_path


def _env(tmp_path: Path) -> dict[str, str]:
    return {"AIFACTORY_STATE_DIR": str(tmp_path / "state")}


def test_plan_rewrites_oned_deployment(dgx_root: Path, files: Path) -> None:  # noqa: F811
    done = run_cli("--host-root", str(dgx_root), "plan", "--vm", str(files / "vm.xml"),
                   "--deployment", str(files / "deployment.xml"), "--json", env=_env(files))  # fmt: skip
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    placement = document["placement"]
    assert placement["local"] and placement["cells"][0]["host_node"] == 0
    assert sorted(placement["cells"][0]["pcpus"]) == ["0", "1", "8", "9"]  # oned's CPUs kept
    assert placement["gpu_nic_pairs"] == [["0000:1b:00.0", "0000:18:00.0"]]
    if shutil.which("virt-xml-validate"):
        (files / "out.xml").write_text(document["domain_xml"])
        check = subprocess.run(
            ["virt-xml-validate", str(files / "out.xml"), "domain"], capture_output=True, check=False
        )
        assert check.returncode == 0, check.stderr
    assert not (files / "state").exists()


def test_plan_without_deployment_writes_a_minimal_domain(dgx_root: Path, files: Path) -> None:  # noqa: F811
    unpinned = re.sub(r"<NUMA_NODE>.*?</NUMA_NODE>", "", vm_on_dgx(), flags=re.S).replace(
        "<PIN_POLICY><![CDATA[THREAD]]>", "<PIN_POLICY><![CDATA[NONE]]>"
    )
    (files / "vm.xml").write_text(unpinned)
    done = run_cli("--host-root", str(dgx_root), "plan", "--vm", str(files / "vm.xml"), env=_env(files))
    assert done.returncode == 0, done.stderr
    assert "device-local" in done.stderr and "paired with NIC 0000:18:00.0" in done.stderr
    assert done.stdout.startswith("<domain") and "<vcpupin" in done.stdout
    if shutil.which("virt-xml-validate"):
        (files / "out.xml").write_text(done.stdout)
        check = subprocess.run(
            ["virt-xml-validate", str(files / "out.xml"), "domain"], capture_output=True, check=False
        )
        assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("<VCPU><![CDATA[4]]>", "<VCPU><![CDATA[999]]>"), "asks for 999 CPUs; the host has 224"),
        (lambda t: t.replace("<VCPU><![CDATA[4]]>", "<VCPU><![CDATA[four]]>"), "VCPU 'four'"),
        (lambda t: t.replace("<CORES><![CDATA[2]]>", "<CORES><![CDATA[2x]]>"), "CORES '2x'"),
        (lambda t: t.replace("<MEMORY_NODE_ID><![CDATA[0]]>", "<MEMORY_NODE_ID><![CDATA[zero]]>"), "MEMORY_NODE_ID"),
    ],
)
def test_bad_vm_documents_exit_2_with_one_line(dgx_root: Path, files: Path, edit, message: str) -> None:  # noqa: F811, ANN001
    (files / "vm.xml").write_text(edit(vm_on_dgx()))
    before = _snapshot(dgx_root)
    done = run_cli("--host-root", str(dgx_root), "plan", "--vm", str(files / "vm.xml"), env=_env(files))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert done.stdout == "" and _snapshot(dgx_root) == before and not (files / "state").exists()


def test_deployment_that_is_not_a_domain_exits_2(dgx_root: Path, files: Path) -> None:  # noqa: F811
    (files / "deployment.xml").write_text("<VM><ID>42</ID></VM>")
    done = run_cli("--host-root", str(dgx_root), "plan", "--vm", str(files / "vm.xml"),
                   "--deployment", str(files / "deployment.xml"), env=_env(files))  # fmt: skip
    assert done.returncode == 2 and "is not a libvirt domain" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""
