"""Probe plugins (``aifactory.probes`` entry points, ``aifactory_probe_devices``): found without
``importlib.metadata`` and the same as it finds, the cache kept only while ``sys.path`` is unchanged
and only when it is the running user's own; the example vendor plugin's accelerator in the host
template (``AIF_DEVICE``) and in ``metrics``; a broken plugin costs only its own devices; the
Prometheus labels of a device a VM holds (vm_id and tenant from the ownership records and the
domain metadata)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostroots import REPO, h100_root, run_cli  # noqa: F401

from aifactory_core.one.template import parse_template, parse_vm_monitor, template_to_dict
from aifactory_core.probes import plugins, prometheus
from aifactory_core.probes.api import Metric, ProbeDevice
from aifactory_core.probes.collect import collect
from aifactory_core.probes.sysfs import Root

ACCELERATOR = "0000:00:07.0"
PROBE = REPO / "drivers/im/kvm-probes.d/host/system/aifactory-gpu"


def _example_installed() -> bool:
    return any(point.name == "example_accel" for point in importlib.metadata.entry_points(group=plugins.GROUP))


needs_example = pytest.mark.skipif(
    not _example_installed() and os.environ.get("CI") != "true",
    reason="the example vendor plugin is not installed "
           "(pip install --no-deps ./plugins/examples/aifactory-example-accel)")


@pytest.fixture
def accel_root(h100_root: Path, tmp_path: Path) -> Path:  # noqa: F811
    """The real H100 capture plus a processing accelerator (class 0x12, vendor 1da3) cloned from the
    GPU's sysfs entry, trained at x8 of x16."""
    root = tmp_path / "host"
    shutil.copytree(h100_root, root, symlinks=True)
    source = root / "sys/devices/pci0000:00/0000:00:06.0"
    clone = root / "sys/devices/pci0000:00/0000:00:07.0"
    shutil.copytree(source, clone, symlinks=True)
    (clone / "driver").unlink()
    for name, value in (("vendor", "0x1da3"), ("device", "0x1020"), ("class", "0x120000"),
                        ("current_link_width", "8"), ("max_link_width", "16")):
        (clone / name).write_text(value + "\n")
    (clone / "uevent").write_text(f"PCI_CLASS=120000\nPCI_ID=1DA3:1020\nPCI_SLOT_NAME={ACCELERATOR}\n")
    (root / f"sys/bus/pci/devices/{ACCELERATOR}").symlink_to(f"../../../devices/pci0000:00/{ACCELERATOR}")
    return root


def _dist(site: Path, name: str, entry_points: str) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def fake_site(tmp_path: Path) -> Iterator[Path]:
    """A directory on ``sys.path`` for distributions made by the test."""
    site = tmp_path / "site"
    site.mkdir()
    sys.path.insert(0, str(site))
    yield site
    sys.path.remove(str(site))
    for module in [name for name in sys.modules if name.startswith("vendor_probe_")]:
        del sys.modules[module]


def test_scan_agrees_with_importlib_metadata() -> None:
    expected = sorted((point.name, point.value.split(":")[0])
                      for point in importlib.metadata.entry_points(group=plugins.GROUP))
    assert plugins.scan(plugins._path_dirs()) == expected


def test_entry_points_parsing(fake_site: Path) -> None:
    _dist(fake_site, "vendor_a", "[aifactory.plugins]\nx = vendor_a.plugin\n\n[aifactory.probes]\n"
                                 "# comment\na = vendor_a.probe\nb = vendor_a.probe:thing [extra]\n"
                                 "bad = vendor_a/../../etc\nevil = os; rm -rf\n")
    later = fake_site.parent / "later-site"
    _dist(later, "Vendor_A", "[aifactory.probes]\nshadowed = other.module\n")  # the same distribution, later
    assert plugins.scan([str(fake_site), str(later)]) == [("a", "vendor_a.probe"), ("b", "vendor_a.probe")]


