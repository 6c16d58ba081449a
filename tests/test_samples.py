"""The bundled synthetic DGX-H100 sample (``aifactory_core/samples/dgx-h100.*``): the same files the
generator writes today, and the README's first commands on it as real processes — inventory with
IOMMU groups, ``device bind --dry-run`` with the exact sysfs writes (the sample untouched),
``plan`` of the bundled VM as indented XML, and the host/system probe."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from hostroots import FIXTURES, REPO, extract_archive, run_cli

SAMPLES = REPO / "aifactory_core" / "samples"
DGX_GPUS = ["0000:1b:00.0", "0000:43:00.0", "0000:52:00.0", "0000:61:00.0",
            "0000:9d:00.0", "0000:c3:00.0", "0000:d1:00.0", "0000:df:00.0"]

sys.path.insert(0, str(FIXTURES))
try:
    import make_dgx_sample
finally:
    sys.path.remove(str(FIXTURES))


def _tree(root: Path) -> dict[str, tuple[str, bytes]]:
    """Every entry under ``root``: (kind, content or link target)."""
    entries: dict[str, tuple[str, bytes]] = {}
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories + files:
            path = Path(directory) / name
            relative = str(path.relative_to(root))
            if path.is_symlink():
                entries[relative] = ("link", os.readlink(path).encode())
            elif path.is_dir():
                entries[relative] = ("dir", b"")
            else:
                entries[relative] = ("file", path.read_bytes())
    return entries


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A private sample cache and state directory for the CLI processes."""
    base = tmp_path_factory.mktemp("first-run")
    return {"XDG_CACHE_HOME": str(base / "cache"), "AIFACTORY_STATE_DIR": str(base / "state")}


def test_bundled_dgx_sample_is_what_the_generator_writes(tmp_path: Path) -> None:
    bundled = extract_archive(SAMPLES / "dgx-h100.tar.gz", tmp_path / "bundled")
    fresh = make_dgx_sample.host_tree(tmp_path / "fresh")
    bundled_tree, fresh_tree = _tree(bundled), _tree(fresh)
    assert bundled_tree.keys() == fresh_tree.keys()
    assert [name for name in bundled_tree if bundled_tree[name] != fresh_tree[name]] == []
    assert json.loads((SAMPLES / "dgx-h100.nvml.json").read_text()) == make_dgx_sample.nvml_recording()
    assert (SAMPLES / "dgx-h100.vm.xml").read_text() == make_dgx_sample.vm_document()


def test_dgx_sample_says_it_is_synthetic() -> None:
    assert json.loads((SAMPLES / "dgx-h100.nvml.json").read_text())["synthetic"].startswith("SYNTHETIC")
    assert "SYNTHESIZED" in (SAMPLES / "dgx-h100.vm.xml").read_text()


def test_inventory_shows_the_iommu_groups(env: dict[str, str]) -> None:
    result = run_cli("--host-root", "sample:dgx-h100", "inventory", "--json", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    gpus = {device["address"]: device for device in data["devices"] if device["kind"] == "gpu"}
    assert sorted(gpus) == DGX_GPUS
    assert all(str(device["iommu_group"]).isdigit() for device in gpus.values())
    assert len({device["iommu_group"] for device in gpus.values()}) == 8


def test_device_bind_dry_run_prints_the_sysfs_writes_and_changes_nothing(env: dict[str, str]) -> None:
    run_cli("--host-root", "sample:dgx-h100", "inventory", env=env)  # extracted, so it can be looked at first
    [root] = list((Path(env["XDG_CACHE_HOME"]) / "aifactory" / "samples").glob("dgx-h100-*"))
    device = root / "sys/bus/pci/devices/0000:1b:00.0"
    before = _tree(root)
    result = run_cli("--host-root", "sample:dgx-h100", "device", "bind", "--dry-run", "0000:1b:00.0", env=env)
    assert result.returncode == 0, result.stderr
    writes = [line.split("    #")[0] for line in result.stdout.splitlines() if not line.startswith("#")]
    assert writes == [f"echo vfio-pci > {device}/driver_override", f"echo 0000:1b:00.0 > {device}/driver/unbind",
                      f"echo 0000:1b:00.0 > {root}/sys/bus/pci/drivers_probe"]
    assert result.stdout.splitlines()[0] == (
        "# 0000:1b:00.0: nvidia -> vfio-pci (admin: requested by the administrator)")
    assert _tree(root) == before
    assert os.readlink(device / "driver").endswith("/nvidia")


def test_plan_of_the_bundled_vm_is_indented_xml(env: dict[str, str]) -> None:
    from lxml import etree

    result = run_cli("--host-root", "sample:dgx-h100", "plan", "--vm", "sample:dgx-h100", env=env)
    assert result.returncode == 0, result.stderr
    assert "GPU 0000:1b:00.0 paired with NIC 0000:18:00.0 (same PCIe switch)" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == '<domain type="kvm">' and lines[-1] == "</domain>"
    assert "  <name>one-42</name>" in lines
    domain = etree.fromstring(result.stdout.encode())
    sources = [f"{int(node.get('bus'), 16):02x}" for node in domain.iterfind("devices/hostdev/source/address")]
    assert sorted(sources) == ["18", "1b"]


def test_plan_refuses_an_unknown_sample_vm(env: dict[str, str]) -> None:
    result = run_cli("--host-root", "sample:dgx-h100", "plan", "--vm", "sample:nothing", env=env)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "aifactory: no VM document in sample 'nothing'; available: dgx-h100\n"


def test_probe_on_the_dgx_sample(env: dict[str, str]) -> None:
    from aifactory_core.one.template import parse_template, template_to_dict

    result = run_cli("--host-root", "sample:dgx-h100", "probe", "host-system", "--nvml-replay", "sample:dgx-h100",
                     env=env)
    assert result.returncode == 0, result.stderr
    attributes = template_to_dict(parse_template(result.stdout))
    gpus = attributes["AIF_GPU"]
    assert [gpu["BUS_ID"] for gpu in gpus] == DGX_GPUS
    assert {gpu["MODEL"] for gpu in gpus} == {"NVIDIA H100 80GB HBM3"}
    assert all(gpu["IOMMU_GROUP"].isdigit() and gpu["HEALTH"] == "OK" for gpu in gpus)
    assert [gpu["NUMA_NODE"] for gpu in gpus] == ["0"] * 4 + ["1"] * 4
    assert {gpu["FABRIC_INFO_STATE"] for gpu in gpus} == {"COMPLETED"}
    assert attributes["AIF_PROBE"][0]["STATUS"] == "OK"
    assert attributes["AIF_GPU_COUNT"] == ["8"]
