"""The ``aifactory`` command line.

Each sub-command lives in its own module ``aifactory_core.cli.cmd_<name>`` that exposes
``add_parser(subparsers)`` and ``run(args, context) -> int``; modules are imported only when their
command runs, so ``aifactory probe ...`` never pays for the imports of ``aifactory tenant ...``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aifactory_core import __version__
from aifactory_core.errors import EXIT_USAGE, AifactoryError

if TYPE_CHECKING:
    import pluggy

    from aifactory_core.config import Config
    from aifactory_core.hostroot import HostRoot
    from aifactory_core.plugins import LoadedPlugin

# command name -> (module under aifactory_core.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "plugins": ("cmd_plugins", "list loaded plugins and the hooks they implement"),
    "inventory": ("cmd_inventory", "show the host's devices, NUMA nodes and IOMMU groups"),
    "doctor": ("cmd_doctor", "check the host's readiness for GPU/NIC passthrough"),
    "device": ("cmd_device", "bind/release devices the way the VMM driver does; who holds what"),
    "repair": ("cmd_repair", "finish or roll back interrupted device transactions"),
    "vm": ("cmd_vm", "show what the suite reads from an OpenNebula VM document"),
    "tenant": ("cmd_tenant", "check, show and apply the tenant policy (groups, VDCs, ACLs, quotas)"),
    "usage": ("cmd_usage", "GPU-hours and cost per VM and tenant (showback)"),
    "plan": ("cmd_plan", "show a VM's CPU/NUMA placement and the domain XML that carries it"),
    "probe": ("cmd_probe", "print an OpenNebula IM probe's output (host-system, vm-monitor)"),
    "metrics": ("cmd_metrics", "GPU and host metrics in Prometheus text format"),
    "host-setup": ("cmd_host_setup", "as root on a host: root helper environment, sudoers, boot repair unit"),
    "eswitch": ("cmd_eswitch", "show or apply the switchdev mode [plugin.bluefield] asks for (devlink)"),
    "vf-pool": ("cmd_vf_pool", "show or resize an SR-IOV PF's VF pool (refused while VFs are in use)"),
    "hook-server": ("cmd_hook_server", "on the frontend: decide admission/accounting hook events in one process"),
}
_GLOBAL_OPTIONS_WITH_VALUE = {"--host-root", "--config", "--log-level"}


@dataclass
class Context:
    """What every command gets: the resolved global options, loaded on first use."""

    host_root_option: str | None
    config_option: str | None
    debug: bool
    _host: HostRoot | None = None
    _config: Config | None = None
    _plugins: tuple[pluggy.PluginManager, list[LoadedPlugin]] | None = None

    @property
    def host(self) -> HostRoot:
        if self._host is None:
            from aifactory_core.hostroot import HostRoot
            from aifactory_core.samples import resolve_host_root_option

            self._host = HostRoot.resolve(resolve_host_root_option(self.host_root_option))
        return self._host

    @property
    def config(self) -> Config:
        if self._config is None:
            from aifactory_core.config import load_config

            self._config = load_config(self.config_option)
        return self._config

    @property
    def plugins(self) -> tuple[pluggy.PluginManager, list[LoadedPlugin]]:
        """The plugin manager and what it loaded (built on first use)."""
        if self._plugins is None:
            from aifactory_core.plugins import build_manager

            self._plugins = build_manager(self.config)
        return self._plugins


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"aifactory: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="aifactory", description="OpenNebula AI factory host tooling")
    parser.add_argument("--version", action="version", version=f"aifactory {__version__}")
    parser.add_argument(
        "--host-root",
        metavar="DIR",
        help="directory standing for / (sysfs at DIR/sys); 'sample:h100-sxm5-vm' for the bundled "
        "H100 capture; default $AIFACTORY_HOST_ROOT or /",
    )
    parser.add_argument("--config", metavar="FILE", help="config file (default /etc/one/aifactory.conf)")
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        if name == selected:  # only the command that runs pays for its module's import
            importlib.import_module(f"aifactory_core.cli.{module}").add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def selected_command(argv: Sequence[str]) -> str | None:
    """The sub-command named in argv (skipping the values of global options)."""
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in _GLOBAL_OPTIONS_WITH_VALUE:
            skip = True
        elif not token.startswith("-"):
            return token if token in COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(selected_command(args_list))
    try:
        args = parser.parse_args(args_list)
    except AifactoryError as error:  # raised by an option's own type check (argparse passes it on)
        sys.stderr.write(f"aifactory: {error.message}\n")
        return error.exit_status
    logging.basicConfig(level=args.log_level.upper(), format="aifactory: %(levelname)s: %(message)s")
    debug = args.debug or os.environ.get("AIFACTORY_DEBUG") == "1"
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    context = Context(args.host_root, args.config, debug)
    module = importlib.import_module(f"aifactory_core.cli.{COMMANDS[args.command][0]}")
    try:
        return int(module.run(args, context))
    except AifactoryError as error:
        if debug:
            raise
        sys.stderr.write(f"aifactory: {error.message}\n")
        return error.exit_status
    except KeyboardInterrupt:
        sys.stderr.write("aifactory: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as error:  # a defect, not bad input: one line unless --debug asks for more
        if debug:
            raise
        sys.stderr.write(f"aifactory: internal error: {type(error).__name__}: {error} (rerun with --debug)\n")
        return 1


def entry_point() -> None:
    raise SystemExit(main())
