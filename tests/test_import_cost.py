"""Hooks and probes start a process per event: importing the core must stay cheap.

Measured with ``python -X importtime`` in a fresh interpreter; the assertion is on *which*
modules load (deterministic), never on how long they take.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("pyone", "pyroute2", "pynvml", "lxml", "pluggy", "pyudev", "tomllib")


def _imported(statement: str) -> set[str]:
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", statement],
                            capture_output=True, text=True, check=True)
    modules = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            modules.add(name.split(".")[0])
    return modules


@pytest.mark.parametrize(
    "statement",
    ["import aifactory_core", "import aifactory_core.hostroot, aifactory_core.validate, aifactory_core.errors",
     "import aifactory_core.host.inventory", "import aifactory_core.one",
     "import aifactory_core.vmm"],  # the VMM wrapper's full path, started per VM action with a device
)
def test_core_imports_no_heavy_dependency(statement: str) -> None:
    loaded = _imported(statement)
    assert loaded, "importtime printed nothing: the measurement itself is broken"
    assert "aifactory_core" in loaded
    assert not loaded & set(HEAVY), f"{statement} pulled in {sorted(loaded & set(HEAVY))}"


def test_cli_parser_imports_only_the_selected_command() -> None:
    statement = ("import sys; from aifactory_core.cli import build_parser; build_parser('plugins'); "
                 "print(sorted(m for m in sys.modules if m.startswith('aifactory_core.cli.cmd_')))")
    result = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['aifactory_core.cli.cmd_plugins']"


def _started_modules(command: list[str], env: dict[str, str], stdin: bytes) -> set[str]:
    result = subprocess.run(command, input=stdin, capture_output=True, check=True,
                            env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.decode().splitlines()
            if line.startswith("import time:") and "|" in line}


@pytest.mark.parametrize("action", ["deploy", "shutdown", "cancel"])
def test_the_vmm_fast_path_imports_only_itself(tmp_path: Path, action: str) -> None:
    """A wrapped action for a VM without devices, run as OpenNebula runs it: beyond what the
    interpreter's own start-up imports, ``aifactory_core`` and its fast path, nothing."""
    if action == "deploy" and os.path.exists("/etc/one/aifactory-policy.toml"):
        pytest.skip("this machine has a tenant policy at /etc/one/aifactory-policy.toml: every deploy is decided")
    root, originals = tmp_path / "root", tmp_path / "remotes"
    root.mkdir()
    originals.mkdir()
    original = originals / f"{action}.one"
    original.write_text("#!/bin/sh\ncat >/dev/null\necho ran\n")
    original.chmod(0o755)
    env = {**os.environ, "AIFACTORY_PYTHON": sys.executable, "AIFACTORY_HOST_ROOT": str(root),
           "AIFACTORY_STATE_DIR": str(tmp_path / "state"), "AIFACTORY_CONFIG": os.devnull,
           "AIFACTORY_VMM_ORIGINAL_DIR": str(originals)}
    argv = (["/var/lib/one//datastores/0/42/deployment.0"] if action == "deploy" else ["one-42"]) + ["h", "42", "h"]
    stdin = b"<domain type='kvm'><name>one-42</name></domain>" if action == "deploy" else b"<VMM_DRIVER_ACTION_DATA/>"
    baseline = _started_modules([sys.executable, "-c", "pass"], env, b"")
    assert baseline, "importtime printed nothing: the measurement itself is broken"
    wrapper = Path(__file__).resolve().parent.parent / "drivers" / "vmm" / "kvm" / action
    added = _started_modules([str(wrapper), *argv], env, stdin) - baseline
    assert added == {"aifactory_core", "aifactory_core.vmm_fast"}
    result = subprocess.run([str(wrapper), *argv], input=stdin, capture_output=True, env=env, check=True)
    assert result.stdout == b"ran\n"


# A probe run on a host like ``tests/fixtures/topologies/accel-node.json`` (an H100 on vfio-pci held by
# a VM, the example vendor plugin's accelerator, no NVML, no SR-IOV PF, no readable kernel log), the
# example plugin installed: what each probe loads beyond the interpreter's own ``-S`` start-up.
# Everything else is imported inside the function that needs it, only where there is work for it.
PROBE_STDLIB = {"os", "posixpath", "genericpath", "stat", "_stat", "_collections_abc", "gc"}
PROBE_CORE = {"aifactory_core", "aifactory_core.probes", "aifactory_core.probes.sysfs",
              "aifactory_core.probes.render", "aifactory_core.probes.host_side", "aifactory_core.probes.collect",
              "aifactory_core.probes.plugins", "aifactory_core.probes.api"}
