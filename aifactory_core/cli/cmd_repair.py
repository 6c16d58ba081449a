"""``aifactory repair``: finish or roll back transactions a crash interrupted (run at host boot)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from aifactory_core.errors import EXIT_CHECK_FAILED, EXIT_OK


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("repair", help="finish or roll back interrupted device transactions")
    parser.add_argument(
        "--boot", action="store_true",
        help="the host has just booted and no VM runs: give back the devices of every journaled VM, "
        "prepared ones included (what aifactory-repair.service runs)")
    parser.add_argument(
        "--reconcile", action="store_true",
        help="give back what VMs without a running domain (one-<id>) still hold: devices reset, "
        "health-checked and back to their drivers, VFs scrubbed (the monitoring probe starts this when "
        "such a VM is found); a VM with an action in flight is left alone")


def run(args: argparse.Namespace, context: Any) -> int:
    from aifactory_core.lifecycle.repair import RepairReport, repair, state_owner
    from aifactory_core.vnm.hook import vnm_host

    boot = bool(getattr(args, "boot", False))
    reconciling = bool(getattr(args, "reconcile", False))
    if boot and reconciling:
        from aifactory_core.errors import UsageError

        raise UsageError("--boot and --reconcile exclude each other (at boot no VM runs: --boot gives back all)")
    owner = state_owner(context.host)
    if owner is not None:  # root: replay oneadmin's journals with oneadmin's rights, never root's
        return _run_as(owner, context, ["--boot"] if boot else ["--reconcile"] if reconciling else [])
    _manager, _loaded = context.plugins  # loading plugins registers their action kinds (VF, pkey, OVS port)
    if reconciling:
        return _reconcile(context)
    report = RepairReport()
    for scope in (context.host, vnm_host(context.host)):  # device journals, then network journals
        report.add(repair(scope, boot=boot, lock_host=context.host))
    out = sys.stdout
    out.write(f"rolled back: {', '.join(map(str, report.rolled_back)) or 'none'}\n")
    out.write(f"released: {', '.join(map(str, report.released)) or 'none'}\n")
    if not boot:
        out.write(f"kept (prepared, VM running): {', '.join(map(str, report.kept)) or 'none'}\n")
    if report.busy:
        out.write(f"busy (an action in flight, left to it): {', '.join(map(str, sorted(set(report.busy))))}\n")
    if report.orphans_dropped:
        out.write(f"stale ownership dropped: {', '.join(report.orphans_dropped)}\n")
    for problem in report.problems:
        sys.stderr.write(f"aifactory: repair: {problem}\n")
    return EXIT_CHECK_FAILED if report.problems else EXIT_OK


def _reconcile(context: Any) -> int:
    from aifactory_core.lifecycle.reconcile import reconcile, run_exclusive

    report = run_exclusive(context.host, lambda: reconcile(context.host))
    out = sys.stdout
    if report is None:
        out.write("another reconciliation is running\n")
        return EXIT_OK
    out.write(f"released (no domain): {', '.join(map(str, report.released)) or 'none'}\n")
    out.write(f"running: {', '.join(map(str, report.running)) or 'none'}\n")
    out.write(f"busy (left alone): {', '.join(map(str, report.busy)) or 'none'}\n")
    for problem in report.problems:
        sys.stderr.write(f"aifactory: repair --reconcile: {problem}\n")
    return EXIT_CHECK_FAILED if report.problems else EXIT_OK


def _run_as(owner: tuple[int, int], context: Any, options: list[str]) -> int:
    """Run this repair again as ``owner`` (with its supplementary groups), in a new process: its
    exit status."""
    import os
    import pwd
    import subprocess

    from aifactory_core.hostroot import ENV_STATE_DIR

    uid, gid = owner
    try:
        entry = pwd.getpwuid(uid)
        gid = entry.pw_gid
        groups = os.getgrouplist(entry.pw_name, gid)
    except KeyError:
        groups = []
    argv = [sys.executable, "-m", "aifactory_core.cli", "--host-root", str(context.host.root)]
    argv += ["--config", context.config_option] if context.config_option else []
    argv += ["--debug"] if context.debug else []
    argv += ["repair", *options]
    env = {**os.environ, ENV_STATE_DIR: str(context.host.state_dir)}
    return subprocess.run(argv, env=env, cwd="/", user=uid, group=gid, extra_groups=groups, check=False).returncode
