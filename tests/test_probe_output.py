"""Probe output on the real H100 capture and the DGX-shaped host, read back with the project's
template reader and compared field by field with the NVML recording and with ``nvidia-smi -q``
from the same host; the installed executables as OpenNebula runs them; the CLI; Prometheus format.

NVML answers come from the real H100 recording (``tests/fixtures/hosts/h100-sxm5-vm/nvml.json``)
or multi-GPU recordings derived from it (``probe_replays.py``); no GPU is used.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hostroots import H100_CAPTURE, REPO, run_cli
from probe_replays import DGX_GPUS, H100_NVML, multi_gpu, recording, write

from aifactory_core.one.template import parse_template, parse_vm_monitor, render_attribute, template_to_dict
from aifactory_core.one.xmlsafe import parse_xml
from aifactory_core.probes import host_system, prometheus, render, vm_monitor
from aifactory_core.probes.collect import GPU_KEYS, collect
from aifactory_core.probes.sysfs import Root

HOST_PROBE = REPO / "drivers/im/kvm-probes.d/host/system/aifactory-gpu"
VM_PROBE = REPO / "drivers/im/kvm-probes.d/vm/monitor/aifactory-gpu"


def _parse(text: str) -> dict[str, list[Any]]:
    for line in text.splitlines():  # every line is a complete attribute on its own
        assert len(parse_template(line + "\n", "probe line")) == 1, line
    return template_to_dict(parse_template(text, "probe output"))


def test_h100_output_matches_the_recording_field_by_field(h100_root: Path, tmp_path: Path) -> None:
    text = host_system.probe(Root(str(h100_root), str(tmp_path)), str(H100_NVML))
    parsed = _parse(text)
    [gpu] = parsed["AIF_GPU"]
    assert isinstance(gpu, dict)
    assert list(gpu) == list(GPU_KEYS)  # every key, in a stable order
    real = {name: entry.get("value") for name, entry in recording()["devices"][0].items() if name != "nvlink"}
    assert gpu["MODEL"] == real["Name"]
    assert gpu["UUID"] == real["UUID"]
    assert gpu["SERIAL"] == real["Serial"]
    assert gpu["VBIOS"] == real["VbiosVersion"]
    assert int(gpu["MEMORY_MIB"]) == real["MemoryInfo"]["total"] // 2**20
    assert gpu["BUS_ID"] == "0000:00:06.0" and gpu["ADDRESS"] == "0000:00:06:0" and gpu["SHORT_ADDRESS"] == "00:06.0"
    assert (gpu["VENDOR"], gpu["DEVICE"], gpu["CLASS"]) == ("10de", "2330", "0302")
    assert gpu["NUMA_NODE"] == "-"  # the capture's numa_node is -1; OpenNebula's PCI probe writes "-"
    assert gpu["DRIVER"] == "nvidia" and gpu["STATE"] == "HOST" and gpu["VM_ID"] == ""
    assert gpu["MIG_MODE"] == "DISABLED" and gpu["ECC_MODE"] == "ENABLED"
    for key, name in (("ECC_CORRECTED_VOLATILE", "ECC_corr_vol"), ("ECC_CORRECTED_AGGREGATE", "ECC_corr_agg"),
                      ("ECC_UNCORRECTED_VOLATILE", "ECC_uncorr_vol"), ("ECC_UNCORRECTED_AGGREGATE", "ECC_uncorr_agg"),
                      ("PCIE_REPLAY_COUNTER", "PcieReplayCounter"), ("PCIE_LINK_GEN", "CurrPcieLinkGeneration"),
                      ("PCIE_LINK_WIDTH", "CurrPcieLinkWidth"), ("PCIE_LINK_GEN_MAX", "MaxPcieLinkGeneration"),
                      ("PCIE_LINK_WIDTH_MAX", "MaxPcieLinkWidth")):
        assert int(gpu[key]) == real[name], key
    assert [gpu[f"REMAPPED_ROWS_{k}"] for k in ("CORRECTABLE", "UNCORRECTABLE", "PENDING", "FAILURE")] == \
        real["RemappedRows"]
    assert gpu["RETIRED_PAGES_PENDING"] == ""  # NotSupported on Hopper: empty, not a made-up zero
    assert gpu["THROTTLE_REASONS"] == "GPU_IDLE"  # recorded mask 0x1
    assert gpu["FABRIC_STATE"] == "NONE"  # every NVLink state call answered NotSupported
    assert (gpu["HEALTH"], gpu["HEALTH_REASON"], gpu["HEALTH_SOURCE"]) == ("OK", "", "NVML")
    assert gpu["LINK_SPEED"] == "32.0 GT/s PCIe" and gpu["LINK_WIDTH"] == "16"  # from the captured sysfs
    assert parsed["AIF_NVML"] == [{"STATUS": "replay", "DRIVER_VERSION": "580.159.04"}]
    assert parsed["AIF_GPU_COUNT"] == ["1"] and parsed["AIF_GPU_HEALTHY_FREE"] == ["1"]
    assert parsed["AIF_GPU_MODELS"] == ["NVIDIA H100 80GB HBM3"]
    assert parsed["AIF_PROBE"][0]["STATUS"] == "OK"


def _smi(element: Any, path: str) -> str:
    found = element.find(path)
    assert found is not None, path
    return str(found.text).strip()


def test_h100_output_agrees_with_nvidia_smi(h100_root: Path, tmp_path: Path) -> None:
    """The same fields as ``nvidia-smi -q -x`` recorded on the same host a moment apart."""
    xml = (H100_CAPTURE / "nvidia-smi-q.xml").read_bytes()
    xml = re.sub(rb"<!DOCTYPE[^>]*>", b"", xml)
    log = parse_xml(xml, "nvidia-smi -q -x")
    smi = log.find("gpu")
    assert smi is not None
    parsed = _parse(host_system.probe(Root(str(h100_root), str(tmp_path)), str(H100_NVML)))
    gpu = parsed["AIF_GPU"][0]
    assert gpu["MODEL"] == _smi(smi, "product_name")
    assert gpu["UUID"] == _smi(smi, "uuid")
    assert gpu["SERIAL"] == _smi(smi, "serial")
    assert gpu["VBIOS"] == _smi(smi, "vbios_version")
    assert f"{gpu['MEMORY_MIB']} MiB" == _smi(smi, "fb_memory_usage/total")
    assert gpu["MIG_MODE"] == _smi(smi, "mig_mode/current_mig").upper()
    assert gpu["ECC_MODE"] == _smi(smi, "ecc_mode/current_ecc").upper()
    assert gpu["ECC_UNCORRECTED_VOLATILE"] == _smi(smi, "ecc_errors/volatile/dram_uncorrectable")
    assert gpu["ECC_CORRECTED_AGGREGATE"] == _smi(smi, "ecc_errors/aggregate/dram_correctable")
    assert gpu["PCIE_REPLAY_COUNTER"] == _smi(smi, "pci/replay_counter")
    assert gpu["PCIE_LINK_GEN_MAX"] == _smi(smi, "pci/pci_gpu_link_info/pcie_gen/max_link_gen")
    assert f"{gpu['PCIE_LINK_WIDTH_MAX']}x" == _smi(smi, "pci/pci_gpu_link_info/link_widths/max_link_width")
    assert gpu["REMAPPED_ROWS_CORRECTABLE"] == _smi(smi, "remapped_rows/remapped_row_corr")
    assert gpu["REMAPPED_ROWS_PENDING"] == {"No": "0", "Yes": "1"}[_smi(smi, "remapped_rows/remapped_row_pending")]
    assert parsed["AIF_NVML"][0]["DRIVER_VERSION"] == _smi(log, "driver_version")


def _dgx_state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    (state / "owners").mkdir(parents=True)
    (state / "quarantine").mkdir()
    return state


def test_dgx_output_all_gpus_and_fabric(dgx_root: Path, tmp_path: Path) -> None:
    replay = write(multi_gpu(DGX_GPUS), tmp_path / "dgx-nvml.json")
    text = host_system.probe(Root(str(dgx_root), str(_dgx_state(tmp_path))), str(replay))
    parsed = _parse(text)
    gpus = parsed["AIF_GPU"]
    assert [gpu["BUS_ID"] for gpu in gpus] == DGX_GPUS
    assert all(list(gpu) == list(GPU_KEYS) for gpu in gpus)
    assert {gpu["HEALTH"] for gpu in gpus} == {"OK"}
    assert [gpu["NUMA_NODE"] for gpu in gpus] == ["0"] * 4 + ["1"] * 4
    assert all(gpu["IOMMU_GROUP"].isdigit() for gpu in gpus)
    assert parsed["AIF_GPU_COUNT"] == ["8"]
    pfs = parsed["AIF_SRIOV"]
    assert pfs and all(int(pf["TOTAL_VFS"]) > 0 for pf in pfs)
    ports = parsed["AIF_IB_PORT"]
    assert ports and all(re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", p["BUS_ID"]) for p in ports)
    assert {p["LINK_LAYER"] for p in ports} <= {"InfiniBand", "Ethernet"}
    assert parsed["AIF_HUGEPAGE"] and {h["NODE_ID"] for h in parsed["AIF_HUGEPAGE"]} == {"0", "1"}
    assert parsed["AIF_READY"] in (["YES"], ["NO"])


def test_dgx_assigned_and_quarantined_gpus_from_the_host_side(dgx_root: Path, tmp_path: Path) -> None:
    """A GPU held by a VM is reported with its VM; health comes from sysfs and the quarantine marker."""
    state = _dgx_state(tmp_path)
    (state / "owners" / DGX_GPUS[0]).write_text("42\n")
    (state / "owners" / "0000:aa:00.2").write_text("42\n")  # a VF of the same VM
    (state / "quarantine" / DGX_GPUS[5]).write_text("link trained at x8 of x16\n")
    replay = write(multi_gpu(DGX_GPUS[1:]), tmp_path / "seven.json")  # NVML cannot see the VM's GPU
    root = Root(str(dgx_root), str(state))
    parsed = _parse(host_system.probe(root, str(replay)))
    gpus = {gpu["BUS_ID"]: gpu for gpu in parsed["AIF_GPU"]}
    held = gpus[DGX_GPUS[0]]
    assert (held["STATE"], held["VM_ID"], held["HEALTH_SOURCE"]) == ("ASSIGNED", "42", "HOST_SIDE")
    assert held["CONFIG_SPACE"] == "READABLE" and held["HEALTH"] == "OK" and held["MODEL"] == ""
    bad = gpus[DGX_GPUS[5]]
    assert (bad["HEALTH"], bad["QUARANTINED"]) == ("FAILED", "YES")
    assert "x8 of x16" in bad["HEALTH_REASON"] and bad["LAST_RESET"].startswith("FAILED")
    assert parsed["AIF_GPU_FREE"] == ["7"] and parsed["AIF_GPU_HEALTHY_FREE"] == ["6"]
    assert parsed["AIF_GPU_HEALTH"] == ["FAILED"]
    [record] = parse_vm_monitor(vm_monitor.probe(root, str(replay)))
    monitor = dict(record.monitor)
    assert (record.vm_id, record.deploy_id) == (42, "one-42")
    assert monitor["AIF_PCI_DEVICES"] == f"{DGX_GPUS[0]},0000:aa:00.2"
    assert (monitor["AIF_GPU_COUNT"], monitor["AIF_VF_COUNT"], monitor["AIF_GPU_HEALTH"]) == ("1", "1", "OK")


def test_inventory_cached_while_assigned(h100_root: Path, tmp_path: Path) -> None:
    """Model/UUID learnt while NVML could see the GPU are reported once it is given to a VM."""
    root = Root(str(h100_root), str(tmp_path))
    host_system.probe(root, str(H100_NVML))
    (tmp_path / "owners").mkdir()
    (tmp_path / "owners" / "0000:00:06.0").write_text("7\n")
    empty = recording()
    empty["devices"] = []
    gpu = _parse(host_system.probe(root, str(write(empty, tmp_path / "none.json"))))["AIF_GPU"][0]
    assert (gpu["STATE"], gpu["VM_ID"], gpu["INVENTORY_SOURCE"]) == ("ASSIGNED", "7", "CACHED")
    assert gpu["UUID"] == "GPU-7104448d-2d24-50b1-4ee1-426fe364a21d"


def test_no_nvml_library_every_gpu_still_reported(dgx_root: Path, tmp_path: Path) -> None:
    parsed = _parse(host_system.probe(Root(str(dgx_root), str(_dgx_state(tmp_path)))))
    assert parsed["AIF_NVML"][0]["STATUS"].startswith("unavailable")
    assert len(parsed["AIF_GPU"]) == 8
    assert {gpu["NVML_STATUS"] for gpu in parsed["AIF_GPU"]} == {"not seen"}
    assert parsed["AIF_PROBE"][0]["STATUS"] == "OK"


def test_xid_since_last_run_from_kmsg(h100_root: Path, tmp_path: Path) -> None:
    """XIDs are read from the kernel log once: the next run does not report them again."""
    root_dir = tmp_path / "root"
    shutil.copytree(h100_root, root_dir, symlinks=True)
    (root_dir / "dev").mkdir()
    (root_dir / "dev" / "kmsg").write_text(
        "6,100,1000,-;nvidia: loading\n"
        "3,101,2000,-;NVRM: Xid (PCI:0000:00:06): 79, pid=0, name=, GPU has fallen off the bus.\n")
    root = Root(str(root_dir), str(tmp_path / "state"))
    first = _parse(host_system.probe(root, str(H100_NVML)))
    assert first["AIF_XID_SOURCE"] == ["kmsg"]
    gpu = first["AIF_GPU"][0]
    assert (gpu["XID_SINCE_LAST"], gpu["HEALTH"]) == ("79", "FAILED")
    again = _parse(host_system.probe(root, str(H100_NVML)))["AIF_GPU"][0]
    assert (again["XID_SINCE_LAST"], again["HEALTH"]) == ("", "OK")


def test_xid_after_a_reboot_is_reported_though_its_sequence_is_lower(h100_root: Path, tmp_path: Path) -> None:
    """The kernel numbers ``/dev/kmsg`` records from 0 again after a reboot: an XID the new boot
    logs is reported even when its sequence is below the last one read in the previous boot, and
    a state file written before boot ids were kept is still read as this boot's."""
    root_dir = tmp_path / "root"
    shutil.copytree(h100_root, root_dir, symlinks=True)
    (root_dir / "dev").mkdir()
    boot_id = root_dir / "proc/sys/kernel/random/boot_id"
    boot_id.parent.mkdir(parents=True)
    kmsg = root_dir / "dev" / "kmsg"
    xid_line = "3,{},2000,-;NVRM: Xid (PCI:0000:00:06): 79, pid=0, name=, GPU has fallen off the bus.\n"
    root = Root(str(root_dir), str(tmp_path / "state"))
    (tmp_path / "state" / "probes").mkdir(parents=True)
    (tmp_path / "state" / "probes" / "xid-seq").write_text("500\n")  # the format without a boot id
    boot_id.write_text("11111111-1111-1111-1111-111111111111\n")
    kmsg.write_text(xid_line.format(400) + xid_line.format(501))
    first = _parse(host_system.probe(root, str(H100_NVML)))["AIF_GPU"][0]
    assert first["XID_SINCE_LAST"] == "79"  # only 501: 400 was read before
    kmsg.write_text("6,0,10,-;Linux version\n" + xid_line.format(7))
    boot_id.write_text("22222222-2222-2222-2222-222222222222\n")
    rebooted = _parse(host_system.probe(root, str(H100_NVML)))["AIF_GPU"][0]
    assert (rebooted["XID_SINCE_LAST"], rebooted["HEALTH"]) == ("79", "FAILED")
    again = _parse(host_system.probe(root, str(H100_NVML)))["AIF_GPU"][0]
    assert again["XID_SINCE_LAST"] == ""


