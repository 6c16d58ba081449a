"""install.sh: shellcheck-clean, a dry run changes nothing, a real run gives a working command."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "install.sh"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True, timeout=600, check=False)


def test_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is not installed (CI installs it in .ci/run)")
        pytest.skip("shellcheck not installed")
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    result = _run("--prefix", str(prefix), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"+ ln -sf {prefix}/venv/bin/aifactory {prefix}/bin/aifactory" in result.stdout
    assert not prefix.exists()


@pytest.mark.parametrize("args", [("--prefix", "relative/dir"), ("--bogus",), ("--prefix",)])
def test_bad_arguments(args: tuple[str, ...]) -> None:
    result = _run(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_install_gives_a_working_command(tmp_path: Path) -> None:
    prefix = tmp_path / "opt"
    first = _run("--prefix", str(prefix))
    assert first.returncode == 0, first.stdout + first.stderr
    command = prefix / "bin" / "aifactory"
    version = subprocess.run([str(command), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("aifactory ")
    second = _run("--prefix", str(prefix))  # again: upgrades in place, keeps the venv
    assert second.returncode == 0 and "-m venv" not in second.stdout
