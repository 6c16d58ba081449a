"""Hooks and probes start a process per event: importing the core must stay cheap.

Measured with ``python -X importtime`` in a fresh interpreter; the assertion is on *which*
modules load (deterministic), never on how long they take.
"""

import subprocess
import sys

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
     "import aifactory_core.vmm"],  # the VMM wrapper, started per VM action
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
