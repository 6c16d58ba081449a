"""The optional resident hook server on the frontend, as a systemd service.

The unit file itself is one of the manifest's files (``hooks/systemd/aifactory-hook-server.service``
-> ``/etc/systemd/system``). With ``install.sh --enable-hook-server`` the installer also enables and
starts it, as steps of the same transaction (undone if a later step fails), and records that in the
install manifest (``"hook_server": true``) so that later runs restart it when the suite changed and
``--uninstall`` stops and disables it before its unit file goes.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from aifactory_core.errors import UsageError
from aifactory_core.install import layout, systemd
from aifactory_core.install.stage import Transaction
from aifactory_core.model import Check

UNIT_NAME = "aifactory-hook-server.service"
UNIT = f"/etc/systemd/system/{UNIT_NAME}"
RECORD_KEY = "hook_server"


def check_can_enable(target: layout.Layout) -> None:
    """Refuse ``--enable-hook-server`` up front on a live machine that systemd does not manage."""
    if not target.staged and not systemd.running(target):
        raise UsageError(f"--enable-hook-server: this machine is not managed by systemd ({systemd.BOOTED_MARKER} "
                         "missing or no systemctl on PATH); run 'aifactory hook-server' some other way")


def enable(tx: Transaction, target: layout.Layout, unit_changed: bool, notes: list[str]) -> bool:
    """Reload systemd if the unit changed, then ``enable --now`` unless it is enabled and running.

    Returns True when this run made a step that (re)started the service; on a staged tree nothing is
    enabled and a note says how to do it on the target.
    """
    if target.staged:
        notes.append(f"{UNIT_NAME} not enabled (a staged tree): on the target, "
                     f"run 'systemctl enable --now {UNIT_NAME}'")
        return False
    if unit_changed:
        systemd.reload_step(tx)
    if not tx.dry_run and systemd.succeeds("is-enabled", "--quiet", UNIT_NAME) \
            and systemd.succeeds("is-active", "--quiet", UNIT_NAME):
        return False
    tx.step(f"systemctl enable --now {UNIT_NAME}", partial(systemd.checked, "enable", "--now", UNIT_NAME),
            partial(systemd.quiet, "disable", "--now", UNIT_NAME))
    return True


def restart_after_commit(tx: Transaction, target: layout.Layout, unit_changed: bool) -> None:
    """Restart the service (if it runs) once the run has committed, so it runs the installed code."""
    if not systemd.running(target):
        return
    commands: list[tuple[str, ...]] = [("daemon-reload",)] if unit_changed else []
    commands.append(("try-restart", UNIT_NAME))
    for argv in commands:
        tx.out.write(("would " if tx.dry_run else "") + f"systemctl {' '.join(argv)} (once committed)\n")
        if not tx.dry_run:
            tx.after_commit.append(partial(systemd.quiet, *argv))


def stop_for_uninstall(tx: Transaction, target: layout.Layout, record: dict[str, Any], notes: list[str]) -> None:
    """Stop and disable the service before its unit file is removed (enabled by us or by the admin)."""
    if not any(item.get("path") == UNIT for item in record.get("files", [])):
        return
    if not systemd.running(target):
        if record.get(RECORD_KEY) and not target.staged:
            notes.append(f"{UNIT_NAME} was enabled but systemd does not manage this machine now: "
                         "nothing stopped or disabled")
        return
    if record.get(RECORD_KEY) or systemd.succeeds("is-enabled", "--quiet", UNIT_NAME) \
            or systemd.succeeds("is-active", "--quiet", UNIT_NAME):
        tx.step(f"systemctl disable --now {UNIT_NAME}", partial(systemd.checked, "disable", "--now", UNIT_NAME),
                partial(systemd.quiet, "enable", "--now", UNIT_NAME))
    tx.after_commit.append(partial(systemd.quiet, "daemon-reload"))


def doctor_check(target: layout.Layout, record: dict[str, Any]) -> Check | None:
    """Where the installer enabled the service: is it running? (None: not enabled by the installer.)"""
    if not record.get(RECORD_KEY) or target.staged:
        return None
    if not systemd.running(target):
        return Check("hook-server", "WARN", f"{UNIT_NAME} was enabled but systemd does not manage this machine",
                     fix="run 'aifactory hook-server' some other way, or reinstall without --enable-hook-server")
    if systemd.succeeds("is-active", "--quiet", UNIT_NAME):
        return Check("hook-server", "PASS", f"{UNIT_NAME} running")
    return Check("hook-server", "WARN", f"{UNIT_NAME} is not running: each hook decides in its own process "
                 "(slower, same decisions)", fix=f"systemctl status {UNIT_NAME}; systemctl enable --now {UNIT_NAME}")
