"""The action table (``aifactory_core.vmm_actions``) against OpenNebula's own VMM driver source.

OpenNebula's ``src/vmm_mad/exec/one_vmm_exec.rb`` builds every remote action as a step hash,
``{:driver => :vmm, :action => :save, :parameters => [:deploy_id, :checkpoint_file, :host]}``, and
``OpenNebulaDriver#do_action`` (``src/mad/ruby/OpenNebulaDriver.rb``) appends ``<vmid> <host>``
unless the step says ``:no_extra_params``. The source is read at test time, straight out of the
release tarballs in ``../shared/opennebula/src`` (never copied into this repository).
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import needs
import pytest

from aifactory_core import vmm_actions
from aifactory_core.vmm_actions import ACTIONS, CHECKED_VERSIONS

REPO = Path(__file__).resolve().parent.parent
TARBALLS = REPO.parent / "shared" / "opennebula" / "src"
DRIVER = "src/vmm_mad/exec/one_vmm_exec.rb"
DO_ACTION = "src/mad/ruby/OpenNebulaDriver.rb"
SHAPE_CHANGED = "OpenNebula's driver source changed shape: read it and update aifactory_core/vmm_actions.py " \
                "and this parser"

# Upstream's names for an argument, where they differ from the table's: the deploy step passes the
# local variable ``dfile`` (the remote deployment file), a failed deploy's rollback cancels with
# ``:deploy_info`` (deploy's stdout, the deploy id), attach_nic calls the bridge ``source``.
UPSTREAM_NAMES = {"dfile": vmm_actions.DEPLOYMENT_FILE, "deploy_info": vmm_actions.DEPLOY_ID, "source": "bridge"}


@cache
def upstream_sources(version: str) -> dict[str, str]:
    """The driver files of OpenNebula ``version``, read out of its release tarball in one pass."""
    tarball = TARBALLS / f"one-release-{version}.tar.gz"
    if not tarball.is_file():
        needs.unavailable(f"{tarball} missing: OpenNebula {version}'s source is needed to check the action table")
    wanted = {f"one-release-{version}/{path}": path for path in (DRIVER, DO_ACTION)}
    found: dict[str, str] = {}
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:
            if member.name in wanted and member.isfile():
                extracted = archive.extractfile(member)
                assert extracted is not None
                found[wanted[member.name]] = extracted.read().decode("utf-8")
                if len(found) == len(wanted):
                    break
    missing = sorted(set(wanted.values()) - set(found))
    assert not missing, f"{tarball.name} has no {', '.join(missing)}: {SHAPE_CHANGED}"
    return found


# ----------------------------------------------------------------------------------------------
# A reader for the little of Ruby one_vmm_exec.rb's step hashes use.

@dataclass(frozen=True)
class Method:
    name: str
    parameters: tuple[str, ...]
    body: str


@dataclass(frozen=True)
class VmmStep:
    """A ``:driver => :vmm`` step: the action script it runs and the argv it builds."""

    method: str
    action: str
    parameters: tuple[str, ...]
    extra_params: bool
    destination: bool


_DEF = re.compile(r"^(?P<indent>[ \t]*)def (?P<name>\w+)(?:\((?P<params>[^)]*)\))?[ \t]*$", re.MULTILINE)
_SYMBOL = re.compile(r"\A:(\w+)\Z")
_IDENTIFIER = re.compile(r"\A[a-z_]\w*\Z")
_ACTION_CONSTANT = re.compile(r"\AACTION\[:(\w+)\]\Z")


def _key(name: str) -> str:
    """A step-hash key in either Ruby spelling, ``:name =>`` or ``name:``."""
    return rf"(?::{name}\s*=>|\b{name}:)\s*"


def ruby_methods(source: str) -> dict[str, Method]:
    """Every ``def``, its parameters and its body (up to the ``end`` at the ``def``'s indentation)."""
    methods: dict[str, Method] = {}
    for match in _DEF.finditer(source):
        end = re.compile(rf"^{match['indent']}end\b", re.MULTILINE).search(source, match.end())
        assert end is not None, f"def {match['name']} has no end at its indentation: {SHAPE_CHANGED}"
        parameters = tuple(part.strip().split("=")[0].strip() for part in (match["params"] or "").split(",")
                           if part.strip())
        methods[match["name"]] = Method(match["name"], parameters, source[match.end():end.start()])
    return methods


def _own_text(inner: str) -> str:
    """A brace group's content with the groups nested in it blanked out."""
    own: list[str] = []
    depth = 0
    for char in inner:
        depth += char == "{"
        own.append(" " if depth else char)
        depth -= char == "}" and depth > 0
    return "".join(own)


def _hashes(text: str) -> list[str]:
    """Every brace group's own text (hashes, blocks, string interpolations alike)."""
    groups: list[str] = []
    opened: list[int] = []
    for index, char in enumerate(text):
        if char == "{":
            opened.append(index)
        elif char == "}" and opened:
            groups.append(_own_text(text[opened.pop() + 1:index]))
    return groups


def _split_arguments(text: str) -> list[str]:
    return [part.strip() for part in text.replace("\n", " ").split(",") if part.strip()]


def _calls(source: str, method: Method) -> list[list[str]]:
    """The argument lists of every call of ``method`` in ``source`` (its own ``def`` excepted)."""
    return [_split_arguments(match[1]) for match in re.finditer(rf"(?<!def )\b{method.name}\(([^)]*)\)", source)]


def _action_names(token: str, method: Method, source: str) -> list[str]:
    """The scripts a step's ``:action`` names: a symbol, ``ACTION[:name]``, or a parameter of the
    enclosing method, resolved through every call that passes it a symbol."""
    if symbol := _SYMBOL.match(token) or _ACTION_CONSTANT.match(token):
        return [symbol[1]]
    if token in method.parameters:
        position = method.parameters.index(token)
        names = [arguments[position] for arguments in _calls(source, method) if len(arguments) > position]
        return [name[1:] for name in names if _SYMBOL.match(name)]
    return []  # a shell command (mkdir, cat): not an action script


def vmm_steps(source: str) -> list[VmmStep]:
    steps: list[VmmStep] = []
    for method in ruby_methods(source).values():
        for own in _hashes(method.body):
            if not re.search(_key("driver") + r":vmm\b", own):
                continue
            action = re.search(_key("action") + r"([^,\n]+)", own)
            assert action is not None, f"a :vmm step in {method.name} names no :action: {SHAPE_CHANGED}"
            listed = re.search(_key("parameters") + r"\[([^\]]*)\]", own, re.DOTALL)
            parameters = tuple(_split_arguments(listed[1])) if listed else ()
            for name in _action_names(action[1].strip(), method, source):
                steps.append(VmmStep(method.name, name, parameters,
                                     extra_params=not re.search(_key("no_extra_params") + "true", own),
                                     destination=bool(re.search(_key("destination") + "true", own))))
    return steps


_DO_ACTION = re.compile(r"\bdo_action\(\s*(?P<params>\"[^\"]*\"|[a-z_]\w*(?:\.to_s)?)\s*,\s*id\s*,\s*host\s*,"
                        r"\s*ACTION\[:(?P<action>\w+)\](?P<options>[^)]*)\)")


def direct_steps(source: str) -> list[VmmStep]:
    """Actions a method runs with ``do_action(params, id, host, ACTION[:name], ...)`` itself (no
    step hash): ``resize``, ``snapshot_create``. ``params`` is one variable or a string of
    ``#{variable}`` words; ``:script_name`` names the script when given."""
    steps: list[VmmStep] = []
    for method in ruby_methods(source).values():
        for call in _DO_ACTION.finditer(method.body):
            params = call["params"]
            if params.startswith('"'):
                words = params[1:-1].split()
                assert all(re.fullmatch(r"#\{\w+\}", word) for word in words), f"{method.name}: {SHAPE_CHANGED}"
                names = tuple(word[2:-1] for word in words)
            else:
                names = (params.removesuffix(".to_s"),)
            script = re.search(_key("script_name") + r"'(\w+)'", call["options"])
            steps.append(VmmStep(method.name, script[1] if script else call["action"], names,
                                 extra_params=not re.search(_key("no_extra_params") + "true", call["options"]),
                                 destination=False))
    return steps


def table_names(step: VmmStep) -> tuple[str, ...]:
    """A step's arguments in the table's names. A step run on the migration's other host
    (``:destination``) passes that host as ``:dest_host``: there it is the host the script runs on."""
    names = []
    for token in step.parameters:
        name = token[1:] if _SYMBOL.match(token) else token
        assert _SYMBOL.match(token) or _IDENTIFIER.match(token), \
            f"{step.method}: {step.action} gets {token!r}, neither a symbol nor a variable: {SHAPE_CHANGED}"
        if step.destination and name == vmm_actions.DEST_HOST:
            name = vmm_actions.HOST
        names.append(UPSTREAM_NAMES.get(name, name))
    return tuple(names)


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", CHECKED_VERSIONS)
def test_opennebula_appends_the_vm_id_and_host_to_every_vmm_step(version: str) -> None:
    do_action = upstream_sources(version)[DO_ACTION]
    appended = re.search(r'params\s*=\s*"#\{params\} #\{id\} #\{host\}"\s*unless\s+options\[:no_extra_params\]',
                         do_action)
    assert appended, f"{version}: OpenNebulaDriver#do_action no longer appends '<vmid> <host>': {SHAPE_CHANGED}"
    driver = upstream_sources(version)[DRIVER]
    assert re.search(r"if step\[:destination\]\s*host\s*=\s*@data\[:dest_host\]", driver), \
        f"{version}: a :destination step no longer runs on :dest_host: {SHAPE_CHANGED}"


@pytest.mark.parametrize("version", CHECKED_VERSIONS)
@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_every_action_gets_the_argv_the_table_says(version: str, action: str) -> None:
    source = upstream_sources(version)[DRIVER]
    steps = [step for step in vmm_steps(source) + direct_steps(source) if step.action == action]
    assert steps, f"{version}: no :vmm step runs {action!r} in {DRIVER}: {SHAPE_CHANGED}"
    expected = ACTIONS[action]
    for step in steps:
        where = f"{version} {DRIVER}, def {step.method}"
        assert step.extra_params, f"{where}: {action} without '<vmid> <host>' appended"
        assert table_names(step) == expected.parameters, \
            f"{where}: {action} gets {step.parameters}, the table says {expected.parameters}"
        assert len(step.parameters) == expected.position(vmm_actions.VM_ID), where


@pytest.mark.parametrize("version", CHECKED_VERSIONS)
def test_the_reader_finds_each_action_where_its_method_builds_it(version: str) -> None:
    """The reader itself: each action is built by the driver method of its name (shutdown and
    cancel through destroy, reboot and reset through restart), and cancel also by the rollbacks."""
    source = upstream_sources(version)[DRIVER]
    steps = vmm_steps(source) + direct_steps(source)
    built_by = {(step.action, step.method) for step in steps}
    for action in ACTIONS:
        delegate = {"shutdown": "destroy", "cancel": "destroy", "reboot": "restart", "reset": "restart",
                    "prereconfigure": "attach_nic", "reconfigure": "attach_nic"}
        assert (action, delegate.get(action, action)) in built_by, f"{version}: {action}"
    assert {method for action, method in built_by if action == "cancel"} >= {"deploy", "restore", "cleanup"}
    assert not [step for step in steps if step.action in ("mkdir", "cat")]
    direct = {(step.action, step.parameters) for step in direct_steps(source)}
    assert {("resize", ("deploy_id",)), ("snapshot_create", ("deploy_id", "snap_id")),
            ("poll", ("deploy_id", "host"))} <= direct


def test_every_wrapper_script_is_a_wrapped_action_of_the_table() -> None:
    scripts = {path.name for path in (REPO / "drivers" / "vmm" / "kvm").iterdir() if path.is_file()}
    assert scripts == {name for name, action in ACTIONS.items() if action.wrapped}
    assert vmm_actions.RELEASING <= scripts


def test_the_argv_positions_the_wrapper_reads() -> None:
    assert ACTIONS["save"].position(vmm_actions.VM_ID) == 3
    assert ACTIONS["migrate"].position(vmm_actions.VM_ID) == 3
    assert ACTIONS["restore"].position(vmm_actions.VM_ID) == 3
    assert ACTIONS["restore"].position(vmm_actions.DEPLOY_ID) == 2
    assert ACTIONS["deploy"].position(vmm_actions.VM_ID) == 2
    assert ACTIONS["cancel"].position(vmm_actions.DEPLOY_ID) == 0


def test_every_lifecycle_step_names_a_known_action() -> None:
    for event in vmm_actions.EVENTS:
        for step in event.steps:
            assert step.action in ACTIONS or step.action in ("vnm pre", "vnm post", "vnm clean"), event.event
    used = {step.action for event in vmm_actions.EVENTS for step in event.steps}
    assert set(ACTIONS) <= used, f"actions no event runs: {sorted(set(ACTIONS) - used)}"


def test_docs_lifecycle_holds_the_table_rendered_from_the_code() -> None:
    document = (REPO / "docs" / "lifecycle.md").read_text(encoding="utf-8")
    assert vmm_actions.render_table() in document, \
        "docs/lifecycle.md's table differs from aifactory_core.vmm_actions: paste render_table()'s output"