EXAMPLE_PLUGIN = {"aifactory_example_accel", "aifactory_example_accel.probe"}
ACCEL_HOST_PROBES = {
    "host/system": PROBE_STDLIB | PROBE_CORE | EXAMPLE_PLUGIN | {
        "aifactory_core.probes.host_system", "aifactory_core.probes.readiness", "aifactory_core.probes.hostconf",
        "aifactory_core.probes.pci_offer"},
    # binascii: the VM line's MONITOR; the reconciliation check runs, and finds nothing to start
    "vm/monitor": PROBE_STDLIB | PROBE_CORE | EXAMPLE_PLUGIN | {
        "aifactory_core.probes.vm_monitor", "aifactory_core.probes.reconcile_trigger", "binascii"},
}
# What such a run must never load (each named for what would bring it back): the host model's package
# (SR-IOV/eswitch: host.eswitch; link names: probes.sysfs), NVML and its verdicts, XIDs, NUMA, the
# Prometheus writer, the full plugin machinery, the slow parts of the standard library, and
# ``__future__`` (a ``from __future__ import annotations`` in a module of the path loads it).
NOT_ON_ACCEL_HOST = {
    "__future__",
    "aifactory_core.host", "aifactory_core.host.eswitch", "aifactory_core.host.sysfs", "aifactory_core.host.numa",
    "aifactory_core.probes.gpu", "aifactory_core.probes.nvml", "aifactory_core.probes.nvml_ctypes",
    "aifactory_core.probes.xid", "aifactory_core.probes.prometheus", "aifactory_core.probes.owners",
    "aifactory_core.hostroot", "aifactory_core.hookspecs", "aifactory_core.plugins", "aifactory_core.config",
    "aifactory_core.one.template", "pluggy",
    "dataclasses", "enum", "typing", "json", "re", "tomllib", "ctypes", "threading", "subprocess", "importlib.metadata",
}


@pytest.mark.parametrize("probe", sorted(ACCEL_HOST_PROBES))
def test_probe_on_a_host_without_nvml_or_sriov_loads_only_its_path(probe: str, tmp_path: Path) -> None:
    """Both IM probes as OpenNebula runs them (``-S``), with the example vendor plugin installed, on
    the generated accel-node host: exactly the modules of :data:`ACCEL_HOST_PROBES` load (their cost
    is measured by ``benchmarks/bench_probes.py --install-dir``), none of :data:`NOT_ON_ACCEL_HOST`,
    and the run still reports the plugin's accelerator and the VM's GPU."""
    from hostroots import REPO, generate_host

    if importlib.util.find_spec("aifactory_example_accel") is None and os.environ.get("CI") != "true":
        pytest.skip("the example vendor plugin is not installed (pip install --no-deps "
                    "./plugins/examples/aifactory-example-accel)")
    root = generate_host("accel-node", tmp_path / "root")
    owners = tmp_path / "state" / "owners"
    owners.mkdir(parents=True)
    (owners / "0000:01:00.0").write_text("42\n")  # a VM holds the H100: vm/monitor reports it
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AIFACTORY_", "PYTHON"))}
    env |= {"AIFACTORY_HOST_ROOT": str(root), "AIFACTORY_STATE_DIR": str(tmp_path / "state")}
    executable = REPO / "drivers/im/kvm-probes.d" / probe / "aifactory-gpu"
    baseline = _started_modules([sys.executable, "-S", "-c", "pass"], env, b"")
    assert baseline, "importtime printed nothing: the measurement itself is broken"
    run = subprocess.run([sys.executable, "-S", str(executable), "kvm", "0", "h"], input=b"", capture_output=True,
                         check=True, env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
    loaded = {line.rsplit("|", 1)[1].strip() for line in run.stderr.decode().splitlines()
              if line.startswith("import time:") and "|" in line} - baseline
    output = run.stdout.decode()
    if probe == "host/system":
        assert 'AIF_DEVICE=[ PLUGIN="example_accel", KIND="accelerator"' in output
        assert 'STATUS="OK", PROBLEMS="" ]' in output and 'VM_ID="42"' in output
    else:
        assert output.startswith('VM = [ ID="42", DEPLOY_ID="one-42", MONITOR="') and output.count("\n") == 1
    assert not loaded & NOT_ON_ACCEL_HOST, sorted(loaded & NOT_ON_ACCEL_HOST)
    expected = ACCEL_HOST_PROBES[probe]
    assert loaded == expected, f"loaded besides: {sorted(loaded - expected)}; not loaded: {sorted(expected - loaded)}"
