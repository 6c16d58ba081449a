"""A vendor plugin's device through a real oned: the example plugin's accelerator in the host
template, in oned's PCI list and in ``aifactory metrics`` on the host — and in none of them before
the plugin is installed.

The host is this machine as a ``qemu``-type host over SSH (``qemunode``) whose probes read a host
root the generator writes from ``tests/fixtures/topologies/accel-node.json``: an H100 on vfio-pci,
a Habana Gaudi2 processing accelerator (class 0x12, vendor 1da3) trained at x8 of x16, and the
host's NVMe; no NVML. First with the session's install (no vendor plugin): oned sees the H100 and
nothing of the accelerator. Then ``install.sh --with-example-plugin --sync``, as an operator adds
the plugin: both environments are rebuilt with it, ``onehost sync`` carries the hosts' one to the
node, and the next monitoring cycle reports the accelerator (``AIF_DEVICE``, the plugin's own
attributes, ``PCI``). ``aifactory metrics`` runs on the node as oneadmin, in the node's
environment, as the probes do. The module leaves the session's install as it found it (rebuilt
without the plugin and synced before its host goes).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostroots import generate_host
from qemunode import host_xml, onehost_show_section, pci_share, qemu_node, remove_host, wait_for
from realone import SYSTEM_PROBES_PERIOD, Installed, RealOne, note

pytestmark = pytest.mark.realone
NODE = "aifactory-accel-node"
GPU = "0000:01:00:0"  # oned's spelling of the topology's H100 (0000:01:00.0)
ACCELERATOR = "0000:02:00:0"  # its Gaudi2 (0000:02:00.0)
HOST_CLI = "/var/tmp/one/aifactory/venv/bin/aifactory"  # the hosts' environment, where onehost sync puts it
MONITOR_TIMEOUT = 300 + 3 * SYSTEM_PROBES_PERIOD
PLUGIN_METRICS = ("aifactory_device_health", "aifactory_device_health_state", "aifactory_device_assigned",
                  "aifactory_accelerator_pcie_link_width_lanes", "aifactory_accelerator_pcie_link_width_max_lanes")


@pytest.fixture(scope="module")
def node(real_one: RealOne, suite_installed: Installed) -> Iterator[Path]:
    """``aifactory-accel-node`` (:func:`qemunode.qemu_node`), whose SSH sessions read the generated
    accelerator host as their host root (its state directory inside it, oneadmin's)."""
    import subprocess

    top = real_one.top / "accel-node-data"
    top.mkdir()
    host_root = generate_host("accel-node", top / "host-root")
    subprocess.run(["chown", "-R", "oneadmin:oneadmin", str(top)], check=True)
    with qemu_node(real_one, NODE, {"AIFACTORY_HOST_ROOT": str(host_root)}):
        yield host_root


@pytest.fixture(scope="module")
def accel_host(real_one: RealOne, suite_installed: Installed, node: Path) -> Iterator[int]:
    """The node as a qemu host, monitored with the session's install (no vendor plugin). Afterwards
    the install is put back without the plugin and synced to the node while it is still a host
    (``onehost sync`` deletes what the remotes no longer hold), then the host is deleted."""
    synced = suite_installed.install_sh("--sync")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    t0 = time.monotonic()
    host = int(real_one.client().host.allocate(NODE, "qemu", "dummy", -1))
    try:
        wait_for(lambda: _reported(real_one, host) and GPU in pci_share(real_one, host),
                 f"{NODE} monitored with {GPU} in its PCI share", MONITOR_TIMEOUT,
                 lambda: real_one.log_tail("monitor.log"))
        note(f"vendor plugin: {NODE} created -> monitored, its GPU in oned's PCI share after "
             f"{time.monotonic() - t0:.0f} s")
        yield host
    finally:
        try:
            restored = suite_installed.install_sh("--sync")
            assert restored.returncode == 0, restored.stdout + restored.stderr
        finally:
            remove_host(real_one, host)


def _reported(one: RealOne, host: int) -> bool:
    """The host is MONITORED and the suite's probe has reported (its AIF_DEVICE_COUNT line)."""
    document = host_xml(one, host)
    if document.findtext("STATE") == "3":
        raise AssertionError(f"{NODE} in ERROR: {document.findtext('TEMPLATE/ERROR')}\n" + one.log_tail("monitor.log"))
    return document.findtext("STATE") == "2" and bool(document.findtext("TEMPLATE/AIF_DEVICE_COUNT"))


def _plugin_devices(one: RealOne, host: int) -> list[dict[str, str]]:
    """The host template's ``AIF_DEVICE`` vectors that name a plugin (one per vendor device)."""
    return [{child.tag: child.text or "" for child in vector}
            for vector in host_xml(one, host).iterfind("TEMPLATE/AIF_DEVICE") if vector.find("PLUGIN") is not None]


def _metrics(one: RealOne) -> list[str]:
    """``aifactory metrics`` on the node, as oneadmin in the hosts' environment (the probes' user
    and interpreter; the node's sshd sets the host root)."""
    done = one.run("ssh", NODE, HOST_CLI, "metrics", check=False, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "aifactory_probe_problems 0" in done.stdout.splitlines(), done.stdout
    return done.stdout.splitlines()


def _onehost_show(one: RealOne) -> list[str]:
    return one.run("onehost", "show", NODE).stdout.splitlines()


def _vector(lines: list[str], name: str) -> list[str]:
    """``onehost show``'s lines of the template vector ``name`` (``NAME=[`` ... `` ]``)."""
    begin = next((i for i, line in enumerate(lines) if line.startswith(f"{name}=[")), None)
    if begin is None:
        return []
    end = next((i for i in range(begin, len(lines)) if lines[i].endswith(" ]")), len(lines) - 1)
    return lines[begin:end + 1]


def test_example_plugin_device_reaches_the_host_template_pci_list_and_metrics(
        real_one: RealOne, suite_installed: Installed, accel_host: int) -> None:
    host = accel_host
    # 1. Without the plugin: the accelerator is in the host's tree, but nowhere in what oned or
    # Prometheus is told.
    document = host_xml(real_one, host)
    assert document.findtext("TEMPLATE/AIF_PROBE/STATUS") == "OK"
    assert (document.findtext("TEMPLATE/AIF_PROBE_PLUGINS") or "") == ""  # no plugin answered
    assert document.findtext("TEMPLATE/AIF_DEVICE_COUNT") == "0"
    assert _plugin_devices(real_one, host) == []
    assert pci_share(real_one, host) == {GPU: -1}
    assert document.findtext("TEMPLATE/AIF_PCI_OFFERED") == "0000:01:00.0"
    before = _metrics(real_one)
    assert any(line.startswith('aifactory_gpu_health{bus_id="0000:01:00.0"') for line in before), before
    assert not [line for line in before if line.startswith(PLUGIN_METRICS)]

    # 2. The operator installs the example plugin and syncs the hosts.
    t0 = time.monotonic()
    installed = suite_installed.install_sh("--with-example-plugin", "--sync")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    pip_lines = [line for line in installed.stdout.splitlines() if "plugins/examples/aifactory-example-accel" in line]
    assert len(pip_lines) == 2, installed.stdout  # both environments rebuilt with it
    note(f"vendor plugin: install.sh --with-example-plugin --sync took {time.monotonic() - t0:.0f} s")
    t0 = time.monotonic()
    wait_for(lambda: _plugin_devices(real_one, host), "the plugin's AIF_DEVICE in the host template",
             MONITOR_TIMEOUT, lambda: real_one.log_tail("monitor.log"))
    note(f"vendor plugin: synced -> AIF_DEVICE in the host template after {time.monotonic() - t0:.0f} s")

    # 3. The host template: the device with what the probe adds and the plugin's own attributes.
    [device] = _plugin_devices(real_one, host)
    assert device == {
        "PLUGIN": "example_accel", "KIND": "accelerator", "ADDRESS": ACCELERATOR, "SHORT_ADDRESS": "02:00.0",
        "BUS_ID": "0000:02:00.0", "VENDOR": "1da3", "DEVICE": "1020", "CLASS": "1200", "NUMA_NODE": "0",
        "IOMMU_GROUP": device["IOMMU_GROUP"], "DRIVER": "habanalabs", "STATE": "HOST", "VM_ID": "",
        "MODEL": "example accelerator 1020", "HEALTH": "DEGRADED", "HEALTH_REASON": "PCIe link x8, expected x16",
        "LINK_WIDTH": "8", "LINK_WIDTH_MAX": "16"}, device
    assert device["IOMMU_GROUP"].isdigit()
    document = host_xml(real_one, host)
    assert (document.findtext("TEMPLATE/AIF_PROBE_PLUGINS"), document.findtext("TEMPLATE/AIF_DEVICE_COUNT"),
            document.findtext("TEMPLATE/AIF_PROBE/STATUS")) == ("example_accel", "1", "OK")

    # 4. oned's PCI list: a DEGRADED accelerator is still offered (only FAILED is withheld), so oned
    # may give it to a VM; the host's NVMe never appears.
    wait_for(lambda: pci_share(real_one, host) == {GPU: -1, ACCELERATOR: -1}, f"{ACCELERATOR} in the PCI share",
             3 * SYSTEM_PROBES_PERIOD, lambda: str(pci_share(real_one, host)))
    assert host_xml(real_one, host).findtext("TEMPLATE/AIF_PCI_OFFERED") == "0000:01:00.0,0000:02:00.0"
    shown = _onehost_show(real_one)
    template_lines = _vector(shown, "AIF_DEVICE")
    pci_lines = onehost_show_section(shown, "PCI DEVICES")
    assert 'PLUGIN="example_accel"' in "\n".join(template_lines), "\n".join(shown)
    assert any("02:00.0" in line and "1da3:1020:1200" in line for line in pci_lines), "\n".join(pci_lines)
    note("vendor plugin: onehost show (template):\n" + "\n".join(template_lines))
    note("vendor plugin: onehost show (PCI DEVICES):\n" + "\n".join(pci_lines))

    # 5. aifactory metrics on the node: the plugin's device and its own metric families.
    after = _metrics(real_one)
    labels = 'bus_id="0000:02:00.0",plugin="example_accel",kind="accelerator",model="example accelerator 1020"'
    expected = [f"aifactory_device_health{{{labels}}} 1",
                f'aifactory_device_health_state{{{labels},state="DEGRADED"}} 1',
                f"aifactory_device_assigned{{{labels}}} 0",
                f"aifactory_accelerator_pcie_link_width_lanes{{{labels}}} 8",
                f"aifactory_accelerator_pcie_link_width_max_lanes{{{labels}}} 16",
                "# TYPE aifactory_accelerator_pcie_link_width_lanes gauge"]
    missing = [line for line in expected if line not in after]
    assert not missing, f"missing {missing} in:\n" + "\n".join(after)
    note("vendor plugin: aifactory metrics on the node:\n"
         + "\n".join(line for line in after if line.startswith(PLUGIN_METRICS) or "accelerator_pcie" in line))
