"""The probes' template writer: OpenNebula template syntax with the rules of
:mod:`aifactory_core.one.template`, in a module that loads in microseconds.

``aifactory_core.one.template`` is the reference (its reader parses what this writes; the tests
check that both writers produce the same bytes for every attribute the probes emit and for hostile
values). It is not imported here because it pulls in ``dataclasses``/``inspect`` (~12 ms), which
alone would exceed the probes' start-up budget. A value the syntax cannot carry is not refused with
an exception as the reference does — a probe must never fail — but cleaned: characters XML cannot
hold are dropped, ``]]>`` is broken up and a trailing backslash is removed.
"""

from __future__ import annotations

import base64
import re

KEY = re.compile(r"\A[A-Z0-9_]+\Z")
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    Attributes = Iterable[tuple[str, object]]


def clean(value: object) -> str:
    """Text OpenNebula's lexer and XML storage can carry (None becomes the empty string)."""
    if value is None:
        return ""
    text = str(int(value)) if isinstance(value, bool) else str(value)
    text = _NOT_XML.sub("", text).replace("]]>", "]] >")
    return text.rstrip("\\")


def quote(value: object) -> str:
    return '"' + clean(value).replace('"', '\\"') + '"'


def attribute(key: str, value: object) -> str:
    """``KEY="value"`` or ``KEY=[ A="1", B="x" ]`` on one line."""
    if not KEY.match(key):
        raise ValueError(f"invalid attribute name {key!r}")
    if isinstance(value, dict):
        for name in value:
            if not KEY.match(name):
                raise ValueError(f"invalid attribute name {key}/{name!r}")
        pairs = ", ".join(f"{name}={quote(item)}" for name, item in value.items())
        return f"{key}=[ {pairs} ]" if pairs else f"{key}=[ ]"
    return f"{key}={quote(value)}"


def template(attributes: Attributes) -> str:
    return "".join(attribute(key, value) + "\n" for key, value in attributes)


def vm_line(vm_id: int, deploy_id: str, attributes: Attributes) -> str:
    """``VM = [ ID="42", DEPLOY_ID="one-42", MONITOR="<base64>" ]`` as ``domain.rb`` writes it."""
    encoded = base64.b64encode(template(attributes).encode("utf-8")).decode("ascii")
    return f'VM = [ ID="{int(vm_id)}", DEPLOY_ID={quote(deploy_id)}, MONITOR="{encoded}" ]'
