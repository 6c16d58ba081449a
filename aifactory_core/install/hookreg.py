"""Registering the suite's hook templates with oned, idempotently by NAME.

A hook whose NAME is not registered is allocated (``one.hook.allocate``); one whose template
differs is updated (``one.hook.update``, replace); an identical one is left alone. Templates are
compared on the attributes OpenNebula's ``hook.xsd`` lists for ``HOOK/TEMPLATE``, plus any other
attribute the document carries (oned also returns ``TIMEOUT``, which the schema lacks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from aifactory_core.install.manifest import HookTemplate

if TYPE_CHECKING:
    from lxml import etree

SCHEMA_ATTRIBUTES = ("ARGUMENTS", "ARGUMENTS_STDIN", "CALL", "COMMAND", "LCM_STATE", "REMOTE", "RESOURCE", "STATE")
_UPPER_VALUES = ("ARGUMENTS_STDIN", "REMOTE")


@dataclass(frozen=True)
class RegisteredHook:
    hook_id: int
    name: str
    template: dict[str, str]


def desired_attributes(template: HookTemplate) -> dict[str, str]:
    from aifactory_core.one.template import parse_template

    return {key: value for key, value in parse_template(template.text, template.source)
            if isinstance(value, str) and key != "NAME"}


def registered_hooks(oned: Any) -> dict[str, RegisteredHook]:
    """The hooks oned knows, by NAME (``one.hookpool.info``)."""
    pool = oned.document("one.hookpool.info", -2, -1, -1)
    hooks: dict[str, RegisteredHook] = {}
    for hook in pool.findall("HOOK"):
        hooks[_text(hook, "NAME")] = RegisteredHook(int(_text(hook, "ID")), _text(hook, "NAME"), _template(hook))
    return hooks


def _text(element: etree._Element, tag: str) -> str:
    return (element.findtext(tag) or "").strip()


def _template(hook: etree._Element) -> dict[str, str]:
    attributes = {child.tag: (child.text or "") for child in hook.find("TEMPLATE") if isinstance(child.tag, str)}
    attributes["TYPE"] = _text(hook, "TYPE")
    return attributes


def _normal(key: str, value: str) -> str:
    return value.lower() if key == "TYPE" else value.upper() if key in _UPPER_VALUES else value


def differs(desired: dict[str, str], registered: dict[str, str]) -> bool:
    for key, value in desired.items():
        if key not in registered and key not in SCHEMA_ATTRIBUTES and key != "TYPE":
            continue  # an attribute the document does not carry (TIMEOUT on schema-shaped answers)
        if _normal(key, registered.get(key, "")) != _normal(key, value):
            return True
    return False


def plan(templates: Sequence[HookTemplate], current: dict[str, RegisteredHook]) -> list[tuple[str, HookTemplate]]:
    """``("allocate" | "update", template)`` for each template oned does not already hold."""
    steps: list[tuple[str, HookTemplate]] = []
    for template in templates:
        existing = current.get(template.name)
        if existing is None:
            steps.append(("allocate", template))
        elif differs(desired_attributes(template), existing.template):
            steps.append(("update", template))
    return steps


def _render(attributes: dict[str, str]) -> str:
    from aifactory_core.one.template import render_template

    return render_template(attributes)


def register(oned: Any, templates: Sequence[HookTemplate], dry_run: bool, say: Callable[[str], None],
             undo: list[Callable[[], None]]) -> dict[str, int]:
    """Allocate/update the hooks; returns NAME -> id; appends the undo of each change to ``undo``."""
    current = registered_hooks(oned)
    ids = {name: hook.hook_id for name, hook in current.items()}
    for action, template in plan(templates, current):
        say(("would " if dry_run else "") + f"{action} hook {template.name}")
        if dry_run:
            continue
        if action == "allocate":
            hook_id = int(oned.call("one.hook.allocate", template.text))
            ids[template.name] = hook_id
            undo.append(partial(oned.call, "one.hook.delete", hook_id))
        else:
            existing = current[template.name]
            oned.call("one.hook.update", existing.hook_id, template.text, 0)
            old = {key: value for key, value in existing.template.items() if key != "TYPE"}
            old_text = _render({"TYPE": existing.template["TYPE"], **old})
            undo.append(partial(oned.call, "one.hook.update", existing.hook_id, old_text, 0))
    return {template.name: ids.get(template.name, -1) for template in templates}


def unregister(oned: Any, names: Sequence[str], dry_run: bool, say: Callable[[str], None]) -> None:
    """Delete the named hooks that oned holds (by NAME: ids are looked up again)."""
    current = registered_hooks(oned)
    for name in names:
        hook = current.get(name)
        if hook is None:
            continue
        say(("would " if dry_run else "") + f"delete hook {name} (id {hook.hook_id})")
        if not dry_run:
            oned.call("one.hook.delete", hook.hook_id)
