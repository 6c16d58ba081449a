"""The VMM wrappers' entry point: :func:`main` with ``<action> <wrapper> <argv...>``.

``drivers/vmm/kvm/<action>`` runs ``python -c 'from aifactory_core.vmm_fast import main; ...'``
(``-m`` would load runpy, whose imports cost more than the fast path below).

Most VMs on a host hold no passthrough device, and for them a wrapped action changes nothing; yet
finding that out through :mod:`aifactory_core.vmm` (lxml, the plugin manager and its entry-point
discovery, the lifecycle machinery) cost ~0.25 s per action. This module imports nothing beyond
what the interpreter loads to start (``os``, ``sys``, ``_signal``) and first decides, from a few
reads, whether the full path could do anything for the VM. When it could not, the process
becomes OpenNebula's original action (``exec``: same argv, same stdin, the original's stdout,
stderr and exit status, as if the suite were not there). Otherwise it hands everything to
:func:`aifactory_core.vmm.main`, unchanged.

:func:`full_path_reason` names why a call takes the full path; it does whenever one of these holds:

- the action is not deploy, shutdown, cancel, save or migrate (restore always claims again), or
  its argv is not OpenNebula's shape with a plain decimal VM id (the full path refuses it);
- the VM has a journal (VMM or VNM) or an ownership record names it: something to give back, or a
  claim a deploy reuses; a state directory that cannot be read;
- deploy, the domain on stdin: not a plain ``<domain ...>`` document (an XML declaration, a
  DOCTYPE, a byte-order mark or a NUL byte first), or the bytes ``hostdev`` anywhere (a
  ``<hostdev>``, an ``<interface type='hostdev'>``, even in a comment), ``vcpupin`` (oned's NUMA
  pinning, which the cpu_pinning plugin plans), or ``&#`` (a character reference could spell
  ``hostdev`` in an attribute);
- deploy: the ``vm.xml`` beside the deployment file lists a ``<PCI>`` (a PCI device or NIC), or
  is not plain UTF-8 XML;
- deploy, the plugins: a tenant policy applies (the policy plugin decides every VM, with devices
  or not: its networks too), the configuration mentions the policy or cpu_pinning plugin at all
  (or holds a backslash, which could spell either), or an installed ``aifactory.plugins`` entry
  point is neither one of the suite's built-ins nor declared in ``aifactory.no_deploy_hooks`` (a
  vendor plugin's deploy hooks may act on any VM; the entry points are read from the
  distributions' ``entry_points.txt``, without importlib.metadata or pluggy).

Every built-in plugin acts at deploy only through the domain's hostdevs, except those two
(``tests/test_vmm_fast_path.py`` checks each against the full path). Not done for a VM left on
the fast path: parsing and validating the domain (libvirt parses it), validating the configuration
file, checking ``vm.xml``'s owner, and writing an empty journal; none of these changes the host.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half, loaded at start-up (signal imports enum)
import os
import sys

ENV_ORIGINAL_DIR = "AIFACTORY_VMM_ORIGINAL_DIR"
ENV_HOST_ROOT = "AIFACTORY_HOST_ROOT"
ENV_STATE_DIR = "AIFACTORY_STATE_DIR"
ENV_CONFIG = "AIFACTORY_CONFIG"
DEFAULT_STATE_DIR = "/var/lib/one/aifactory"
DEFAULT_CONFIG = "/etc/one/aifactory.conf"
DEFAULT_POLICY = "/etc/one/aifactory-policy.toml"
MAX_STDIN = 4 * 1024 * 1024
MAX_VM_DOCUMENT = 8 * 1024 * 1024
MAX_CONFIG = 1 << 20
MAX_VM_ID = 2**31 - 1
ENTRY_POINT_GROUP = "aifactory.plugins"
NO_DEPLOY_HOOKS_GROUP = "aifactory.no_deploy_hooks"
DEPLOY_HOOKS = ("aifactory_admit", "aifactory_prepare", "aifactory_domain_xml")
"""The hooks a deploy calls (:func:`aifactory_core.vmm.prepare_deploy`). A plugin implementing none
of them says so with an entry point of the same name and value in :data:`NO_DEPLOY_HOOKS_GROUP`;
:func:`aifactory_core.plugins.build_manager` refuses one that says so and implements one."""

ACTIONS: dict[str, tuple[int, int, int | None]] = {
    # action: (argument count, position of the VM id, position of the deployment file)
    "deploy": (4, 2, 0),
    "shutdown": (4, 2, None),
    "cancel": (4, 2, None),
    "save": (5, 3, None),
    "migrate": (5, 3, None),
}
BUILTIN_PLUGINS = {
    "pci_inventory": "aifactory_plugins.pci_inventory",
    "vfio": "aifactory_plugins.vfio",
    "nvidia_gpu": "aifactory_plugins.nvidia_gpu",
    "numa": "aifactory_plugins.numa",
    "sriov": "aifactory_plugins.sriov",
    "infiniband": "aifactory_plugins.infiniband",
    "bluefield": "aifactory_plugins.bluefield",
    "policy": "aifactory_plugins.policy",
    "cpu_pinning": "aifactory_plugins.cpu_pinning.plugin",
}
"""The suite's own plugins, as ``pyproject.toml`` registers them."""
CONFIG_WORDS = (b"policy", b"cpu_pinning", b"\\")
DOMAIN_WORDS = ((b"hostdev", "the domain mentions hostdev"),
                (b"vcpupin", "the domain pins vCPUs (vcpupin)"),
                (b"&#", "the domain holds a character reference"),
                (b"\0", "the domain holds a NUL byte"))
