"""The ``aifactory`` command as a real process: exit codes, one-line errors, JSON output."""

import json
from pathlib import Path

from hostroots import run_cli


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("aifactory ")


def test_inventory_json_lists_the_h100_from_the_real_capture(h100_root: Path) -> None:
    result = run_cli("--host-root", str(h100_root), "inventory", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    gpus = [device for device in data["devices"] if device["kind"] == "gpu"]
    assert [gpu["address"] for gpu in gpus] == ["0000:00:06.0"]
    gpu = gpus[0]
    assert gpu["ids"] == "10de:2330"
    assert gpu["driver"] == "nvidia"
    assert gpu["reset_method"] == ["flr"]
    assert gpu["numa_node"] is None  # sysfs says -1: no node, as the probe's NUMA_NODE="-"
    assert gpu["placement_node"] == 0  # the host's only node, for the CPU pinning planner
    assert gpu["plugin"] == "nvidia_gpu"
    assert data["numa_nodes"][0]["cpus"] == "0-15"


def test_inventory_and_probe_agree_on_the_gpu_numa_node(h100_root: Path, tmp_path: Path) -> None:
    """sysfs's numa_node -1 is the kernel's NUMA_NO_NODE: both commands say no node ("-")."""
    from aifactory_core.one.template import parse_template, template_to_dict

    inventory = run_cli("--host-root", str(h100_root), "inventory")
    assert inventory.returncode == 0, inventory.stderr
    [row] = [line.split() for line in inventory.stdout.splitlines() if line.startswith("0000:00:06.0 ")]
    header = next(line.split() for line in inventory.stdout.splitlines() if line.startswith("ADDRESS "))
    probe = run_cli("--host-root", str(h100_root), "probe", "host-system",
                    env={"AIFACTORY_STATE_DIR": str(tmp_path)})
    assert probe.returncode == 0, probe.stderr
    [gpu] = template_to_dict(parse_template(probe.stdout))["AIF_GPU"]
    assert gpu["NUMA_NODE"] == "-"
    assert row[header.index("NODE") - len(header)] == gpu["NUMA_NODE"]


def test_bundled_sample_is_the_same_capture(h100_root: Path) -> None:
    """The packaged sample (tests/fixtures/hosts/README.md) is byte for byte the fixture capture."""
    from hostroots import H100_CAPTURE, REPO

    samples = REPO / "aifactory_core" / "samples"
    assert (samples / "h100-sxm5-vm.tar.gz").read_bytes() == (H100_CAPTURE / "sysfs.tar.gz").read_bytes()
    assert (samples / "h100-sxm5-vm.nvml.json").read_bytes() == (H100_CAPTURE / "nvml.json").read_bytes()
    sample = json.loads(run_cli("--host-root", "sample:h100-sxm5-vm", "inventory", "--json").stdout)
    direct = json.loads(run_cli("--host-root", str(h100_root), "inventory", "--json").stdout)
    assert sample["devices"] == direct["devices"]


def test_host_root_from_environment(h100_root: Path) -> None:
    result = run_cli("inventory", "--json", env={"AIFACTORY_HOST_ROOT": str(h100_root)})
    assert result.returncode == 0
    assert json.loads(result.stdout)["host_root"] == str(h100_root)


def test_plugins_lists_builtins_and_the_example_vendor_plugin() -> None:
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = {plugin["name"]: plugin for plugin in json.loads(result.stdout)}
    assert {"vfio", "nvidia_gpu", "pci_inventory", "numa"} <= plugins.keys()
    assert "example_accel" in plugins, "install it: pip install --no-deps ./plugins/examples/aifactory-example-accel"
    assert plugins["example_accel"]["distribution"] == "aifactory-example-accel"
    assert "aifactory_discover_devices" in plugins["example_accel"]["hooks"]
    assert plugins["nvidia_gpu"]["module"] == "aifactory_plugins.nvidia_gpu"


def test_doctor_on_this_machine_fails_with_fixes_and_no_traceback() -> None:
    # This CI-class machine has no IOMMU and no GPU: doctor must say so, with fixes, and exit 1.
    result = run_cli("doctor")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("FAIL  iommu-") for line in lines)
    assert any(line.strip().startswith("fix: ") for line in lines)


