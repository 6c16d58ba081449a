"""The envelopes around a VM: hook ``$TEMPLATE``/``$API``, hook messages, ``VMM_DRIVER_ACTION_DATA``.

* ``$TEMPLATE`` (state and API hooks): base64 of the ``<VM>`` element.
* ``$API`` (API hooks): base64 of ``<CALL_INFO>`` (``HookAPI::format_message``): RESULT 1/0, the IN
  parameters (session hidden as ``****``), the OUT parameters, and ``EXTRA`` (the object XML, only
  for ``one.*.allocate``/``one.*.delete``). It carries neither the method name (that is the
  enclosing ``HOOK_MESSAGE/CALL``) nor the caller's user or group.
* ``HOOK_MESSAGE``: the whole decoded event (state hooks: ``HOOK_OBJECT``, ``STATE``, ``VM``).
* ``VMM_DRIVER_ACTION_DATA``: what oned sends the VMM driver (``HOST``, ``DEPLOY_ID``, deployment
  file paths, the ``<VM>``); shutdown/cancel/... remote scripts get it, plain, on stdin.

:func:`parse_vm_payload` accepts any of these carrying a VM, as XML or base64.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from aifactory_core.errors import DocumentError
from aifactory_core.one.vm import VmRequest, _jsonable, _Node, vm_from_element
from aifactory_core.one.xmlsafe import DEFAULT_MAX_BYTES, decode_base64, looks_like_xml, parse_xml

if TYPE_CHECKING:
    from lxml import etree

Encoding = Literal["auto", "xml", "base64"]


def load_document(
    data: bytes | str,
    what: str = "document",
    *,
    encoding: Encoding = "auto",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> etree._Element:
    """Parse XML, or base64 of XML; ``auto`` decides by whether the text starts with '<'."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if encoding == "auto":
        encoding = "xml" if looks_like_xml(raw) else "base64"
    if encoding == "base64":
        raw = decode_base64(raw, what, max_bytes=max_bytes)
    elif encoding != "xml":
        raise DocumentError(f"unknown document encoding {encoding!r}")
    return parse_xml(raw, what, max_bytes=max_bytes)


def vm_element_of(root: etree._Element) -> tuple[etree._Element, str]:
    """The ``<VM>`` inside any envelope that carries one, and its path for messages."""
    tag = root.tag
    if tag == "VM":
        return root, "VM"
    if tag in ("VMM_DRIVER_ACTION_DATA", "HOOK_MESSAGE"):
        found = root.find("VM")
        if found is not None:
            return found, f"{tag}/VM"
        found = root.find("CALL_INFO/EXTRA/VM")
        if found is not None:
            return found, f"{tag}/CALL_INFO/EXTRA/VM"
        raise DocumentError(f"<{tag}> carries no <VM>")
    if tag == "CALL_INFO":
        found = root.find("EXTRA/VM")
        if found is not None:
            return found, "CALL_INFO/EXTRA/VM"
        raise DocumentError("<CALL_INFO> carries no <VM> in EXTRA (only one.vm.allocate/delete do)")
    raise DocumentError(
        f"expected <VM>, <VMM_DRIVER_ACTION_DATA>, <HOOK_MESSAGE> or <CALL_INFO>, found <{tag}>"
    )


def parse_vm_payload(
    data: bytes | str,
    what: str = "VM document",
    *,
    encoding: Encoding = "auto",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> VmRequest:
    """A :class:`VmRequest` from a VM document in any of the envelopes, XML or base64."""
    root = load_document(data, what, encoding=encoding, max_bytes=max_bytes)
    element, path = vm_element_of(root)
    return vm_from_element(element, path)


@dataclass(frozen=True)
class DriverAction:
    """A decoded ``VMM_DRIVER_ACTION_DATA``."""

    host: str | None
    migr_host: str | None
    deploy_id: str | None
    local_deployment_file: str | None
    remote_deployment_file: str | None
    checkpoint_file: str | None
    vm: VmRequest

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "migr_host": self.migr_host,
            "deploy_id": self.deploy_id,
            "local_deployment_file": self.local_deployment_file,
            "remote_deployment_file": self.remote_deployment_file,
            "checkpoint_file": self.checkpoint_file,
            "vm": self.vm.to_dict(),
        }


def driver_action_from_element(root: etree._Element) -> DriverAction:
    if root.tag != "VMM_DRIVER_ACTION_DATA":
        raise DocumentError(f"expected <VMM_DRIVER_ACTION_DATA>, found <{root.tag}>")
    node = _Node(root, "VMM_DRIVER_ACTION_DATA")
    element, path = vm_element_of(root)
    return DriverAction(
        host=node.token("HOST"),
        migr_host=node.token("MIGR_HOST"),
        deploy_id=node.token("DEPLOY_ID"),
        local_deployment_file=node.text("LOCAL_DEPLOYMENT_FILE"),
        remote_deployment_file=node.text("REMOTE_DEPLOYMENT_FILE"),
        checkpoint_file=node.text("CHECKPOINT_FILE"),
        vm=vm_from_element(element, path),
    )