_SPACE = b" \t\r\n"
_UTF8 = (b"utf-8", b"utf8", b"us-ascii", b"ascii")


def _vm_id(text: str) -> int | None:
    """A plain decimal VM id; None for anything else (the full path's check decides on it)."""
    if not (text.isascii() and text.isdigit() and len(text) <= 10):
        return None
    number = int(text)
    return number if number <= MAX_VM_ID else None


def argv_reason(action: str, argv: list[str]) -> str | None:
    """Why the action's name or argv alone sends it to the full path; None when they do not."""
    shape = ACTIONS.get(action)
    if shape is None:
        return f"{action[:40]!r} has no fast path"
    count, vm_position, deployment_position = shape
    if len(argv) != count:
        return f"{len(argv)} arguments, not {count}"
    if _vm_id(argv[vm_position]) is None:
        return f"VM id {argv[vm_position][:40]!r} is not a plain number"
    if deployment_position is not None:
        path = argv[deployment_position]
        if not path.startswith("/") or ".." in path.split("/") or "\0" in path:
            return "the deployment file is not a plain absolute path"
    return None


def host_root() -> str | None:
    """The host root (``AIFACTORY_HOST_ROOT``, else ``/``); None when it is no directory."""
    root = os.environ.get(ENV_HOST_ROOT) or "/"
    return root if os.path.isdir(root) else None


def state_dir(root: str) -> str:
    """The state directory, as :attr:`aifactory_core.hostroot.HostRoot.state_dir` finds it."""
    return os.environ.get(ENV_STATE_DIR) or os.path.join(root, DEFAULT_STATE_DIR.lstrip("/"))


def vm_document(root: str, deployment_file: str) -> str:
    """The ``vm.xml`` beside the deployment file, under the host root (as
    :func:`aifactory_core.vmm.vm_document_of` finds it)."""
    directory = os.path.dirname(os.path.normpath(deployment_file)).lstrip("/")
    return os.path.join(root, directory, "vm.xml")


def journals(state: str, vm: int) -> tuple[str, str]:
    """The VM's VMM and VNM journals (:func:`aifactory_core.lifecycle.journal.journal_dir`)."""
    return os.path.join(state, "vms", f"{vm}.json"), os.path.join(state, "vnm", "vms", f"{vm}.json")


def state_reason(state: str, vm: int) -> str | None:
    """Why the state directory sends the VM to the full path: a journal, an ownership record
    naming it, or something that cannot be read."""
    for journal in journals(state, vm):
        try:
            os.lstat(journal)
        except FileNotFoundError:
            continue
        except OSError as error:
            return f"cannot tell whether {journal} exists ({error.strerror})"
        return f"VM {vm} has a journal ({journal})"
    owners = os.path.join(state, "owners")
    try:
        names = os.listdir(owners)
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"cannot list {owners} ({error.strerror})"
    for name in names:
        if name.startswith("."):
            continue
        path = os.path.join(owners, name)
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                text = os.read(descriptor, 64).strip()
            finally:
                os.close(descriptor)
        except OSError as error:
            return f"cannot read the ownership record {path} ({error.strerror})"
        if text.isdigit() and int(text) == vm:
            return f"VM {vm} holds device {name}"
    return None


