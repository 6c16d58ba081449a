"""What a test needs from the machine: a real tool, root. Missing, the test is skipped on a
developer's machine and FAILS under ``CI=true`` — CI installs every tool (``.ci/run``,
``.ci/install-testhost.sh``), so a skip there would hide a test that never ran."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest
from testhost.pytest_plugin import in_ci


def unavailable(reason: str) -> NoReturn:
    (pytest.fail if in_ci() else pytest.skip)(reason)


def tool(*names: str, hint: str = "") -> str:
    """The path of the first of ``names`` on PATH (or an absolute path that is executable)."""
    for name in names:
        found = shutil.which(name) if not name.startswith("/") else (name if os.access(name, os.X_OK) else None)
        if found:
            return found
    unavailable(f"{' or '.join(names)} not installed{f' ({hint})' if hint else ''}")


def tools(*names: str, hint: str = "") -> None:
    for name in names:
        tool(name, hint=hint)


def root(why: str) -> None:
    if os.geteuid() != 0:
        unavailable(f"needs root: {why}")
