"""Talking to oned over XML-RPC, answers parsed by the hardened XML parser.

Two transports, one interface (``call``/``document``):

* ``"lean"`` (the default, what the admission and accounting hooks use): :mod:`aifactory_core.one.xmlrpc`,
  a plain-socket client that imports neither pyone nor ``xmlrpc.client``/``http.client`` -- a hook
  is a process per API event, and pyone alone costs more to import than the decision;
* ``"pyone"`` (``aifactory tenant apply``, the installer): pyone's raw XML-RPC answer
  (``OneServerXRPC._do_request``, which adds nothing but the transport), imported on first use.

pyone binds answers to generated classes with its own parser; both transports instead hand the
documents to :mod:`aifactory_core.one.xmlsafe`.
Endpoint and credentials: arguments, else ``ONE_XMLRPC`` and ``ONE_AUTH`` (a file holding
``user:password``, default ``~/.one/one_auth``) as OpenNebula's own clients read them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal

from aifactory_core.errors import AifactoryError, UsageError

if TYPE_CHECKING:
    from lxml import etree

DEFAULT_ENDPOINT = "http://localhost:2633/RPC2"
Transport = Literal["lean", "pyone"]


class OnedError(AifactoryError):
    """oned refused a call or could not be reached."""

    code = "oned"


def resolve_session(session: str | None) -> str:
    """``user:password`` as given, else from the ``$ONE_AUTH`` file as OpenNebula's clients read it."""
    if session is not None:
        if ":" not in session or "\n" in session or session.startswith(":"):
            raise UsageError("--session: expected user:password")
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

    def __init__(self, endpoint: str | None = None, session: str | None = None, timeout: float = 30.0,
                 transport: Transport = "lean") -> None:  # fmt: skip
        self.endpoint = endpoint or os.environ.get("ONE_XMLRPC") or DEFAULT_ENDPOINT
        self.transport = transport
        self.timeout = timeout
        self.session = resolve_session(session)
        self.server: Any = None
        if transport == "pyone":
            import pyone

            from aifactory_core.one.xmlrpc import Endpoint

            Endpoint(self.endpoint)  # the lean client's check: pyone would take anything else for gRPC

            self.server = pyone.OneServer(self.endpoint, session=self.session, timeout=timeout)
        elif transport != "lean":
            raise UsageError(f"unknown oned transport {transport!r}")

    def _request(self, method: str, params: tuple[Any, ...]) -> Any:
        if self.server is not None:
            return self.server._do_request(method, self.server._cast_parms(params))
        from aifactory_core.one import xmlrpc

        return xmlrpc.call(self.endpoint, method, (self.session, *params), timeout=self.timeout)

    def call(self, method: str, *params: Any) -> Any:
        try:
            raw = self._request(method, params)
        except Exception as error:  # transport errors, faults
            raise OnedError(f"{method}: {' '.join(str(error).split())[:300]}") from None
        if not isinstance(raw, list) or len(raw) < 2:
            raise OnedError(f"{method}: expected oned's [success, result, error code] answer")
        if not raw[0]:
            raise OnedError(f"{method}: {' '.join(str(raw[1]).split())[:300]}")
        return raw[1]

    def document(self, method: str, *params: Any) -> etree._Element:
        from aifactory_core.one.xmlsafe import parse_xml

        answer = self.call(method, *params)
        if not isinstance(answer, str):
            raise OnedError(f"{method}: expected an XML document")
        return parse_xml(answer, f"{method} answer")