def domain_reason(domain: bytes) -> str | None:
    """Why the domain document sends a deploy to the full path; None for a plain domain without
    devices or pinning."""
    if len(domain) > MAX_STDIN:
        return f"the domain is larger than {MAX_STDIN} bytes"
    body = domain.lstrip(_SPACE)
    if not body.startswith(b"<domain") or body[7:8] not in (b" ", b"\t", b"\r", b"\n", b">", b"/"):
        return "the domain is not a plain <domain> document"
    lowered = domain.lower()
    for word, reason in DOMAIN_WORDS:
        if word in lowered:
            return reason
    return None


def _plain_xml(data: bytes) -> bool:
    """No NUL byte, and an XML declaration (if any) names UTF-8 or ASCII: the document's markup is
    its ASCII bytes."""
    if b"\0" in data:
        return False
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.startswith(b"<?xml"):
        return True
    end = data.find(b"?>")
    declaration = (data[:end] if end >= 0 else data).lower()
    at = declaration.find(b"encoding")
    if at < 0:
        return True
    value = declaration[at + len(b"encoding"):].lstrip(_SPACE + b"=").lstrip(b"\"'")
    return value.split(b'"')[0].split(b"'")[0] in _UTF8


def vm_document_reason(path: str) -> str | None:
    """Why ``vm.xml`` sends a deploy to the full path: a ``<PCI>`` in it (a PCI device or NIC),
    or a document whose bytes cannot be read as its markup."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_VM_DOCUMENT + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"cannot read {path} ({error.strerror})"
    if len(data) > MAX_VM_DOCUMENT:
        return f"{path} is larger than {MAX_VM_DOCUMENT} bytes"
    if not _plain_xml(data):
        return f"{path} is not plain UTF-8 XML"
    if b"<pci" in data.lower():
        return f"{path} lists a PCI device or NIC"
    return None


def entry_points(text: str) -> dict[str, list[tuple[str, str]]] | None:
    """The ``aifactory.plugins`` and ``aifactory.no_deploy_hooks`` entries of an
    ``entry_points.txt`` as (name, value), read as :mod:`importlib.metadata` reads it; None when a
    line of those groups is not ``name = value``."""
    found: dict[str, list[tuple[str, str]]] = {ENTRY_POINT_GROUP: [], NO_DEPLOY_HOOKS_GROUP: []}
    group: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            group = line.strip("[]")
            continue
        if group in found:
            name, equals, value = line.partition("=")
            if not equals:
                return None
            found[group].append((name.strip(), value.strip()))
    return found


def installed_plugins() -> tuple[list[tuple[str, str]], set[tuple[str, str]]] | str:
    """Every ``aifactory.plugins`` entry point on the module path and those declared in
    ``aifactory.no_deploy_hooks``, read from the distributions' ``entry_points.txt`` as
    :mod:`importlib.metadata` finds them; a reason string when they cannot be listed this way."""
    plugins: list[tuple[str, str]] = []
    declared: set[tuple[str, str]] = set()
    for entry in sys.path:
        directory = entry or "."
        try:
            names = os.listdir(directory)
        except NotADirectoryError:
            return f"{directory} on the module path is not a directory (its plugins are not listed here)"
        except OSError:
            continue
        for name in names:
            if not name.lower().endswith((".dist-info", ".egg-info")):
                continue
            path = os.path.join(directory, name, "entry_points.txt")
            try:
                with open(path, "rb") as stream:
                    text = stream.read().decode("utf-8")
            except OSError:
                continue
            except UnicodeDecodeError:
                return f"{path} is not UTF-8"
            groups = entry_points(text)
            if groups is None:
                return f"{path} has a malformed line"
            plugins += groups[ENTRY_POINT_GROUP]
            declared.update(groups[NO_DEPLOY_HOOKS_GROUP])
    return plugins, declared


def plugins_reason() -> str | None:
    """Why the installed plugins, or the configuration, could act on a VM without devices."""
    explicit = os.environ.get(ENV_CONFIG)
    path = explicit or DEFAULT_CONFIG
    try:
        with open(path, "rb") as stream:
            config = stream.read(MAX_CONFIG + 1)
    except FileNotFoundError:
        if explicit:
            return f"the configuration {path} is missing"
        config = b""
    except OSError as error:
        return f"cannot read the configuration {path} ({error.strerror})"
    if len(config) > MAX_CONFIG:
        return f"the configuration {path} is larger than {MAX_CONFIG} bytes"
    lowered = config.lower()
    for word in CONFIG_WORDS:
        if word in lowered:
            return f"the configuration {path} mentions {word.decode()!r}"
    if os.path.exists(DEFAULT_POLICY):
        return f"a tenant policy applies ({DEFAULT_POLICY})"
    found = installed_plugins()
    if isinstance(found, str):
        return found
    plugins, declared = found
    for plugin, module in plugins:
        if BUILTIN_PLUGINS.get(plugin) != module and (plugin, module) not in declared:
            return (f"plugin {plugin[:40]!r} ({module[:80]}) is no built-in and does not declare itself in "
                    f"{NO_DEPLOY_HOOKS_GROUP}")
    return None


def full_path_reason(action: str, argv: list[str], domain: bytes | None = None) -> str | None:
    """Why this call takes the full path (:mod:`aifactory_core.vmm`); None when the suite has
    nothing to do for it and the original may run alone. ``domain``: deploy's stdin."""
    reason = argv_reason(action, argv)
    if reason is not None:
        return reason
    _count, vm_position, deployment_position = ACTIONS[action]
    vm = int(argv[vm_position])
    root = host_root()
    if root is None:
        return "the host root is not a directory"
    reason = state_reason(state_dir(root), vm)
    if reason is not None or deployment_position is None:
        return reason
    if domain is None:
        return "no domain"
    return (domain_reason(domain) or vm_document_reason(vm_document(root, argv[deployment_position]))
            or plugins_reason())