@pytest.mark.parametrize("value", ['a "quoted" word', "back\\slash\\", "tab\there", "ctl\x01\x1f", "]]> cdata",
                                   "ünïcødé", "", "x=1, y=[2]", "# not a comment", "line\nbreak"])
def test_writer_matches_the_reference_and_reads_back(value: str) -> None:
    line = render.attribute("K", {"A": value, "B": 3})
    [(key, parsed)] = parse_template(line + "\n")
    assert key == "K" and isinstance(parsed, dict)
    cleaned = render.clean(value)
    assert parsed == {"A": cleaned, "B": "3"}
    assert line == render_attribute("K", {"A": cleaned, "B": 3})  # byte for byte as the reference


def test_writer_agrees_with_reference_on_every_emitted_line(dgx_root: Path, tmp_path: Path) -> None:
    replay = write(multi_gpu(DGX_GPUS), tmp_path / "dgx.json")
    attributes = host_system.attributes(collect(Root(str(dgx_root), str(tmp_path)), str(replay)))
    for key, value in attributes:
        assert render.attribute(key, value) == render_attribute(key, value)


def _run_probe(probe: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {key: value for key, value in os.environ.items() if not key.startswith("AIFACTORY_")}
    full.update(env)
    return subprocess.run([sys.executable, "-S", str(probe), "kvm", "3", "node3"], input="<MONITOR_CONFIGURATION/>",
                          capture_output=True, text=True, env=full, timeout=60, check=False)


def test_installed_probes_run_as_opennebula_runs_them(dgx_root: Path, tmp_path: Path) -> None:
    state = _dgx_state(tmp_path)
    (state / "owners" / DGX_GPUS[2]).write_text("5\n")
    env = {"AIFACTORY_HOST_ROOT": str(dgx_root), "AIFACTORY_STATE_DIR": str(state)}
    host = _run_probe(HOST_PROBE, env)
    assert (host.returncode, host.stderr) == (0, "")
    assert len(_parse(host.stdout)["AIF_GPU"]) == 8
    vm = _run_probe(VM_PROBE, env)
    assert (vm.returncode, vm.stderr) == (0, "")
    [record] = parse_vm_monitor(vm.stdout)
    assert record.vm_id == 5 and dict(record.monitor)["AIF_GPU_ADDRESSES"] == DGX_GPUS[2]


def test_installed_probe_survives_a_broken_recording_and_bad_root(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    result = _run_probe(HOST_PROBE, {"AIFACTORY_HOST_ROOT": str(tmp_path / "missing"),
                                     "AIFACTORY_NVML_REPLAY": str(broken), "AIFACTORY_STATE_DIR": str(tmp_path)})
    assert (result.returncode, result.stderr) == (0, "")
    parsed = _parse(result.stdout)
    assert parsed["AIF_NVML"][0]["STATUS"].startswith("error: JSONDecodeError")
    assert parsed["AIF_GPU"] == [{}] and parsed["AIF_READY"] == ["NO"]


def test_cli_probe_and_metrics(h100_root: Path, tmp_path: Path) -> None:
    env = {"AIFACTORY_STATE_DIR": str(tmp_path)}
    probe = run_cli("--host-root", str(h100_root), "probe", "host-system", "--nvml-replay", str(H100_NVML), env=env)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout == host_system.probe(Root(str(h100_root), str(tmp_path)), str(H100_NVML))
    textfile = tmp_path / "aifactory.prom"
    metrics = run_cli("--host-root", str(h100_root), "metrics", "--nvml-replay", str(H100_NVML),
                      "--textfile", str(textfile), env=env)
    assert metrics.returncode == 0, metrics.stderr
    assert 'aifactory_gpu_power_watts{bus_id="0000:00:06.0"' in textfile.read_text()
    for budget in ("inf", "nan", "0", "-1"):
        for command in (("probe", "host-system"), ("metrics",)):
            bad = run_cli("--host-root", str(h100_root), *command, "--nvml-replay", str(H100_NVML),
                          "--budget", budget, env=env)
            assert (bad.returncode, bad.stdout) == (2, "") and bad.stderr.count("\n") == 1, bad.stderr
            assert "--budget" in bad.stderr
    nowhere = tmp_path / "no-such-dir" / "aifactory.prom"
    stray = run_cli("--host-root", str(h100_root), "metrics", "--textfile", str(nowhere), env=env)
    assert (stray.returncode, stray.stdout) == (2, "") and stray.stderr.count("\n") == 1, stray.stderr
    assert "does not exist" in stray.stderr and not nowhere.parent.exists()
    missing = run_cli("--host-root", str(h100_root), "metrics", "--nvml-replay", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    wrong = run_cli("--host-root", str(h100_root), "probe", "host-system", "--nvml-replay", str(tmp_path))
    assert wrong.returncode == 2
    broken = tmp_path / "broken.json"
    for content in ("{ not json", "[]"):
        broken.write_text(content)
        for command in (("probe", "host-system"), ("metrics",)):
            bad = run_cli("--host-root", str(h100_root), *command, "--nvml-replay", str(broken), env=env)
            assert (bad.returncode, bad.stdout) == (2, "") and bad.stderr.count("\n") == 1, bad.stderr
            assert "NVML recording" in bad.stderr


SAMPLE = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\[\\"n])*",?)*\})? -?[0-9.e+]+')


def test_prometheus_exposition_is_well_formed(h100_root: Path, tmp_path: Path) -> None:
    text = prometheus.exposition(collect(Root(str(h100_root), str(tmp_path)), str(H100_NVML), nvml_mode="metrics"))
    families: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in families
            families[name] = kind
        elif not line.startswith("# HELP "):
            assert SAMPLE.fullmatch(line), line
            assert line.split("{")[0].split(" ")[0] in families
    real = recording()["devices"][0]
    assert "aifactory_gpu_power_watts{bus_id=\"0000:00:06.0\"" in text
    assert re.search(rf"aifactory_gpu_power_watts\{{[^}}]*\}} {real['PowerUsage']['value'] / 1000!r}\n", text)
    assert re.search(rf"aifactory_gpu_temperature_celsius\{{[^}}]*\}} {real['Temperature']['value']}\n", text)
    assert re.search(rf"aifactory_gpu_memory_total_bytes\{{[^}}]*\}} {real['MemoryInfo']['value']['total']}\n", text)
    assert re.search(rf"aifactory_gpu_sm_clock_hertz\{{[^}}]*\}} {real['Clock_SM']['value'] * 1_000_000}\n", text)
    assert families["aifactory_gpu_energy_joules_total"] == "counter"
    # Prometheus naming: base units, counters end in _total and only they, no unit prefixes
    assert all(name.endswith("_total") == (kind == "counter") for name, kind in families.items())
    assert not [name for name in families if re.search(r"milli|mega|mebi|kib|_mib|percent", name)]
    assert "state=" not in "".join(line for line in text.splitlines() if "_health_state{" not in line)


def test_textfile_written_atomically(tmp_path: Path) -> None:
    target = tmp_path / "gpu.prom"
    target.write_text("old\n")
    prometheus.write_textfile(str(target), "new\n")
    assert target.read_text() == "new\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gpu.prom"]
    assert target.stat().st_mode & 0o777 == 0o644  # node_exporter reads it as another user