def test_cache_follows_sys_path_and_trusts_only_its_owner(fake_site: Path, tmp_path: Path) -> None:
    root = Root("/", str(tmp_path / "state"))
    before = plugins.discover(root)
    cache = Path(root.state_dir) / "probes" / f"plugins-{os.geteuid()}.tsv"
    assert cache.is_file() and oct(cache.stat().st_mode & 0o777) == "0o644"
    assert plugins.discover(root) == before
    _dist(fake_site, "vendor_probe_new", "[aifactory.probes]\nnewcomer = vendor_probe_new.probe\n")
    assert ("newcomer", "vendor_probe_new.probe") in plugins.discover(root)  # a new dist-info: rescanned
    # a cache with the right key but another answer is believed only while it is the user's own and
    # writable by no one else
    lines = [line for line in cache.read_text().splitlines() if line.startswith("K\t")]
    cache.write_text("\n".join([*lines, "P\tplanted\tplanted_module"]) + "\n")
    cache.chmod(0o644)
    assert plugins.discover(root) == [("planted", "planted_module")]
    cache.write_text("\n".join([*lines, "P\tplanted\tplanted_module"]) + "\n")
    cache.chmod(0o666)
    assert ("planted", "planted_module") not in plugins.discover(root)
    cache.write_text("\n".join([*lines, "P\tplanted\tnot a module;"]) + "\n")
    cache.chmod(0o644)
    assert ("planted", "not a module;") not in plugins.discover(root)


def test_broken_plugins_are_problems_and_the_rest_is_reported(fake_site: Path, accel_root: Path,
                                                               tmp_path: Path) -> None:
    package = fake_site / "vendor_probe_bad"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "raises.py").write_text("AIFACTORY_PROBE_API = 1\n"
                                       "def aifactory_probe_devices(root):\n    raise RuntimeError('sensor\\nlost')\n")
    (package / "newer.py").write_text("AIFACTORY_PROBE_API = 2\ndef aifactory_probe_devices(root):\n    return []\n")
    (package / "wrong.py").write_text("AIFACTORY_PROBE_API = 1\ndef aifactory_probe_devices(root):\n"
                                      "    return [{'address': '0000:00:07.0'}]\n")
    _dist(fake_site, "vendor_probe_bad", "[aifactory.probes]\nraises = vendor_probe_bad.raises\n"
                                         "newer = vendor_probe_bad.newer\nwrong = vendor_probe_bad.wrong\n"
                                         "missing = vendor_probe_bad.nothing\n")
    snapshot = collect(Root(str(accel_root), str(tmp_path / "state")))
    problems = "\n".join(snapshot["problems"])
    assert "plugin raises: RuntimeError: sensor lost" in problems
    assert "plugin newer: AIFACTORY_PROBE_API 2 is not one this core provides (1..1)" in problems
    assert "plugin wrong: dict is not a ProbeDevice" in problems
    assert "plugin missing: ModuleNotFoundError" in problems
    assert len(snapshot["gpus"]) == 1 and snapshot["checks"]  # the probe's own sections still there
    assert "raises" not in snapshot["probe_plugins"]