def parse_driver_action(
    data: bytes | str, what: str = "VMM_DRIVER_ACTION_DATA", *, encoding: Encoding = "auto"
) -> DriverAction:
    """Parse ``VMM_DRIVER_ACTION_DATA`` (plain XML as on a remote script's stdin, or base64)."""
    return driver_action_from_element(load_document(data, what, encoding=encoding))


@dataclass(frozen=True)
class CallParameter:
    """One ``PARAMETER`` of ``CALL_INFO``. ``value`` is the text content; ``structured`` is True
    when the raw (unescaped) IN value contained markup that became child elements."""

    position: int
    direction: Literal["IN", "OUT"]
    value: str
    structured: bool = False

    @property
    def hidden(self) -> bool:
        return self.value == "****"


@dataclass(frozen=True)
class CallInfo:
    """The ``$API`` payload of an API hook (and, with ``method``, of its ``HOOK_MESSAGE``)."""

    method: str | None
    success: bool
    parameters: tuple[CallParameter, ...]
    extra_vm: VmRequest | None

    def inputs(self) -> Mapping[int, str]:
        return {item.position: item.value for item in self.parameters if item.direction == "IN"}

    def outputs(self) -> Mapping[int, str]:
        return {item.position: item.value for item in self.parameters if item.direction == "OUT"}

    @property
    def object_id(self) -> int | None:
        """OUT 2 of a successful call: the id of the object it created or acted on."""
        value = self.outputs().get(2)
        if not self.success or value is None or not value.isdigit() or len(value) > 10:
            return None
        return int(value)

    @property
    def error(self) -> str | None:
        """OUT 2 of a failed call: OpenNebula's error message."""
        return None if self.success else self.outputs().get(2)

    @property
    def owner_uid(self) -> int | None:
        """Owner of the object in EXTRA (allocate/delete only); CALL_INFO names no caller."""
        return None if self.extra_vm is None else self.extra_vm.uid

    @property
    def owner_gid(self) -> int | None:
        return None if self.extra_vm is None else self.extra_vm.gid

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "success": self.success,
            "parameters": [
                {"position": p.position, "direction": p.direction, "value": p.value, "structured": p.structured}
                for p in self.parameters
            ],
            "object_id": self.object_id,
            "error": self.error,
            "extra_vm": _jsonable(self.extra_vm),
        }


def call_info_from_element(root: etree._Element, method: str | None = None) -> CallInfo:
    """Read ``<CALL_INFO>`` or an API ``<HOOK_MESSAGE>`` (which also gives the method name)."""
    if root.tag == "HOOK_MESSAGE":
        hook = _Node(root, "HOOK_MESSAGE")
        hook_type = (hook.text("HOOK_TYPE") or "").strip()
        if hook_type != "API":
            raise DocumentError(f"HOOK_MESSAGE/HOOK_TYPE is {hook_type!r}, not API")
        method = hook.token("CALL")
        found = root.find("CALL_INFO")
        if found is None:
            raise DocumentError("HOOK_MESSAGE carries no CALL_INFO")
        root, prefix = found, "HOOK_MESSAGE/CALL_INFO"
    elif root.tag == "CALL_INFO":
        prefix = "CALL_INFO"
    else:
        raise DocumentError(f"expected <CALL_INFO> or <HOOK_MESSAGE>, found <{root.tag}>")
    node = _Node(root, prefix)
    result = node.integer("RESULT", 0, 1)
    if result is None:
        raise DocumentError(f"{prefix}/RESULT is missing")
    parameters: list[CallParameter] = []
    for item in node.children("PARAMETERS/PARAMETER"):
        position = item.required_integer("POSITION", 1, 64)
        direction = (item.text("TYPE") or "").strip()
        if direction not in ("IN", "OUT"):
            raise DocumentError(f"{item.path}/TYPE {direction!r}: expected IN or OUT")
        value_element = item.element.find("VALUE")
        if value_element is None:
            raise DocumentError(f"{item.path}/VALUE is missing")
        parameters.append(
            CallParameter(
                position=position,
                direction="IN" if direction == "IN" else "OUT",
                value="".join(str(text) for text in value_element.itertext()),
                structured=len(value_element) > 0,
            )
        )
    extra = root.find("EXTRA/VM")
    return CallInfo(
        method=method,
        success=result == 1,
        parameters=tuple(parameters),
        extra_vm=None if extra is None else vm_from_element(extra, f"{prefix}/EXTRA/VM"),
    )


def parse_call_info(
    data: bytes | str, what: str = "$API payload", *, encoding: Encoding = "auto", method: str | None = None
) -> CallInfo:
    """Parse ``$API`` (base64 of ``<CALL_INFO>``), or the XML, or a whole API hook message."""
    return call_info_from_element(load_document(data, what, encoding=encoding), method)