@pytest.mark.parametrize("probe", [HOST_PROBE, VM_PROBE], ids=["host-system", "vm-monitor"])
def test_installed_probes_import_nothing_heavy(probe: Path, dgx_root: Path, tmp_path: Path) -> None:
    """Start-up stays lean: none of the slow packages (or argparse/dataclasses/typing) is loaded.

    The time itself is measured by ``benchmarks/bench_probes.py``, not asserted here."""
    full = {key: value for key, value in os.environ.items() if not key.startswith("AIFACTORY_")}
    full.update({"AIFACTORY_HOST_ROOT": str(dgx_root), "AIFACTORY_STATE_DIR": str(tmp_path)})
    result = subprocess.run([sys.executable, "-S", "-X", "importtime", str(probe), "kvm", "0", "h"],
                            capture_output=True, text=True, env=full, timeout=60, check=False)
    assert result.returncode == 0
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "aifactory_core.probes" in imported
    heavy = {"pluggy", "lxml", "pyone", "pyroute2", "pynvml", "argparse", "dataclasses", "typing", "pyudev",
             "aifactory_core.one.template", "aifactory_core.hostroot"}
    assert not imported & heavy


def test_holders_agree_with_the_lifecycle_engine(tmp_path: Path) -> None:
    """The probes' read-only view of owner files gives what ``ownership.held_devices`` gives."""
    from aifactory_core.hostroot import HostRoot
    from aifactory_core.lifecycle.ownership import claim, held_devices
    from aifactory_core.probes.host_side import holders

    host = HostRoot(tmp_path, tmp_path / "state")
    claim(host, "0000:1b:00.0", 42)
    claim(host, "0000:aa:00.2", 42)
    claim(host, "0000:43:00.0", 7)
    (tmp_path / "state" / "owners" / "not-an-address").write_text("9\n")
    (tmp_path / "state" / "owners" / "0000:52:00.0").write_text("garbage\n")
    engine = held_devices(host)
    assert engine == {"0000:1b:00.0": 42, "0000:43:00.0": 7, "0000:aa:00.2": 42}
    assert holders(Root(str(tmp_path), str(tmp_path / "state"))) == engine


