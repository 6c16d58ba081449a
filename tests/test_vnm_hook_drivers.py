"""The network hook is installed for every VNM driver a VM's PCI NIC network can use.

OpenNebula's VNM driver scripts (``src/vnm_mad/remotes/<driver>/{pre,post,clean}``) run the
executables of ``<phase>.d`` beside them (``VNMDriver#run_hooks``; dummy's shell loop). The suite's
hook must sit in each of those directories for 802.1Q and both VXLAN drivers, or a VF on such a
network is configured at deploy and never scrubbed. The driver scripts are read out of the release
tarballs at test time, not copied here.
"""

from __future__ import annotations

import tarfile
from functools import cache
from pathlib import Path

import needs
import pytest

from aifactory_core.install import manifest
from aifactory_core.vmm_actions import CHECKED_VERSIONS
from aifactory_core.vnm.grant import VXLAN_DRIVERS

REPO = Path(__file__).resolve().parent.parent
TARBALLS = REPO.parent / "shared" / "opennebula" / "src"
PHASES = ("pre", "post", "clean")
HOOK = "aifactory-network"
# The drivers whose networks carry VFs the suite configures: VLAN (802.1Q), VXLAN and OVS VXLAN,
# plus the bridge/OVS/dummy drivers a PCI NIC network may name.
DRIVERS = ("802.1Q", "bridge", "dummy", "ovswitch", *sorted(VXLAN_DRIVERS))


@cache
def upstream_phase_scripts(version: str) -> dict[str, str]:
    """``<driver>/<phase>`` -> the script's text, for every VNM driver of OpenNebula ``version``."""
    tarball = TARBALLS / f"one-release-{version}.tar.gz"
    if not tarball.is_file():
        needs.unavailable(f"{tarball} missing: OpenNebula {version}'s source is needed")
    prefix = f"one-release-{version}/src/vnm_mad/remotes/"
    found: dict[str, str] = {}
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:
            if not member.isfile() or not member.name.startswith(prefix):
                continue
            parts = member.name[len(prefix):].split("/")
            if len(parts) == 2 and parts[1] in PHASES:
                extracted = archive.extractfile(member)
                assert extracted is not None
                found["/".join(parts)] = extracted.read().decode("utf-8")
    return found


def runs_its_hooks(script: str) -> bool:
    """The Ruby drivers call ``run_hooks(ARGV, ...)``; dummy loops over ``"$0".d/*`` in shell."""
    return "run_hooks(" in script or '"$0".d/*' in script


@pytest.mark.parametrize("version", CHECKED_VERSIONS)
def test_each_driver_the_suite_serves_runs_its_phase_hooks_upstream(version: str) -> None:
    scripts = upstream_phase_scripts(version)
    for driver in DRIVERS:
        for phase in PHASES:
            script = scripts.get(f"{driver}/{phase}")
            assert script is not None, f"{version}: OpenNebula has no vnm/{driver}/{phase}"
            assert runs_its_hooks(script), f"{version}: vnm/{driver}/{phase} no longer runs {phase}.d"


def test_the_same_hook_is_installed_for_every_driver_and_phase() -> None:
    entries = {entry.destination: entry for entry in manifest.discover(REPO)}
    for phase in PHASES:
        reference = (REPO / "drivers/vnm/802.1Q" / f"{phase}.d" / HOOK).read_bytes()
        assert f"aifactory_core.vnm.hook {phase} " in reference.decode()
        for driver in DRIVERS:
            entry = entries.get(f"/var/lib/one/remotes/vnm/{driver}/{phase}.d/{HOOK}")
            assert entry is not None, f"no {HOOK} installed into vnm/{driver}/{phase}.d"
            assert entry.kind == manifest.FILE and entry.mode == 0o755, (driver, phase)
            assert entry.content == reference, f"vnm/{driver}/{phase}.d/{HOOK} differs from 802.1Q's"
    installed = {destination.split("/")[6] for destination in entries if "/remotes/vnm/" in destination}
    assert installed == set(DRIVERS)
