"""``aifactory plan`` as a real process on the DGX-H100 tree, with oned's synthesized VM document
and deployment file moved onto the DGX's GPU/NIC pairs: placement, schema-valid domain XML, several
VMs planned in order onto one host, and bad input answered with one line and exit 2, the host
untouched."""

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


# ---------------------------------------------------------------------------------------------
# Several VMs: planned in order onto one host, each seeing what the earlier ones took.

DGX_PAIRS = [
    ("1b:00.0", "18:00.0"),
    ("43:00.0", "40:00.0"),
    ("52:00.0", "4f:00.0"),
    ("61:00.0", "5e:00.0"),
    ("9d:00.0", "9a:00.0"),
    ("c3:00.0", "c0:00.0"),
    ("d1:00.0", "ce:00.0"),
    ("df:00.0", "dc:00.0"),
]


def unpinned_vm(vm_id: int, vcpus: int, gpu: str, nic: str) -> str:
    """oned's VM document for a VM it did not pin (no NUMA_NODE, PIN_POLICY NONE) with one DGX GPU
    and its switch-local CX-7, 64 GiB on 1 GiB pages."""
    text = re.sub(r"<NUMA_NODE>.*?</NUMA_NODE>", "", vm_on_dgx(), flags=re.S)
    for old, new in (("<PIN_POLICY><![CDATA[THREAD]]>", "<PIN_POLICY><![CDATA[NONE]]>"),
                     ("<ID>42</ID>", f"<ID>{vm_id}</ID>"), ("<VMID><![CDATA[42]]>", f"<VMID><![CDATA[{vm_id}]]>"),
                     ("<VCPU><![CDATA[4]]>", f"<VCPU><![CDATA[{vcpus}]]>"),
                     ("<CORES><![CDATA[2]]>", f"<CORES><![CDATA[{vcpus // 2}]]>"),
                     ("0000:1b:00:0", f"0000:{gpu[:-2]}:0"), ("1b:00.0", gpu),
                     ("0000:18:00:0", f"0000:{nic[:-2]}:0"), ("18:00.0", nic)):  # fmt: skip
        assert old in text, old
        text = text.replace(old, new)
    return text


def _write_vms(directory: Path, vms: list[tuple[int, int, str, str]]) -> list[str]:
    args = []
    for vm_id, vcpus, gpu, nic in vms:
        path = directory / f"vm{vm_id}.xml"
        path.write_text(unpinned_vm(vm_id, vcpus, gpu, nic))
        args += ["--vm", str(path)]
    return args


def test_plan_several_vms_fills_the_dgx_device_locally(dgx_root: Path, tmp_path: Path) -> None:  # noqa: F811
    vms = [(100 + index, 16, gpu, nic) for index, (gpu, nic) in enumerate(DGX_PAIRS)]
    args = _write_vms(tmp_path, vms)
    done = run_cli("--host-root", str(dgx_root), "plan", *args, "--json", env=_env(tmp_path))
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert (document["placed"], document["device_local"]) == (8, 8)
    entries = document["vms"]
    assert [entry["vm_id"] for entry in entries] == [100 + index for index in range(8)]  # the order given
    assert all(entry["placed"] and entry["local"] for entry in entries)
    assert [entry["cells"][0]["host_node"] for entry in entries] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [entry["gpu_nic_pairs"] for entry in entries] == [[[f"0000:{gpu}", f"0000:{nic}"]] for gpu, nic in DGX_PAIRS]
    seen: dict[str, int] = {}
    for entry in entries:
        for cpu in (cpu for cell in entry["cells"] for cpu in cell["pcpus"]):
            assert seen.setdefault(cpu, entry["vm_id"]) == entry["vm_id"], f"pCPU {cpu} given twice"
    assert len(seen) == 8 * 16
    text = run_cli("--host-root", str(dgx_root), "plan", *args, env=_env(tmp_path))
    assert text.returncode == 0 and text.stdout.endswith("8 of 8 VMs placed, 8 device-local\n")
    assert text.stdout.count("device-local, memory nodes") == 8 and text.stderr == ""
    assert not (tmp_path / "state").exists()


