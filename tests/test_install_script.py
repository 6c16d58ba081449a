"""install.sh itself: shellcheck-clean, argument errors, a dry run changes nothing, and a complete
staged install (both Python environments built with pip) whose host environment still works after
being copied the way ``onehost sync`` copies the remotes (``rsync -L``: symlinks dereferenced) to
``/var/tmp/one`` — here a directory standing for it."""

import os
import shutil
import subprocess
from pathlib import Path

import needs
import pytest
from hostroots import h100_root  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "install.sh"


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in ("DESTDIR", "PYTHONPATH")}
    return subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


def test_shellcheck_clean() -> None:
    needs.tool("shellcheck", hint="apt-get install -y shellcheck")
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = _run("--destdir", str(root), "--no-hooks", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"-m venv {root}/opt/aifactory/venv.new" in result.stdout
    assert f"-m venv {root}/var/lib/one/remotes/aifactory/venv.new" in result.stdout
    assert f"would install {root}/var/lib/one/remotes/vmm/kvm/deploy" in result.stdout
    assert not root.exists()


@pytest.mark.parametrize("args", [("--prefix", "relative/dir"), ("--destdir", "relative"), ("--bogus",),
                                  ("--prefix",), ("--upgrade", "--destdir", "/nonexistent/aifactory-test")])
def test_bad_arguments(args: tuple[str, ...]) -> None:
    result = _run(*args, "--no-hooks", "--no-venv")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3


def _sync_like_onehost(remotes: Path, host_tmp_one: Path) -> None:
    """What ``onehost sync`` does (``rsync -LRaz --delete . host:/var/tmp/one/``), to a local directory."""
    if shutil.which("rsync"):
        subprocess.run(["rsync", "-La", "--delete", f"{remotes}/", f"{host_tmp_one}/"], check=True)
    else:
        shutil.copytree(remotes, host_tmp_one, symlinks=False)


def test_complete_staged_install_gives_working_environments(tmp_path: Path, h100_root: Path) -> None:  # noqa: F811
    root = tmp_path / "root"
    first = _run("--destdir", str(root), "--no-hooks")
    assert first.returncode == 0, first.stdout + first.stderr
    frontend = root / "opt/aifactory/venv"
    version = subprocess.run([str(frontend / "bin/python3"), "-m", "aifactory_core.cli", "--version"],
                             capture_output=True, text=True, check=True)
    assert version.stdout.startswith("aifactory ")
    assert (frontend / "bin/aifactory").read_text().splitlines()[0] == "#!/opt/aifactory/venv/bin/python3"
    staged_host_env = root / "var/lib/one/remotes/aifactory/venv"
    helper = staged_host_env / "bin/aifactory-root-helper"
    assert helper.read_text().splitlines()[0] == "#!/var/tmp/one/aifactory/venv/bin/python3"

    host = tmp_path / "host-var-tmp-one"
    _sync_like_onehost(root / "var/lib/one/remotes", host)
    python = host / "aifactory/venv/bin/python3"
    assert not python.is_symlink()  # dereferenced, as rsync -L leaves it on a host
    probe = host / "im/kvm-probes.d/host/system/aifactory-gpu"
    flags = probe.read_text().splitlines()[0].split()[1:]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "AIFACTORY_HOST_ROOT": str(h100_root),
           "AIFACTORY_STATE_DIR": str(tmp_path / "state")}
    result = subprocess.run([str(python), *flags, str(probe), "kvm", "0", "gpu-node-01"], input="<X/>",
                            capture_output=True, text=True, env=env, check=False, timeout=60)
    assert result.returncode == 0 and 'STATUS="FAILED"' not in result.stdout, result.stdout + result.stderr
    assert "0000:00:06.0" in result.stdout
    imports = subprocess.run([str(python), "-c", "import aifactory_core.vmm, pyone, lxml, pluggy, pyroute2"],
                             capture_output=True, text=True, env=env, check=False)
    assert imports.returncode == 0, imports.stderr

    second = _run("--destdir", str(root), "--no-hooks")
    assert second.returncode == 0 and "-m venv" not in second.stdout
    assert "nothing to change" in second.stdout

    removed = _run("--destdir", str(root), "--no-hooks", "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == []
