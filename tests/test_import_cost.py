"""Hooks and probes start a process per event: importing the core must stay cheap.

Measured with ``python -X importtime`` in a fresh interpreter; the assertion is on *which*
modules load (deterministic), never on how long they take.
"""

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