def test_cli_bundled_sample_recording(tmp_path: Path) -> None:
    """``sample:h100-sxm5-vm`` names the packaged copy of the real H100 recording."""
    env = {"AIFACTORY_STATE_DIR": str(tmp_path)}
    result = run_cli("--host-root", "sample:h100-sxm5-vm", "probe", "host-system", "--nvml-replay",
                     "sample:h100-sxm5-vm", env=env)
    assert result.returncode == 0, result.stderr
    assert _parse(result.stdout)["AIF_GPU"][0]["UUID"] == recording()["devices"][0]["UUID"]["value"]
    bad = run_cli("probe", "host-system", "--nvml-replay", "sample:../../etc/passwd", env=env)
    assert bad.returncode == 2 and "unknown sample" in bad.stderr


def test_h100_capture_has_no_fabric_reading_and_none_is_invented(h100_root: Path, tmp_path: Path) -> None:
    """The real capture's GpuFabricInfo entry is the recorder's own TypeError (it called the function
    without its structure argument): NVML was never asked, so the probe says the call was not
    recorded, invents no fabric state and reports no error of the GPU's."""
    assert recording()["devices"][0]["GpuFabricInfo"]["error"].startswith("TypeError: ")
    [gpu] = _parse(host_system.probe(Root(str(h100_root), str(tmp_path)), str(H100_NVML)))["AIF_GPU"]
    assert gpu["FABRIC_INFO_STATE"] == "" and gpu["FABRIC_CLIQUE_ID"] == "" and gpu["FABRIC_CLUSTER_UUID"] == ""
    assert gpu["FABRIC_INFO_STATUS"] == "NOT_RECORDED"
    assert gpu["HEALTH"] == "OK"  # an unrecorded fabric call spoils no other field


def test_dgx_fabric_info_from_a_synthetic_replay(dgx_root: Path, tmp_path: Path) -> None:
    """SYNTHETIC fabric answers (``probe_replays.with_fabric_info``) on the real H100 entries: all
    GPUs registered; one still in progress; one whose fabric call fails; one NOT_SUPPORTED call."""
    from probe_replays import SYNTHETIC_CLUSTER_UUID, with_fabric_info

    data = with_fabric_info(multi_gpu(DGX_GPUS))
    assert data["synthetic"].startswith("SYNTHETIC")
    data["devices"][1]["GpuFabricInfo"]["value"]["state"] = 2  # IN_PROGRESS
    data["devices"][2]["GpuFabricInfo"] = {"error": "NVMLError_Unknown: Unknown Error", "us": 20.0}
    data["devices"][3]["GpuFabricInfo"] = {"error": "NVMLError_NotSupported: Not Supported", "us": 20.0}
    data["devices"][4]["GpuFabricInfo"]["value"]["status"] = 15  # registration ended with GPU_IS_LOST
    replay = write(data, tmp_path / "dgx-fabric-nvml.json")
    gpus = _parse(host_system.probe(Root(str(dgx_root), str(_dgx_state(tmp_path))), str(replay)))["AIF_GPU"]
    good = gpus[0]
    assert (good["FABRIC_INFO_STATE"], good["FABRIC_INFO_STATUS"], good["FABRIC_CLIQUE_ID"],
            good["FABRIC_CLUSTER_UUID"]) == ("COMPLETED", "SUCCESS", "7", SYNTHETIC_CLUSTER_UUID)
    assert good["HEALTH"] == "OK"
    assert gpus[1]["FABRIC_INFO_STATE"] == "IN_PROGRESS"
    assert (gpus[1]["HEALTH"], gpus[1]["HEALTH_REASON"]) == ("DEGRADED", "NVSwitch fabric registration in progress")
    assert gpus[2]["FABRIC_INFO_STATE"] == ""
    assert gpus[2]["FABRIC_INFO_STATUS"] == "error: NVMLError_Unknown: Unknown Error"
    assert gpus[3]["FABRIC_INFO_STATE"] == "NOT_SUPPORTED"
    assert (gpus[4]["FABRIC_INFO_STATUS"], gpus[4]["HEALTH"]) == ("GpuIsLost", "FAILED")
    for broken in (gpus[2], gpus[3]):  # the fabric call's error spoils none of the other fields
        assert broken["HEALTH"] == "OK" and broken["NVML_STATUS"] == "ok"
        assert {key: broken[key] for key in ("MODEL", "MEMORY_MIB", "ECC_MODE", "PCIE_LINK_WIDTH")} == \
            {key: good[key] for key in ("MODEL", "MEMORY_MIB", "ECC_MODE", "PCIE_LINK_WIDTH")}


