"""Talking to oned: pyone's XML-RPC transport, answers parsed by the hardened XML parser.

pyone binds answers to generated classes with its own parser; the suite instead takes the raw
XML-RPC answer (``OneServerXRPC._do_request``, which still adds nothing but the transport) and
parses documents with :mod:`aifactory_core.one.xmlsafe`. pyone is imported on first use only.
Endpoint and credentials: arguments, else ``ONE_XMLRPC`` and ``ONE_AUTH`` (a file holding
``user:password``, default ``~/.one/one_auth``) as OpenNebula's own clients read them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from aifactory_core.errors import AifactoryError, UsageError

if TYPE_CHECKING:
    from lxml import etree

DEFAULT_ENDPOINT = "http://localhost:2633/RPC2"


class OnedError(AifactoryError):
    """oned refused a call or could not be reached."""

    code = "oned"


def resolve_session(session: str | None) -> str:
    if session:
        return session
    path = os.environ.get("ONE_AUTH") or os.path.expanduser("~/.one/one_auth")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(4096).strip()
    except OSError as error:
        raise UsageError(f"no OpenNebula credentials: cannot read {path}: {error.strerror or error}") from None
    if ":" not in text or "\n" in text:
        raise UsageError(f"{path}: expected one line user:password")
    return text


class Oned:
    """The XML-RPC calls the policy layer makes."""

    def __init__(self, endpoint: str | None = None, session: str | None = None, timeout: float = 30.0) -> None:
        import pyone

        self.endpoint = endpoint or os.environ.get("ONE_XMLRPC") or DEFAULT_ENDPOINT
        self.server: Any = pyone.OneServer(self.endpoint, session=resolve_session(session), timeout=timeout)

    def call(self, method: str, *params: Any) -> Any:
        try:
            raw = self.server._do_request(method, self.server._cast_parms(params))
        except Exception as error:  # transport errors, faults
            raise OnedError(f"{method}: {' '.join(str(error).split())[:300]}") from None
        if not raw[0]:
            raise OnedError(f"{method}: {' '.join(str(raw[1]).split())[:300]}")
        return raw[1]

    def document(self, method: str, *params: Any) -> etree._Element:
        from aifactory_core.one.xmlsafe import parse_xml

        answer = self.call(method, *params)
        if not isinstance(answer, str):
            raise OnedError(f"{method}: expected an XML document")
        return parse_xml(answer, f"{method} answer")