def test_one_probe_run_reads_each_function_and_the_quarantine_once(fake_site: Path, accel_root: Path,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The PCI device directory, the quarantine directory and each function's identity files
    (``uevent``, ``numa_node``, ``sriov_totalvfs``) are read once per run, however many sections and
    plugins ask (a plugin walking the functions with ``pci_functions``/``pci_ids`` as the API offers)."""
    from aifactory_core.probes import host_system

    package = fake_site / "vendor_probe_walk"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "probe.py").write_text(
        "from aifactory_core.probes.api import ProbeDevice\n"
        "from aifactory_core.probes.sysfs import pci_functions, pci_ids\n"
        "AIFACTORY_PROBE_API = 1\n"
        "def aifactory_probe_devices(root):\n"
        "    return [ProbeDevice(address, 'accelerator') for address in pci_functions(root)\n"
        "            if pci_ids(root, address)[0] == 0x1DA3]\n")
    _dist(fake_site, "vendor_probe_walk", "[aifactory.probes]\na_walk = vendor_probe_walk.probe\n")
    state = tmp_path / "state"
    (state / "quarantine").mkdir(parents=True)
    (state / "quarantine" / ACCELERATOR).write_text("reset failed\n")
    # named to run first: where the example plugin is installed it walks the functions too (and its
    # claim on the accelerator is refused), one more caller that must not read them again
    listed: list[str] = []
    opened: list[str] = []
    real_listdir, real_open = os.listdir, os.open

    def listdir(path: str) -> list[str]:
        listed.append(str(path))
        return real_listdir(path)

    def open_(path: str, *args: int) -> int:
        opened.append(str(path))
        return real_open(path, *args)

    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "open", open_)
    output = host_system.probe(Root(str(accel_root), str(state)))
    monkeypatch.undo()
    attributes = template_to_dict(parse_template(output))
    [device] = [row for row in attributes["AIF_DEVICE"] if row["PLUGIN"] == "a_walk"]
    assert (device["BUS_ID"], device["VENDOR"], device["HEALTH"]) == (ACCELERATOR, "1da3", "FAILED")
    assert device["HEALTH_REASON"] == "quarantined: reset failed"
    devices = str(accel_root / "sys/bus/pci/devices")
    assert listed.count(devices) == 1
    assert listed.count(str(state / "quarantine")) == 1
    functions = [name for name in real_listdir(devices) if name.count(":") == 2]
    assert ACCELERATOR in functions and len(functions) > 2
    for name in ("uevent", "numa_node", "sriov_totalvfs"):
        counts = {address: opened.count(f"{devices}/{address}/{name}") for address in functions}
        assert max(counts.values()) == 1, (name, counts)


def test_probe_device_and_metric_refuse_bad_values() -> None:
    for bad in (lambda: ProbeDevice("0000:00:07.0 ", "accelerator"), lambda: ProbeDevice("0000:00:07.0", "Acc"),
                lambda: ProbeDevice("0000:00:07.0", "accelerator", health="BROKEN"),
                lambda: ProbeDevice("0000:00:07.0", "accelerator", attributes={"HEALTH": "OK"}),
                lambda: ProbeDevice("0000:00:07.0", "accelerator", attributes={"bad key": 1}),
                lambda: Metric("errors", 1, kind="counter"), lambda: Metric("gpu_power_watts", 1),
                lambda: Metric("Temp", 1), lambda: Metric("temp_celsius", "hot"),  # type: ignore[arg-type]
                lambda: Metric("temp_celsius", 1, labels={"bus_id": "x"})):
        with pytest.raises(ValueError):
            bad()


@needs_example
def test_example_plugin_in_the_installed_probe_and_in_metrics(accel_root: Path, tmp_path: Path) -> None:
    """The probe executables as install.sh installs them: this environment's python with -S, the
    probe adding the environment's site-packages (where the example plugin is) itself."""
    state = tmp_path / "state"
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIFACTORY_")}
    env.update({"AIFACTORY_HOST_ROOT": str(accel_root), "AIFACTORY_STATE_DIR": str(state)})
    result = subprocess.run([sys.executable, "-S", str(PROBE), "kvm", "0", "host"], env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, check=True)
    attributes = template_to_dict(parse_template(result.stdout))
    [device] = attributes["AIF_DEVICE"]
    assert device == {
        "PLUGIN": "example_accel", "KIND": "accelerator", "ADDRESS": "0000:00:07:0", "SHORT_ADDRESS": "00:07.0",
        "BUS_ID": ACCELERATOR, "VENDOR": "1da3", "DEVICE": "1020", "CLASS": "1200", "NUMA_NODE": "-",
        "IOMMU_GROUP": "", "DRIVER": "", "STATE": "HOST", "VM_ID": "", "MODEL": "example accelerator 1020",
        "HEALTH": "DEGRADED", "HEALTH_REASON": "PCIe link x8, expected x16", "LINK_WIDTH": "8", "LINK_WIDTH_MAX": "16"}
    assert attributes["AIF_DEVICE_COUNT"] == ["1"] and "example_accel" in attributes["AIF_PROBE_PLUGINS"][0]
    assert attributes["AIF_PROBE"][0]["STATUS"] == "OK"
    (state / "owners").mkdir(parents=True)
    (state / "owners" / ACCELERATOR).write_text("7\n")
    (state / "tenancy").mkdir()
    (state / "tenancy" / "7.json").write_text(json.dumps({"vm": 7, "gid": 101, "gname": "tenant-b"}))
    vm_probe = REPO / "drivers/im/kvm-probes.d/vm/monitor/aifactory-gpu"
    monitored = subprocess.run([sys.executable, "-S", str(vm_probe), "kvm", "0", "host"], env=env,
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True)
    [record] = parse_vm_monitor(monitored.stdout)
    monitor = dict(record.monitor)
    assert (record.vm_id, monitor["AIF_PCI_DEVICES"], monitor["AIF_VF_COUNT"]) == (7, ACCELERATOR, "0")
    assert (monitor["AIF_DEVICE_COUNT"], monitor["AIF_DEVICE_HEALTH"]) == ("1", "DEGRADED")
    assert monitor["AIF_DEVICE_HEALTH_REASON"] == f"{ACCELERATOR}: PCIe link x8, expected x16"
    metrics = run_cli("--host-root", str(accel_root), "metrics", env={"AIFACTORY_STATE_DIR": str(state)})
    assert metrics.returncode == 0, metrics.stderr
    labels = (f'bus_id="{ACCELERATOR}",plugin="example_accel",kind="accelerator",model="example accelerator 1020",'
              'vm_id="7",tenant="tenant-b"')
    for line in (f"aifactory_device_health{{{labels}}} 1",
                 f'aifactory_device_health_state{{{labels},state="DEGRADED"}} 1',
                 f'aifactory_device_health_state{{{labels},state="OK"}} 0', f"aifactory_device_assigned{{{labels}}} 1",
                 f"aifactory_accelerator_pcie_link_width_lanes{{{labels}}} 8",
                 "# TYPE aifactory_accelerator_pcie_link_width_lanes gauge"):
        assert line in metrics.stdout.splitlines()


def test_vm_and_tenant_labels_from_the_domain_metadata(h100_root: Path, tmp_path: Path) -> None:  # noqa: F811
    """No tenancy record: the tenant comes from the newest deployment file's ``<one:vm>`` (then from
    vm.xml); a free GPU carries neither label."""
    from aifactory_core.probes.owners import tenants

    root = tmp_path / "host"
    shutil.copytree(h100_root, root, symlinks=True)
    state = tmp_path / "state"
    (state / "owners").mkdir(parents=True)
    (state / "owners" / "0000:00:06.0").write_text("42\n")
    vm_dir = root / "var/lib/one/datastores/0/42"
    vm_dir.mkdir(parents=True)
    deployment = (REPO / "tests/fixtures/opennebula/samples/synthesized/deployment.0.xml").read_text()
    assert "<one:gname>" in deployment
    (vm_dir / "deployment.0").write_text(deployment.replace("<one:gname>", "<one:gname>old-", 1))
    (vm_dir / "deployment.1").write_text(deployment.replace("<one:gname>", "<one:gname>new-", 1))
    probe_root = Root(str(root), str(state))
    snapshot = collect(probe_root, plugins=False)
    found = tenants(probe_root, snapshot["held"].values())
    assert found[42].startswith("new-")
    text = prometheus.exposition(snapshot, found)
    assert f'aifactory_gpu_health{{bus_id="0000:00:06.0",uuid="",model="",vm_id="42",tenant="{found[42]}"}} 0' in text
    (vm_dir / "deployment.0").unlink()
    (vm_dir / "deployment.1").unlink()
    document = (REPO / "tests/fixtures/opennebula/samples/synthesized/vm_gpu_pinned.xml").read_text()
    (vm_dir / "vm.xml").write_text(document)
    assert tenants(probe_root, [42]) == {42: "tenant-a"}
    (vm_dir / "vm.xml").write_text("<VM><ID>42</ID><GNAME>x</GNAME")  # unreadable: no label, no failure
    assert tenants(probe_root, [42]) == {42: ""}
    (state / "owners" / "0000:00:06.0").unlink()
    free = prometheus.exposition(collect(probe_root, plugins=False))
    assert 'aifactory_gpu_health{bus_id="0000:00:06.0",uuid="",model=""} 0' in free
    assert "vm_id" not in free and "tenant" not in free
