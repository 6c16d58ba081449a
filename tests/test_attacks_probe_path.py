"""The IM probes start without site (``-S``) and look for a source checkout five directories above
themselves. Installed on a host they sit in ``/var/tmp/one/im/kvm-probes.d/<kind>/``, five
directories below ``/var/tmp``, which every local user may write: a planted
``/var/tmp/aifactory_core`` must never be imported (it would run as oneadmin at every monitoring
cycle). A private checkout (no group or other write) is still used, which is what makes the attack
case able to fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROBES = {"host/system": "host-system", "vm/monitor": "vm-monitor"}
PLANTED = "PLANTED-AIFACTORY-CORE"


def _planted_tree(top: Path, probe: str, mode: int) -> Path:
    """``top/var/tmp`` (mode ``mode``) holding a copy of the probe where a host installs it, and a
    planted ``aifactory_core`` beside ``one``."""
    var_tmp = top / "var" / "tmp"
    installed = var_tmp / "one" / "im" / "kvm-probes.d" / probe
    installed.mkdir(parents=True)
    script = installed / "aifactory-gpu"
    shutil.copy2(REPO / "drivers" / "im" / "kvm-probes.d" / probe / "aifactory-gpu", script)
    package = var_tmp / "aifactory_core" / "probes"
    package.mkdir(parents=True)
    (var_tmp / "aifactory_core" / "__init__.py").write_text("")
    (package / "__init__.py").write_text(f"def run(kind):\n    print('{PLANTED}', kind)\n    return 0\n")
    for directory in (var_tmp, var_tmp / "aifactory_core"):
        directory.chmod(mode)
    return script


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_an_aifactory_core_planted_in_a_world_writable_var_tmp_is_never_imported(probe: str, tmp_path: Path) -> None:
    script = _planted_tree(tmp_path, probe, 0o1777)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "AIFACTORY_HOST_ROOT": str(tmp_path / "none")}
    done = subprocess.run([sys.executable, "-S", str(script), "kvm", "0", "host"], input="<X/>", capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert PLANTED not in done.stdout + done.stderr, done.stdout


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_a_private_checkout_is_still_used(probe: str, tmp_path: Path) -> None:
    script = _planted_tree(tmp_path, probe, 0o755)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    done = subprocess.run([sys.executable, "-S", str(script), "kvm", "0", "host"], input="<X/>", capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert f"{PLANTED} {PROBES[probe]}" in done.stdout, done.stdout + done.stderr
