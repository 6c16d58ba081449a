"""The suite's IM probes through oned's real monitoring: a ``qemu``-type host over SSH.

The host is this machine, reached by oned's own drivers over SSH at ``aifactory-node`` (a private
``sshd`` on 127.0.0.1, oneadmin's key only). ``install.sh --sync`` puts the suite into the
session's remotes and runs the real ``onehost sync``; oned's ``one_im_ssh`` copies the remotes to
``/var/tmp/one`` and starts ``monitord-client``, which runs every host/system probe and sends the
result to monitord. The probes read the bundled H100 capture as their host root, with its NVML
recording (the node's sshd sets ``AIFACTORY_HOST_ROOT`` and ``AIFACTORY_NVML_REPLAY`` for the
session): the flow from probe to oned's host template is what is under test.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemunode import qemu_node, remove_host
from realone import REPO, SYSTEM_PROBES_PERIOD, Installed, RealOne, note

from aifactory_core.samples import extract_sample

pytestmark = pytest.mark.realone
NODE = "aifactory-node"
SAMPLES = REPO / "aifactory_core" / "samples"


@pytest.fixture(scope="module")
def node(real_one: RealOne, suite_installed: Installed) -> Iterator[Path]:
    """``aifactory-node`` (:func:`qemunode.qemu_node`), whose SSH sessions read a copy of the
    bundled capture (oneadmin can read it; the suite's sample cache is root's) as their host root,
    with its NVML recording. The host the test registers is deleted afterwards."""
    top = real_one.top / "node-data"
    top.mkdir()
    host_root = top / "host-root"
    shutil.copytree(extract_sample("h100-sxm5-vm"), host_root, symlinks=True)
    replay = top / "nvml.json"
    shutil.copy(SAMPLES / "h100-sxm5-vm.nvml.json", replay)
    subprocess.run(["chown", "-R", "oneadmin:oneadmin", str(top)], check=True)
    env = {"AIFACTORY_HOST_ROOT": str(host_root), "AIFACTORY_NVML_REPLAY": str(replay)}
    with qemu_node(real_one, NODE, env):
        try:
            yield host_root
        finally:
            for host in real_one.client().hostpool.info().HOST:
                if host.NAME == NODE:
                    remove_host(real_one, int(host.ID))


def _host_template(one: RealOne, host: int) -> dict[str, str]:
    import xmlrpc.client

    from lxml import etree

    ok, answer, *_ = xmlrpc.client.ServerProxy(one.endpoint).one.host.info(f"oneadmin:{one.password}", host, False)
    assert ok, answer
    root = etree.fromstring(answer.encode())
    values = {child.tag: (child.text or "") for child in root.find("TEMPLATE") if len(child) == 0}
    values["STATE"] = root.findtext("STATE") or ""
    for vector in root.find("TEMPLATE"):
        for child in vector:
            values.setdefault(f"{vector.tag}/{child.tag}", child.text or "")
    return values


def test_host_probes_reach_the_host_template_through_real_monitoring(
        real_one: RealOne, suite_installed: Installed, node: Path) -> None:
    synced = suite_installed.install_sh("--sync")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    probe_dir = real_one.location / "var" / "remotes" / "im" / "qemu-probes.d" / "host" / "system"
    assert (probe_dir / "aifactory-gpu").is_file()

    client = real_one.client()
    t0 = time.monotonic()
    host = client.host.allocate(NODE, "qemu", "qemu", -1)
    deadline = t0 + 300 + 2 * SYSTEM_PROBES_PERIOD
    template: dict[str, str] = {}
    while time.monotonic() < deadline:
        template = _host_template(real_one, host)
        if template["STATE"] == "3":  # ERROR
            raise AssertionError(f"host {NODE} in ERROR: {template.get('ERROR', '')}\n"
                                 + real_one.log_tail("monitor.log"))
        if "AIF_GPU_COUNT" in template:
            break
        time.sleep(2)
    else:
        raise AssertionError(f"no AIF_GPU in {NODE}'s template after {time.monotonic() - t0:.0f} s: "
                             f"{sorted(template)}\n{real_one.log_tail('monitor.log')}")
    assert template["STATE"] == "2"  # MONITORED
    assert (template["AIF_PROBE/STATUS"], template["AIF_NVML/STATUS"]) == ("OK", "replay")
    assert template["AIF_GPU_COUNT"] == "1"
    assert template["AIF_GPU/BUS_ID"] == "0000:00:06.0"
    assert template["AIF_GPU/MODEL"] == "NVIDIA H100 80GB HBM3"
    assert template["AIF_GPU/HEALTH"] == "OK"
    assert template["IM_MAD"] == "qemu"
    note(f"probes: {NODE} created -> AIF_* in its template after {time.monotonic() - t0:.0f} s")