def test_plan_several_vms_reports_the_one_pushed_off_its_gpu_node_and_the_one_that_does_not_fit(
    dgx_root: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    # node 0 has 112 CPUs: the first 100-vCPU VM takes them, the second (GPU also on node 0) spills
    # from the 12 left there onto node 1, the third finds 24 CPUs left on the host
    vms = [(1, 100, *DGX_PAIRS[0]), (2, 100, *DGX_PAIRS[1]), (3, 100, *DGX_PAIRS[2])]
    args = _write_vms(tmp_path, vms)
    done = run_cli("--host-root", str(dgx_root), "plan", *args, "--json", env=_env(tmp_path))
    assert done.returncode == 1, done.stderr
    first, second, third = json.loads(done.stdout)["vms"]
    assert first["placed"] and first["local"] and first["cells"][0]["host_node"] == 0
    assert second["placed"] and not second["local"] and [c["host_node"] for c in second["cells"]] == [0, 1]
    assert [len(cell["vcpus"]) for cell in second["cells"]] == [12, 88]
    assert any("spilled over 2 nodes" in note for note in second["notes"])
    assert third == {"vm_id": 3, "placed": False, "reason": third["reason"]} and "only 24 are free" in third["reason"]
    text = run_cli("--host-root", str(dgx_root), "plan", *args, env=_env(tmp_path))
    assert text.returncode == 1
    assert "VM 2: NOT device-local" in text.stdout and "VM 3: does not fit: " in text.stdout
    assert text.stdout.endswith("2 of 3 VMs placed, 1 device-local\n")
    # the order decides: VM 2 first takes node 0 and VM 1 is the one pushed to node 1
    swapped = run_cli("--host-root", str(dgx_root), "plan", *args[2:4], *args[0:2], "--json", env=_env(tmp_path))
    entries = json.loads(swapped.stdout)["vms"]
    assert [(entry["vm_id"], entry["local"]) for entry in entries] == [(2, True), (1, False)]


def test_plan_several_vms_sees_what_pinned_vms_already_hold(dgx_root: Path, tmp_path: Path) -> None:  # noqa: F811
    held = tmp_path / "held"
    held.mkdir()
    node0 = ",".join(str(cpu) for cpu in [*range(0, 56), *range(112, 168)][:100])
    (held / "one-7.xml").write_text(
        f"<domain type='kvm'><name>one-7</name><vcpu placement='static' cpuset='{node0}'>100</vcpu>"
        f"<cputune><emulatorpin cpuset='{node0}'/></cputune></domain>"
    )
    args = _write_vms(tmp_path, [(1, 16, *DGX_PAIRS[0]), (2, 16, *DGX_PAIRS[4])])
    done = run_cli("--host-root", str(dgx_root), "plan", *args, "--held", str(held), "--json", env=_env(tmp_path))
    assert done.returncode == 0, done.stderr
    first, second = json.loads(done.stdout)["vms"]
    # VM 7 holds 100 of node 0's 112 CPUs: VM 1 takes the 12 left and spills onto node 1
    assert not first["local"] and [(c["host_node"], len(c["vcpus"])) for c in first["cells"]] == [(0, 12), (1, 4)]
    assert first["cells"][0]["pcpus"] == [str(cpu) for cpu in range(156, 168)]
    assert second["local"] and second["cells"][0]["host_node"] == 1
    first_cpus = {cpu for cell in first["cells"] for cpu in cell["pcpus"]}
    assert not first_cpus & set(second["cells"][0]["pcpus"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--deployment", "deployment.xml"], "--deployment goes with a single --vm"),
        (["--vm", "vm1.xml"], "VM 1 is given twice"),
        (["--vm", "-", "--vm", "-"], "--vm - (standard input) may be given once"),
        (["--vm", "bad.xml"], "VM document"),
        (["--vm", "huge.xml"], "VM 9 asks for 999 CPUs; the host has 224"),
    ],
)
def test_plan_several_vms_bad_input_exits_2_with_one_line(
    dgx_root: Path,  # noqa: F811
    files: Path,
    extra: list[str],
    message: str,
) -> None:
    args = _write_vms(files, [(1, 4, *DGX_PAIRS[0]), (2, 4, *DGX_PAIRS[1])])
    (files / "bad.xml").write_text("<VM><ID>3</ID>")
    (files / "huge.xml").write_text(
        unpinned_vm(9, 4, *DGX_PAIRS[2]).replace("<VCPU><![CDATA[4]]>", "<VCPU><![CDATA[999]]>")
    )
    extra = [str(files / item) if item.endswith(".xml") else item for item in extra]
    done = run_cli("--host-root", str(dgx_root), "plan", *args, *extra, env=_env(files), stdin=b"")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert done.stdout == "" and not (files / "state").exists()
