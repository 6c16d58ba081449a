"""Host roots for tests: the real H100 capture and trees written by the synthetic generator.

Import the fixtures into a test module (``from hostroots import h100_root``) to use them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
H100_CAPTURE = FIXTURES / "hosts" / "h100-sxm5-vm"
REPO = Path(__file__).resolve().parent.parent


def extract_archive(archive_path: Path, dest: Path) -> Path:
    """A repository fixture archive, extracted with the "data" filter where this Python has it
    (Debian 12's 3.11.2 predates extraction filters; the archives are the repository's own)."""
    with tarfile.open(archive_path, "r:gz") as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(dest, filter="data")
        else:
            archive.extractall(dest)  # noqa: S202
    return dest


def extract_capture(dest: Path) -> Path:
    return extract_archive(H100_CAPTURE / "sysfs.tar.gz", dest)


@pytest.fixture(scope="session")
def h100_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real H100 host capture, extracted (read-only use)."""
    return extract_capture(tmp_path_factory.mktemp("h100"))


def generate_host(description: str, dest: Path) -> Path:
    """Write a synthetic host root from ``tests/fixtures/topologies/<description>.json``."""
    sys.path.insert(0, str(FIXTURES))
    try:
        import hostgen
    finally:
        sys.path.remove(str(FIXTURES))
    topology = json.loads((FIXTURES / "topologies" / f"{description}.json").read_text())
    return hostgen.generate(topology, dest)


@pytest.fixture(scope="session")
def dgx_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DGX-H100-shaped synthetic host (2 sockets x 56 cores x 2 threads, 8 GPUs, 8 CX-7)."""
    return generate_host("dgx-h100", tmp_path_factory.mktemp("dgx"))


@pytest.fixture(scope="session")
def dgx_nps4_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 4-NUMA-node (NPS4/SNC) variant of the DGX-shaped host."""
    return generate_host("dgx-h100-nps4", tmp_path_factory.mktemp("nps4"))


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``aifactory`` console script as a real process."""
    command = [str(Path(sys.executable).with_name("aifactory")), *args]
    full_env = {key: value for key, value in os.environ.items() if key != "AIFACTORY_HOST_ROOT"}
    full_env.update({"AIFACTORY_CONFIG": os.devnull, **(env or {})})
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=120,
                          input=stdin.decode() if stdin is not None else None, check=False)