def test_inventory_cache_from_an_earlier_json_file_is_migrated(h100_root: Path, tmp_path: Path) -> None:
    """A cache written by an earlier version (JSON) is still honoured, then rewritten as plain text."""
    import json

    root = Root(str(h100_root), str(tmp_path))
    host_system.probe(root, str(H100_NVML))  # NVML sees the GPU: its inventory is remembered
    learnt = (tmp_path / "probes" / "gpu-inventory.tsv").read_text()
    assert learnt.startswith("0000:00:06.0\tNVIDIA H100 80GB HBM3\tGPU-7104448d-")
    (tmp_path / "probes" / "gpu-inventory.tsv").unlink()
    legacy = {"0000:00:06.0": {"MEMORY_MIB": 81559, "MODEL": "NVIDIA H100 80GB HBM3", "SERIAL": "1652524101123",
                               "UUID": "GPU-7104448d-2d24-50b1-4ee1-426fe364a21d", "VBIOS": "96.00.DA.00.0C"}}
    (tmp_path / "probes" / "gpu-inventory.json").write_text(json.dumps(legacy))
    empty = recording()
    empty["devices"] = []
    gpu = _parse(host_system.probe(root, str(write(empty, tmp_path / "none.json"))))["AIF_GPU"][0]
    assert gpu["INVENTORY_SOURCE"] == "CACHED"
    assert {key: gpu[key] for key in legacy["0000:00:06.0"]} == {k: str(v) for k, v in legacy["0000:00:06.0"].items()}
    assert (tmp_path / "probes" / "gpu-inventory.tsv").read_text() == learnt


def test_probe_start_up_loads_neither_json_nor_re(dgx_root: Path, tmp_path: Path) -> None:
    """The installed host/system probe on the DGX-shaped tree, its GPU inventory cached, NVML absent:
    which modules load is deterministic (their cost is measured in ``benchmarks/bench_probes.py``)."""
    state = _dgx_state(tmp_path)
    (state / "probes").mkdir()
    (state / "probes" / "gpu-inventory.tsv").write_text(
        "".join(f"{address}\tNVIDIA H100 80GB HBM3\tGPU-{index}\t{index}\t81559\t96.00\n"
                for index, address in enumerate(DGX_GPUS)))
    env = {**os.environ, "AIFACTORY_HOST_ROOT": str(dgx_root), "AIFACTORY_STATE_DIR": str(state)}
    result = subprocess.run([sys.executable, "-S", "-X", "importtime", str(HOST_PROBE), "kvm", "0", "h"], env=env,
                            capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL)
    loaded = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "aifactory_core.probes.collect" in loaded and result.stdout.count('INVENTORY_SOURCE="CACHED"') == 8
    assert not loaded & {"json", "re", "enum", "typing"}, sorted(loaded & {"json", "re", "enum", "typing"})


@pytest.mark.parametrize("probe", [HOST_PROBE, VM_PROBE], ids=["host-system", "vm-monitor"])
def test_probe_without_a_gpu_inventory_loads_neither_json_nor_re(probe: Path, dgx_root: Path, tmp_path: Path) -> None:
    """A host whose GPUs NVML has not seen (none, or all on vfio-pci since boot) has no inventory
    cache of either format: the probe must not import ``json`` looking for the old one (before, every
    run on such a host did: about 5 ms, the probe's start-up over budget)."""
    state = tmp_path / "state"
    env = {**os.environ, "AIFACTORY_HOST_ROOT": str(dgx_root), "AIFACTORY_STATE_DIR": str(state)}
    result = subprocess.run([sys.executable, "-S", "-X", "importtime", str(probe), "kvm", "0", "h"], env=env,
                            capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL)
    loaded = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "aifactory_core.probes.collect" in loaded
    assert not (state / "probes" / "gpu-inventory.tsv").exists()
    assert not loaded & {"json", "re", "enum", "typing"}, sorted(loaded & {"json", "re", "enum", "typing"})

