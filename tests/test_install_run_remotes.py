"""The probe and driver scripts as installed in a staged frontend's remotes, run the way OpenNebula
runs them on a host (same argv, same stdin), on the real H100 host capture.

``onehost sync`` copies ``/var/lib/one/remotes`` to ``/var/tmp/one`` on the host; each script is run
from the staged remotes directory. The host environment (``/var/tmp/one/aifactory/venv``) is not
built in these tests: its interpreter is stood in for by this test's Python with the checkout on
``PYTHONPATH`` (``AIFACTORY_PYTHON`` for the shell wrappers, the interpreter named on a Python
probe's first line replaced by this one, its flags kept). OpenNebula's original VMM actions are
small recorders written into the staged tree (``<action>.one`` after the install).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hostroots import h100_root  # noqa: F401 - fixture
from test_install_staged import DOMAIN, clean_frontend, install

REPO = Path(__file__).resolve().parent.parent
REMOTES = "var/lib/one/remotes"
MONITOR_CONFIG = "<MONITOR_CONFIGURATION><HOST_ID>0</HOST_ID></MONITOR_CONFIGURATION>"


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    root = clean_frontend(tmp_path / "root")
    auth = tmp_path / "one_auth"
    auth.write_text("oneadmin:opennebula\n")
    result = install(root, auth)
    assert result.returncode == 0, result.stderr
    return root


def host_env(h100: Path, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "AIFACTORY_PYTHON": sys.executable,
            "AIFACTORY_HOST_ROOT": str(h100), "AIFACTORY_STATE_DIR": str(tmp_path / "state"),
            "AIFACTORY_CONFIG": os.devnull}


def as_opennebula_runs(script: Path, argv: list[str], stdin: str,
                       env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """exec the script; a Python script's interpreter (the host venv's) is replaced by this one."""
    first = script.read_text().splitlines()[0]
    command = [str(script), *argv]
    if first.startswith("#!/var/tmp/one/aifactory/venv/bin/python3"):
        command = [sys.executable, *first.split()[1:], str(script), *argv]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, env=env, timeout=60, check=False)


def probes(root: Path, directory: str) -> list[Path]:
    top = root / REMOTES / "im/kvm-probes.d" / directory
    return sorted(path for path in top.iterdir() if path.name.startswith("aifactory"))


def test_host_system_probes_report_the_h100(staged: Path, h100_root: Path, tmp_path: Path) -> None:  # noqa: F811
    installed = probes(staged, "host/system")
    assert installed, "no host/system probe installed"
    for probe in installed:
        result = as_opennebula_runs(probe, ["kvm", "0", "gpu-node-01"], MONITOR_CONFIG, host_env(h100_root, tmp_path))
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert 'STATUS="FAILED"' not in result.stdout, result.stdout
        assert "0000:00:06.0" in result.stdout  # the H100 of the capture


def test_vm_monitor_probes_run_clean(staged: Path, h100_root: Path, tmp_path: Path) -> None:  # noqa: F811
    for probe in probes(staged, "vm/monitor"):
        result = as_opennebula_runs(probe, ["kvm", "0", "gpu-node-01"], MONITOR_CONFIG, host_env(h100_root, tmp_path))
        assert result.returncode == 0 and result.stderr == "", result.stderr


def test_vmm_wrappers_keep_opennebulas_contract(staged: Path, h100_root: Path, tmp_path: Path) -> None:  # noqa: F811
    kvm = staged / REMOTES / "vmm/kvm"
    env = host_env(h100_root, tmp_path)
    argv = ["/var/lib/one//datastores/0/42/deployment.0", "gpu-node-01", "42", "gpu-node-01"]
    deploy = as_opennebula_runs(kvm / "deploy", argv, DOMAIN, env)
    assert deploy.returncode == 0, deploy.stderr
    assert deploy.stdout == "6f1c2c1e-5d0a-4d43-9a53-7d0c6f1b2a42\n"  # the original's deploy id, untouched
    assert (kvm / "deploy.argv").read_text().split() == argv
    assert "<name>one-42</name>" in (kvm / "deploy.stdin").read_text()
    deploy_id = "6f1c2c1e-5d0a-4d43-9a53-7d0c6f1b2a42"
    for action, argv in (("shutdown", [deploy_id, "gpu-node-01", "42", "gpu-node-01"]),
                         ("cancel", [deploy_id, "gpu-node-01", "42", "gpu-node-01"]),
                         ("save", [deploy_id, "/var/lib/one//datastores/0/42/checkpoint", "gpu-node-01", "42",
                                   "gpu-node-01"]),
                         ("migrate", [deploy_id, "gpu-node-02", "gpu-node-01", "42", "gpu-node-01"])):
        result = as_opennebula_runs(kvm / action, argv, "<VMM_DRIVER_ACTION_DATA/>", env)
        assert result.returncode == 0, result.stderr
        assert (kvm / f"{action}.argv").read_text().split() == argv


def test_vmm_wrapper_refuses_bad_input_with_one_line(staged: Path, h100_root: Path, tmp_path: Path) -> None:  # noqa: F811
    kvm = staged / REMOTES / "vmm/kvm"
    result = as_opennebula_runs(kvm / "deploy", ["/x/deployment.0", "gpu-node-01", "not-a-vm", "gpu-node-01"], DOMAIN,
                                host_env(h100_root, tmp_path))
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert not (kvm / "deploy.argv").exists()  # the original never ran


VNM_STDIN = (REPO / "tests/fixtures/opennebula/samples/synthesized/vnm_action_vm.b64").read_text()


def test_vnm_pre_and_clean_hooks_run_for_every_installed_driver(staged: Path, h100_root: Path,  # noqa: F811
                                                                tmp_path: Path) -> None:
    """``pre`` gets no arguments, ``clean`` ``'<host>'``; both the base64 VM document on stdin."""
    hooks = sorted((staged / REMOTES / "vnm").glob("*/pre.d/aifactory*")) + \
        sorted((staged / REMOTES / "vnm").glob("*/clean.d/aifactory*"))
    if not hooks:
        pytest.skip("no VNM hooks in this tree yet")
    for hook in hooks:
        argv = [] if hook.parent.name == "pre.d" else ["gpu-node-01"]
        result = as_opennebula_runs(hook, argv, VNM_STDIN, host_env(h100_root, tmp_path))
        assert result.returncode == 0, f"{hook}: {result.stderr}"