def test_doctor_json(h100_root: Path) -> None:
    result = run_cli("--host-root", str(h100_root), "doctor", "--json")
    data = json.loads(result.stdout)
    assert result.returncode == 1 and data["ok"] is False
    by_name = {check["name"]: check for check in data["checks"]}
    assert by_name["nvidia-driver"]["status"] == "PASS"
    assert by_name["iommu-kernel"]["status"] == "FAIL"


def test_missing_host_root_is_a_usage_error() -> None:
    result = run_cli("--host-root", "/nonexistent/aifactory", "inventory")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not a directory" in result.stderr


def test_unknown_command_and_option_are_usage_errors() -> None:
    for args in (("frobnicate",), ("inventory", "--bogus"), ()):
        result = run_cli(*args)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "aifactory.conf"
    config.write_text('[host]\nreserved_cpus = "0-1"\nreserverd = 1\n')
    result = run_cli("--config", str(config), "plugins")
    assert result.returncode == 2
    assert "host.reserverd" in result.stderr and result.stderr.count("\n") == 1


def test_doctor_on_the_dgx_shaped_host_reports_group_isolation_per_gpu(dgx_root: Path) -> None:
    result = run_cli("--host-root", str(dgx_root), "doctor", "--json")
    assert "Traceback" not in result.stderr
    data = json.loads(result.stdout)
    inventory = json.loads(run_cli("--host-root", str(dgx_root), "inventory", "--json").stdout)
    gpus = sorted(device["address"] for device in inventory["devices"] if device["kind"] == "gpu")
    assert len(gpus) == 8
    isolation = {check["subject"]: check for check in data["checks"] if check["name"] == "iommu-group"}
    for gpu in gpus:
        assert isolation[gpu]["status"] == "PASS", isolation[gpu]
    assert {check["name"] for check in data["checks"]} >= {"iommu-firmware", "iommu-kernel", "vfio-modules"}


def test_inventory_places_gpus_on_their_nodes(dgx_root: Path, dgx_nps4_root: Path) -> None:
    for root, expected in ((dgx_root, [0, 0, 0, 0, 1, 1, 1, 1]), (dgx_nps4_root, [0, 0, 1, 1, 2, 2, 3, 3])):
        data = json.loads(run_cli("--host-root", str(root), "inventory", "--json").stdout)
        gpus = sorted((device for device in data["devices"] if device["kind"] == "gpu"), key=lambda d: d["address"])
        assert [gpu["numa_node"] for gpu in gpus] == expected
        assert len(data["numa_nodes"]) == max(expected) + 1


def test_vendor_plugin_claims_its_device_and_reports_its_health(h100_root: Path, tmp_path: Path) -> None:
    """The real H100 capture plus one processing accelerator (class 0x12, vendor 1da3) cloned from the
    GPU's sysfs entry: the example vendor plugin claims it and its health hook reports the link."""
    import shutil

    root = tmp_path / "host"
    shutil.copytree(h100_root, root, symlinks=True)
    source = root / "sys/devices/pci0000:00/0000:00:06.0"
    clone = root / "sys/devices/pci0000:00/0000:00:07.0"
    shutil.copytree(source, clone, symlinks=True)
    (clone / "driver").unlink()
    (clone / "vendor").write_text("0x1da3\n")
    (clone / "device").write_text("0x1020\n")
    (clone / "class").write_text("0x120000\n")
    (clone / "current_link_width").write_text("8\n")
    (root / "sys/bus/pci/devices/0000:00:07.0").symlink_to("../../../devices/pci0000:00/0000:00:07.0")
    data = json.loads(run_cli("--host-root", str(root), "inventory", "--json").stdout)
    accelerator = next(device for device in data["devices"] if device["address"] == "0000:00:07.0")
    assert (accelerator["kind"], accelerator["plugin"]) == ("accelerator", "example_accel")
    assert accelerator["health"] == [{"name": "EXAMPLE_ACCEL", "value": {
        "ADDRESS": "0000:00:07.0", "LINK_WIDTH": "8", "HEALTH": "DEGRADED"}}]
    gpu = next(device for device in data["devices"] if device["address"] == "0000:00:06.0")
    [reading] = gpu["health"]  # the built-in nvidia_gpu plugin's host-side verdict
    assert reading["name"] == "NVIDIA_GPU"
    assert (reading["value"]["HEALTH"], reading["value"]["HEALTH_SOURCE"]) == ("OK", "HOST_SIDE")
    assert (reading["value"]["LINK_WIDTH"], reading["value"]["CONFIG_SPACE"]) == ("16", "READABLE")