def test_xid_parser_agrees_with_the_pattern_it_replaces() -> None:
    """The string matcher against the regular expression the probe used before (the oracle here),
    on the recorded driver line and variants around every boundary."""
    from aifactory_core.probes.xid import parse_xid

    oracle = re.compile(r"NVRM: Xid \(PCI:([0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2})[^)]*\): ([0-9]+)")
    recorded = "NVRM: Xid (PCI:0000:17:00): 79, pid=0, name=, GPU has fallen off the bus."
    lines = [recorded, recorded.replace("0000:17:00", "0000:AB:cd"), "NVRM: Xid (PCI:0000:17:00.0 ch 3): 13, pid=9",
             "NVRM: Xid (PCI:0000:17:00): x79", "NVRM: Xid (PCI:0000:17:00):79", "NVRM: Xid (PCI:0000:17:0g): 79",
             "NVRM: Xid (PCI:0000:17:00", "NVRM: Xid (PCI:0000:17:00)): 79", "NVRM: Xid (PCI:00:17:00): 79",
             "junk NVRM: Xid (PCI:zz) NVRM: Xid (PCI:0000:43:00): 48, more", "", "NVRM: Xid (PCI:", "Xid 79",
             "NVRM: Xid (PCI:0000:17:00 (x)): 31"]
    for line in lines:
        match = oracle.search(line)
        assert parse_xid(line) == ((match.group(1).lower(), int(match.group(2))) if match else None), line


def test_link_names_as_the_kernel_resolves_them(tmp_path: Path) -> None:
    root = Root(str(tmp_path), str(tmp_path / "state"))
    (tmp_path / "sys/bus/pci/drivers/nvidia").mkdir(parents=True)
    device = tmp_path / "sys/devices/pci0000:00/0000:00:06.0"
    device.mkdir(parents=True)
    (device / "driver").symlink_to("../../../bus/pci/drivers/nvidia")
    (device / "slash").symlink_to("../../../bus/pci/drivers/nvidia/")
    (device / "dots").symlink_to("../../../bus/pci/drivers/nvidia/..")
    (device / "file").write_text("x")
    base = "/sys/devices/pci0000:00/0000:00:06.0"
    assert root.link_name(f"{base}/driver") == "nvidia" and root.link_name(f"{base}/slash") == "nvidia"
    assert root.link_name(f"{base}/dots") == "drivers"
    assert root.link_name(f"{base}/file") is None and root.link_name(f"{base}/absent") is None
    from aifactory_core.host.sysfs import link_name  # the engine's reader follows the same rule

    for name in ("driver", "slash", "dots", "file", "absent"):
        assert link_name(device / name) == root.link_name(f"{base}/{name}"), name


@pytest.mark.parametrize(("value", "seconds"), [("2.5", 2.5), ("nan", 5.0), ("inf", 60.0), ("-1", 0.1), ("x", 5.0)])
def test_installed_probe_budget_is_clamped(monkeypatch: pytest.MonkeyPatch, value: str, seconds: float) -> None:
    from aifactory_core import probes

    monkeypatch.setenv("AIFACTORY_PROBE_BUDGET_S", value)
    assert probes._budget() == seconds


@pytest.mark.parametrize(("tree_mode", "compat", "expected"), [
    ("switchdev", None, "switchdev"), ("legacy", None, "legacy"),
    ("switchdev", "legacy", "legacy"), ("legacy", "switchdev\n", "switchdev"),
    ("switchdev", "Unknown", "switchdev"), ("legacy", "", "legacy"),
])
def test_probe_reports_the_eswitch_mode_the_vfs_are_routed_by(tmp_path: Path, tree_mode: str, compat: str | None,
                                                              expected: str) -> None:
    """One rule for both readers of a PF's eswitch mode: the probe's ``AIF_SRIOV/ESWITCH_MODE`` and
    the mode :func:`vnm.plan.vf_mode` hands a VF to a network plugin by. MLNX_OFED's
    ``compat/devlink/mode`` (the driver's own answer) wins over the ``phys_switch_id`` inference when
    it holds one of the two mode words; the ConnectX-7 tree is the recorded-shape fixture."""
    from fixtures.nics import cx7

    from aifactory_core.vnm.plan import locate_vf, vf_mode

    host = cx7.build(tmp_path / "root", mode=tree_mode)
    if compat is not None:
        mode_file = host.path("/sys/class/net/ens1f0np0/compat/devlink/mode")
        mode_file.parent.mkdir(parents=True)
        mode_file.write_text(compat)
    [row] = collect(Root(str(host.root), str(tmp_path / "state")))["sriov"]
    assert row["ESWITCH_MODE"] == expected.upper()
    assert vf_mode(host, locate_vf(host, "0000:18:00.2")) == expected


def test_eswitch_mode_of_a_pf_without_vfs_is_unknown_unless_the_driver_says(tmp_path: Path) -> None:
    """With no VFs there are no representors to tell the modes apart, and a ``phys_switch_id`` is
    there in both (upstream mlx5, netdevsim): the row says UNKNOWN rather than guess; MLNX_OFED's
    compat file, where present, still answers."""
    from fixtures.nics import cx7

    host = cx7.build(tmp_path / "root", mode="switchdev", vfs=0)
    for name in [entry.name for entry in host.path("/sys/class/net").iterdir()]:
        if name != "ens1f0np0":
            shutil.rmtree(host.path(f"/sys/class/net/{name}"))  # a PF without VFs has no representors
    [row] = collect(Root(str(host.root), str(tmp_path / "state")))["sriov"]
    assert (row["NUM_VFS"], row["ESWITCH_MODE"]) == (0, "UNKNOWN")
    mode_file = host.path("/sys/class/net/ens1f0np0/compat/devlink/mode")
    mode_file.parent.mkdir(parents=True)
    mode_file.write_text("switchdev\n")
    [row] = collect(Root(str(host.root), str(tmp_path / "state")))["sriov"]
    assert row["ESWITCH_MODE"] == "SWITCHDEV"


@pytest.mark.parametrize(("port_name", "expected"), [
    ("pf0vf3", (0, 3)), ("pf1vf12", (1, 12)), ("c1pf0vf1", None), ("pf0", None), ("p0", None),
    ("pf0sf1", None), ("pf0vf", None), ("pfvf1", None), ("pf0vf1x", None), ("pf0vf\u0661", None), ("", None),
])
def test_vf_representor_port_names(port_name: str, expected: tuple[int, int] | None) -> None:
    """Only ``pf<P>vf<V>`` names a local VF's representor (an external controller's ``c1pf0vf1``,
    the uplink, the host-PF representor and sub-functions never do)."""
    from aifactory_core.host.eswitch import vf_port

    assert vf_port(port_name) == expected


def test_two_pfs_of_one_card_share_a_switch_id_but_not_representors(tmp_path: Path) -> None:
    """Both PFs of a dual-port ConnectX carry the card's switch id; each PF's VF representors are
    ``pf<its PCI function>vf<N>``: PF 1's ``pf1vf0`` is not PF 0's VF 0, and PF 1 (whose VFs all
    have representors) is in switchdev mode while its own ``phys_port_name`` is ``p1``."""
    import os

    from fixtures.nics import cx7

    from aifactory_core.host.eswitch import uplink_mode, vf_representors

    host = cx7.build(tmp_path / "root", mode="switchdev", vfs=4)
    pf1 = host.path("/sys/bus/pci/devices/0000:18:00.1")
    pf1.mkdir()
    (pf1 / "sriov_numvfs").write_text("1\n")
    for address, directory in ((cx7.PF, host.path(f"/sys/bus/pci/devices/{cx7.PF}")), ("0000:18:00.1", pf1)):
        (directory / "uevent").write_text(f"DRIVER=mlx5_core\nPCI_SLOT_NAME={address}\n")
    for name, port, device in (("ens1f1np1", "p1", "0000:18:00.1"), ("eth30", "pf1vf0", None)):
        net = host.path(f"/sys/class/net/{name}")
        net.mkdir()
        (net / "phys_port_name").write_text(port + "\n")
        (net / "phys_switch_id").write_text(cx7.SWITCH_ID + "\n")
        if device:
            os.symlink(f"../../../bus/pci/devices/{device}", net / "device")

    def listing(path: str) -> list[str]:
        return sorted(os.listdir(host.path(path)))

    pf0_reps = vf_representors(host.read_text, listing, "ens1f0np0")
    assert {vf: rep[0] for vf, rep in pf0_reps.items()} == {0: "eth10", 1: "eth11", 2: "eth12", 3: "eth13"}
    assert vf_representors(host.read_text, listing, "ens1f1np1") == {0: ("eth30", 1, cx7.SWITCH_ID)}
    assert uplink_mode(host.read_text, listing, "ens1f1np1") == "switchdev"
    shutil.rmtree(host.path("/sys/class/net/eth30"))
    assert uplink_mode(host.read_text, listing, "ens1f1np1") == "legacy"  # PF 0's representors are not its own


def test_error_text_is_one_bounded_line() -> None:
    """An exception becomes a problem attribute's text on one line, at most ``limit`` characters,
    which the template syntax carries as one attribute."""
    text = render.error_text(OSError("first line\n\tsecond   line " + "x" * 500), prefix="gpu: ")
    assert text.startswith("gpu: OSError: first line second line xxx") and len(text) == 300
    assert render.error_text(ValueError("bad"), prefix="error: ", limit=200) == "error: ValueError: bad"
    assert len(parse_template(render.attribute("AIF_PROBE", {"PROBLEMS": text}) + "\n", "probe line")) == 1


def test_a_failing_section_is_one_problem_line(monkeypatch: pytest.MonkeyPatch, dgx_root: Path,
                                               tmp_path: Path) -> None:
    from aifactory_core.probes import readiness

    def broken(*_args: object) -> list[dict[str, object]]:
        raise RuntimeError("iommu\ngroups unreadable")

    monkeypatch.setattr(readiness, "checks", broken)
    snapshot = collect(Root(str(dgx_root), str(_dgx_state(tmp_path))))
    assert snapshot["problems"] == ["readiness: RuntimeError: iommu groups unreadable"]
    assert snapshot["gpus"] and not snapshot["checks"]  # the other sections are still reported


def test_vm_monitor_that_cannot_read_prints_nothing_and_says_why_on_stderr(
        h100_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A defect under the vm/monitor probe leaves its stream empty (valid for monitord) and names
    the cause in one stderr line instead of vanishing."""
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("state directory\nunreadable")

    monkeypatch.setattr(vm_monitor, "collect", broken)
    assert vm_monitor.probe(Root(str(h100_root), str(tmp_path))) == ""
    assert capsys.readouterr().err == "aifactory vm/monitor probe: OSError: state directory unreadable\n"
