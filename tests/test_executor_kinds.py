"""Every built-in action kind a journal can hold has an executor in a process that imported only
the lifecycle code: VNM clean, release and repair undo steps written by plugins they never loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aifactory_core.lifecycle.executor import BUILTIN_PROVIDERS

PROBE = """
import sys
from aifactory_core.lifecycle import executor
kind = sys.argv[1]
assert kind not in executor.EXECUTORS, "registered before first use: the test proves nothing"
print(kind if executor.executor_for(kind) is executor.EXECUTORS[kind] else "")
"""


@pytest.mark.parametrize("kind", sorted(BUILTIN_PROVIDERS))
def test_a_fresh_process_finds_the_executor_of(kind: str) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, kind], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == kind


def test_an_unknown_kind_is_one_line_and_imports_nothing() -> None:
    from aifactory_core.errors import HostError
    from aifactory_core.lifecycle.executor import executor_for

    with pytest.raises(HostError, match="no executor for action kind 'aifactory_plugins.bluefield'"):
        executor_for("aifactory_plugins.bluefield")