def original_of(wrapper: str, action: str) -> str:
    """OpenNebula's original action, kept beside the wrapper as ``<action>.one``."""
    directory = os.environ.get(ENV_ORIGINAL_DIR) or os.path.dirname(os.path.abspath(wrapper))
    return os.path.join(directory, f"{action}.one")


def _default_signals() -> list[tuple[int, object]]:
    """Python ignores SIGPIPE and SIGXFSZ; the original gets them back at their defaults, as
    ``subprocess`` gives them to a child. Returns what they were, for :func:`_put_back`."""
    before = []
    for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ"):
        number = getattr(_signal, name, None)
        if number is not None:
            before.append((number, _signal.signal(number, _signal.SIG_DFL)))
    return before


def _put_back(handlers: list[tuple[int, object]]) -> None:
    for number, handler in handlers:
        _signal.signal(number, handler)


def exec_original(original: str, argv: list[str], stdin: bytes | None) -> None:
    """Become ``original`` with ``argv``; ``stdin`` (already read) is handed on in a memory file.
    Returns only when that could not be done (the caller then takes the full path)."""
    if stdin is not None:
        if not hasattr(os, "memfd_create"):
            return
        try:
            descriptor = os.memfd_create("aifactory-domain")
            try:
                view = memoryview(stdin)
                while view:
                    view = view[os.write(descriptor, view):]
                os.lseek(descriptor, 0, os.SEEK_SET)
                os.dup2(descriptor, 0)
            finally:
                os.close(descriptor)
        except OSError:
            return
    handlers = _default_signals()
    try:
        os.execv(original, [original, *argv])
    except OSError:
        _put_back(handlers)


def main(args: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if args is None else args
    stdin: bytes | None = None
    if len(arguments) >= 2:
        action, wrapper, argv = arguments[0], arguments[1], arguments[2:]
        if action == "deploy" and argv_reason(action, argv) is None:
            stdin = sys.stdin.buffer.read(MAX_STDIN + 1)
        if full_path_reason(action, argv, stdin) is None:
            original = original_of(wrapper, action)
            if os.access(original, os.X_OK):
                exec_original(original, argv, stdin)
    from aifactory_core.vmm import main as full_path

    return full_path(arguments, stdin=stdin)


if __name__ == "__main__":
    raise SystemExit(main())
