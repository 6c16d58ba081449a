"""Where the installer puts things: the hooks follow onehem-server.conf's ``:hook_base_path:``,
bounded to OpenNebula's remotes (the file is oneadmin's in a self-contained install, and root
writes the hooks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aifactory_core.errors import UsageError
from aifactory_core.install.layout import Layout


def _with_hem_conf(root: Path, line: str, one_location: str = "") -> Layout:
    layout = Layout(root, one_location=one_location)
    conf = layout.path(f"{layout.etc}/onehem-server.conf")
    conf.parent.mkdir(parents=True)
    conf.write_text(f"---\n:debug_level: 2\n{line}\n:remote_hook_base_path: '/var/tmp/one/hooks'\n")
    return layout


@pytest.mark.parametrize(("line", "expected"), [
    (":hook_base_path: '/var/lib/one/remotes/hooks'", "/var/lib/one/remotes/hooks/aifactory"),
    (':hook_base_path: "/var/lib/one/remotes/site-hooks"  # ours', "/var/lib/one/remotes/site-hooks/aifactory"),
    (":hook_base_path: /var/lib/one/remotes/hooks/", "/var/lib/one/remotes/hooks/aifactory"),
    ("# :hook_base_path: '/elsewhere'", "/var/lib/one/remotes/hooks/aifactory"),
])
def test_hooks_go_where_the_hook_manager_looks(tmp_path: Path, line: str, expected: str) -> None:
    assert _with_hem_conf(tmp_path, line).hooks_dir == expected


def test_self_contained_install_reads_its_own_hem_conf(tmp_path: Path) -> None:
    layout = _with_hem_conf(tmp_path, ":hook_base_path: '/srv/one/var/remotes/hooks-site'", "/srv/one")
    assert layout.hooks_dir == "/srv/one/var/remotes/hooks-site/aifactory"
    assert Layout(tmp_path, one_location="/srv/none").hooks_dir == "/srv/none/var/remotes/hooks/aifactory"


@pytest.mark.parametrize("path", ["/etc/cron.d", "/var/lib/one/remotes/../../../../etc", "/var/lib/one/remotes",
                                  "/var/lib/one/remotesX/hooks", "/root/.ssh"])
def test_a_hook_base_path_outside_the_remotes_is_refused(tmp_path: Path, path: str) -> None:
    layout = _with_hem_conf(tmp_path, f":hook_base_path: '{path}'")
    with pytest.raises(UsageError, match="is not under"):
        layout.hooks_dir  # noqa: B018


def test_install_refuses_a_link_planted_at_the_state_directory(tmp_path: Path) -> None:
    """The state directory sits in oneadmin's directory: a link there must not make root chmod and
    chown its target (here a directory standing for /etc)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path / "root"
    victim = tmp_path / "etc-standing-in"
    victim.mkdir(mode=0o755)
    (root / "var/lib/one").mkdir(parents=True)
    (root / "var/lib/one/aifactory").symlink_to(victim)
    result = subprocess.run(["sh", str(repo / "install.sh"), "--no-venv", "--no-hooks", "--destdir", str(root)],
                            capture_output=True, text=True, timeout=120, check=False,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "is not a directory (a link or a file stands there)" in result.stderr
    assert (victim.stat().st_mode & 0o7777, victim.stat().st_uid) == (0o755, os.getuid())
    assert list(victim.iterdir()) == []
