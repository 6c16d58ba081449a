"""``python -m aifactory_core.install.main install|uninstall ...``: what install.sh drives.

Files first (one journaled transaction), then the hooks through oned; if registering the hooks
fails, the files are rolled back too, so a failed run leaves the target as it was.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aifactory_core.errors import EXIT_USAGE, AifactoryError, UsageError
from aifactory_core.install import layout
from aifactory_core.install.stage import InstallError, Transaction


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aifactory-install")
    parser.add_argument("mode", choices=["install", "upgrade", "uninstall"])
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--destdir", default=os.environ.get("DESTDIR") or "/")
    parser.add_argument("--prefix", default=layout.DEFAULT_PREFIX)
    parser.add_argument("--one-location", default=os.environ.get("ONE_LOCATION", ""),
                        help="a self-contained OpenNebula's ONE_LOCATION (default $ONE_LOCATION; unset: packaged)")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--no-hooks", action="store_true", help="do not register hooks with oned")
    parser.add_argument("--endpoint", help="oned XML-RPC endpoint (default $ONE_XMLRPC or localhost:2633)")
    parser.add_argument("--environment", action="append", default=[], help="a Python environment this run owns")
    parser.add_argument("--created-dir", action="append", default=[], help="a directory install.sh created")
    parser.add_argument("--enable-hook-server", action="store_true",
                        help="enable and start aifactory-hook-server.service (systemd)")
    parser.add_argument("--rebuilt-environment", action="store_true",
                        help="install.sh rebuilt a Python environment in this run")
    return parser


def _oned(endpoint: str | None) -> Any:
    try:
        from aifactory_core.policy.oned import Oned

        return Oned(endpoint, timeout=15.0, transport="pyone")
    except ImportError as error:  # pyone: present in the suite's environment, maybe not in this Python
        raise InstallError(f"cannot talk to oned from {sys.executable}: {error} (pyone; or --no-hooks)") from None


def _frontend_config(target: layout.Layout) -> Any:
    """The ``[frontend]`` table of the frontend's aifactory.conf (defaults when there is none yet)."""
    from aifactory_core.config import FrontendConfig, parse_config_bytes

    path = target.path(target.config)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return FrontendConfig()
    return parse_config_bytes(raw, str(path)).frontend


def install(args: argparse.Namespace, target: layout.Layout, tx: Transaction) -> list[str]:
    from aifactory_core.install import hook_server, hookreg, manifest, pcifilter, stage, vmops

    previous = stage.load_record(target)
    if args.mode == "upgrade" and not previous:
        raise UsageError(f"nothing to upgrade: no {target.path(target.manifest)} (run install.sh without --upgrade)")
    if args.enable_hook_server:
        hook_server.check_can_enable(target)
    recorded = {item["path"]: item for item in previous.get("files", [])}
    entries = manifest.discover(args.source, args.prefix, target)
    templates = manifest.hook_templates(args.source)
    notes: list[str] = []
    created = [d for d in previous.get("directories", [])]
    for directory in args.created_dir:
        if directory not in created:
            created.append(directory)
    files: list[dict[str, Any]] = []
    unit_changed = False
    for entry in entries:
        before = tx.changes
        item = stage.install_entry(tx, target, entry, recorded.get(entry.destination, {}), created, notes)
        unit_changed |= entry.destination == hook_server.UNIT and tx.changes != before
        if item is not None:
            files.append(item)
    hooks: dict[str, int] = dict(previous.get("hooks", {}))
    if not args.no_hooks and templates and args.dry_run and importlib.util.find_spec("pyone") is None:
        for template in templates:  # the suite's environment, which has pyone, does not exist yet
            tx.tell(f"would register hook {template.name} (allocate or update)")
    elif not args.no_hooks and templates:
        oned = _oned(args.endpoint)
        hook_undo: list[Any] = []
        try:
            hooks = hookreg.register(oned, templates, args.dry_run, tx.tell, hook_undo)
        finally:
            for index, undo in enumerate(hook_undo):  # undone with the files if the run fails later
                tx.undo.append((f"hook change {index}", undo))
    server_enabled = bool(previous.get(hook_server.RECORD_KEY))
    started = False
    if args.enable_hook_server:
        started = hook_server.enable(tx, target, unit_changed, notes)
        server_enabled |= not target.staged
    if server_enabled and not started and (tx.changes or args.rebuilt_environment):
        hook_server.restart_after_commit(tx, target, unit_changed)
    environments = sorted(set(previous.get("environments", [])) | set(args.environment))
    record: dict[str, Any] = {"format": 1, "prefix": args.prefix, "files": files, "directories": created,
                              "hooks": hooks, "environments": environments}
    pci_filters = pcifilter.apply(tx, target, _frontend_config(target).pci_filter,
                                  previous.get(pcifilter.RECORD_KEY, {}), notes)
    if pci_filters:
        record[pcifilter.RECORD_KEY] = pci_filters
    vm_operations = vmops.apply(tx, target, previous.get(vmops.RECORD_KEY, {}), notes)
    if vm_operations:
        record[vmops.RECORD_KEY] = vm_operations
    if server_enabled:
        record[hook_server.RECORD_KEY] = True
    stage.write_record(tx, target, record, previous)
    return notes


def uninstall(args: argparse.Namespace, target: layout.Layout, tx: Transaction) -> list[str]:
    from aifactory_core.install import hook_server, hookreg, pcifilter, stage, vmops

    record = stage.load_record(target)
    if not record:
        raise UsageError(f"nothing to uninstall: no {target.path(target.manifest)}")
    notes: list[str] = []
    oned = None
    if not args.no_hooks and record.get("hooks"):
        oned = _oned(args.endpoint)  # connected, and pyone loaded, before the environments go
        hookreg.registered_hooks(oned)
    hook_server.stop_for_uninstall(tx, target, record, notes)
    pcifilter.remove(tx, target, record.get(pcifilter.RECORD_KEY, {}), notes)
    vmops.remove(tx, target, record.get(vmops.RECORD_KEY, {}), notes)
    stage.uninstall_files(tx, target, _placed_only(args, target, record, notes), notes)
    if oned is not None:
        hookreg.unregister(oned, sorted(record["hooks"]), args.dry_run, tx.tell)
    return notes


def _placed_only(args: argparse.Namespace, target: layout.Layout, record: dict[str, Any],
                 notes: list[str]) -> dict[str, Any]:
    """The manifest's files, environments and directories that this installer places: the manifest
    sits in a directory ``oneadmin`` owns, so root removes nothing else it names."""
    from aifactory_core.install import manifest, stage

    files = {entry.destination for entry in manifest.discover(args.source, args.prefix, target)}
    environments = {f"{args.prefix}/venv", target.host_env}
    return stage.trusted_record(record, files, environments, notes)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    destdir = Path(args.destdir)
    if not destdir.is_absolute() or not args.prefix.startswith("/") or (
            args.one_location and not args.one_location.startswith("/")):
        sys.stderr.write("aifactory-install: DESTDIR, --prefix and ONE_LOCATION must be absolute paths\n")
        return EXIT_USAGE
    target = layout.Layout(destdir, args.prefix, args.one_location.rstrip("/"))
    tx = Transaction(dry_run=args.dry_run, out=sys.stdout)
    try:
        notes = uninstall(args, target, tx) if args.mode == "uninstall" else install(args, target, tx)
    except (AifactoryError, OSError) as error:
        failed = tx.rollback()
        message = error.message if isinstance(error, AifactoryError) else str(error)
        sys.stderr.write(f"install.sh: {message}\n")
        sys.stderr.write("install.sh: rolled back: the target is as it was before this run\n" if not failed else
                         "install.sh: could not undo: " + "; ".join(failed) + "\n")
        return error.exit_status if isinstance(error, AifactoryError) and not isinstance(error, InstallError) else 1
    tx.commit()
    for note in notes:
        sys.stdout.write(f"note: {note}\n")
    if tx.changes == 0:
        sys.stdout.write("nothing to change: the installation is up to date\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
