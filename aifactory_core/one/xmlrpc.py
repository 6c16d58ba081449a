"""A lean XML-RPC client for oned: one call, one plain HTTP/1.1 connection, the hardened parser.

Hooks spawn a process per event; ``xmlrpc.client`` (http.client, email) and pyone (requests)
cost more to import than the decision itself. This module imports only ``socket`` and ``re``
(``ssl`` only for an ``https://`` endpoint) and covers exactly what oned needs:

* the request: ``methodCall`` with string, int (i4) and boolean parameters, text escaped;
* the transport: ``POST`` with ``Content-Length`` and ``Connection: close``, one timeout that
  bounds connecting and every read and the whole exchange, a cap on the answer's size;
* the answer: a strict status line and header block, a ``Content-Length``, ``chunked`` or
  read-to-close body, parsed by :func:`aifactory_core.one.xmlsafe.parse_xml` (no DOCTYPE, no
  entities), a ``fault`` or a value (string, int, boolean, double, array, struct) decoded.

Every failure is an :class:`XmlRpcError` with a one-line message.
"""

from __future__ import annotations

import re
import socket
import time
from typing import TYPE_CHECKING, Any

from aifactory_core.errors import AifactoryError, DocumentError

if TYPE_CHECKING:
    from lxml import etree

MiB = 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 64 * MiB
MAX_HEADER_BYTES = 64 * 1024
_I4 = (-(2**31), 2**31 - 1)
_URL = re.compile(r"(?P<scheme>https?)://(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d{1,5}))?"
                  r"(?P<path>/[!-~]*)?\Z")  # fmt: skip
_STATUS = re.compile(rb"HTTP/1\.[01] (?P<code>[1-5]\d\d)(?: (?P<reason>[\t !-~]*))?\Z")
_HEADER = re.compile(rb"(?P<name>[!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(?P<value>[\t -~]*?)[ \t]*\Z")
_CHUNK_SIZE = re.compile(rb"(?P<size>[0-9A-Fa-f]{1,8})(?:;[\t -~]*)?\Z")
# Characters XML 1.0 cannot carry (str.translate deletes them: a length change means one was there).
_NOT_XML = dict.fromkeys([*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0xFFFE, 0xFFFF])


class XmlRpcError(AifactoryError):
    """The XML-RPC exchange failed: unreachable endpoint, bad HTTP, bad answer, or a fault."""

    code = "oned"


class Endpoint:
    """A parsed ``http(s)://host[:port]/path`` endpoint."""

    __slots__ = ("scheme", "host", "port", "path")

    def __init__(self, url: str) -> None:
        match = _URL.match(url)
        if match is None:
            raise XmlRpcError(f"unsupported XML-RPC endpoint {url!r}: expected http(s)://host[:port]/path")
        self.scheme = match["scheme"]
        self.host = match["host"]
        port = int(match["port"] or (443 if self.scheme == "https" else 80))
        if not 0 < port < 65536:
            raise XmlRpcError(f"XML-RPC endpoint {url!r}: port {port} out of range")
        self.port = port
        self.path = match["path"] or "/"

    @property
    def netloc(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


# ---------------------------------------------------------------- request


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _escape(text: str) -> str:
    if len(text.translate(_NOT_XML)) != len(text) or not text.isascii() and _has_surrogate(text):
        raise XmlRpcError("a string parameter holds a character XML cannot carry")
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")


def _param(value: object) -> str:
    if isinstance(value, bool):
        return f"<boolean>{int(value)}</boolean>"
    if isinstance(value, int):
        if not _I4[0] <= value <= _I4[1]:
            raise XmlRpcError(f"integer parameter {value} does not fit XML-RPC's 32-bit int")
        return f"<int>{value}</int>"
    if isinstance(value, str):
        return f"<string>{_escape(value)}</string>"
    raise XmlRpcError(f"unsupported XML-RPC parameter type {type(value).__name__}")


def encode_call(method: str, params: tuple[object, ...]) -> bytes:
    """The ``methodCall`` document for ``method(*params)`` (strings, ints, booleans)."""
    if not re.fullmatch(r"[A-Za-z0-9_.:/]+", method):
        raise XmlRpcError(f"invalid XML-RPC method name {method!r}")
    body = "".join(f"<param><value>{_param(value)}</value></param>" for value in params)
    text = f"<?xml version='1.0'?>\n<methodCall><methodName>{method}</methodName><params>{body}</params></methodCall>\n"
    return text.encode("utf-8")


# ---------------------------------------------------------------- transport


class _Reader:
    """Buffered reads from a socket under one deadline and one byte budget."""

    def __init__(self, sock: socket.socket, deadline: float, limit: int) -> None:
        self.sock, self.deadline, self.limit = sock, deadline, limit
        self.buffer = b""
        self.total = 0
        self.eof = False

    def fill(self) -> bool:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise XmlRpcError("timed out waiting for the answer")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise XmlRpcError("timed out waiting for the answer") from None
        if not data:
            self.eof = True
            return False
        self.total += len(data)
        if self.total > self.limit:
            raise XmlRpcError("answer is larger than the size limit")
        self.buffer += data
        return True

    def line(self, what: str, limit: int) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
                return line
            if len(self.buffer) > limit:
                raise XmlRpcError(f"{what} is longer than {limit} bytes")
            if not self.fill():
                raise XmlRpcError(f"connection closed inside the {what}")

    def exactly(self, count: int, what: str) -> bytes:
        while len(self.buffer) < count:
            if not self.fill():
                raise XmlRpcError(f"connection closed inside the {what} ({len(self.buffer)} of {count} bytes)")
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def rest(self) -> bytes:
        while self.fill():
            pass
        data, self.buffer = self.buffer, b""
        return data


def _headers(reader: _Reader) -> tuple[int, str, dict[str, str]]:
    status = reader.line("status line", MAX_HEADER_BYTES)
    match = _STATUS.match(status)
    if match is None:
        raise XmlRpcError(f"malformed HTTP status line {status[:80]!r}")
    headers: dict[str, str] = {}
    size = len(status)
    while True:
        line = reader.line("header block", MAX_HEADER_BYTES)
        if not line:
            break
        size += len(line) + 2
        if size > MAX_HEADER_BYTES:
            raise XmlRpcError(f"HTTP header block is longer than {MAX_HEADER_BYTES} bytes")
        header = _HEADER.match(line)
        if header is None:
            raise XmlRpcError(f"malformed HTTP header line {line[:80]!r}")
        name = header["name"].decode("ascii").lower()
        value = header["value"].decode("ascii")
        if name in headers and name in ("content-length", "transfer-encoding") and headers[name] != value:
            raise XmlRpcError(f"conflicting HTTP {name} headers")
        headers[name] = value
    reason = (match["reason"] or b"").decode("ascii")
    return int(match["code"]), reason, headers


def _chunked(reader: _Reader) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = reader.line("chunk size line", 1024)
        match = _CHUNK_SIZE.match(size_line)
        if match is None:
            raise XmlRpcError(f"malformed chunk size line {size_line[:40]!r}")
        size = int(match["size"], 16)
        if size == 0:
            while reader.line("chunked trailer", MAX_HEADER_BYTES):
                pass
            return b"".join(parts)
        parts.append(reader.exactly(size, "chunked body"))
        if reader.exactly(2, "chunked body") != b"\r\n":
            raise XmlRpcError("malformed chunked body: a chunk does not end with CRLF")


def _body(reader: _Reader, headers: dict[str, str], max_bytes: int) -> bytes:
    encoding = headers.get("transfer-encoding")
    length = headers.get("content-length")
    if encoding is not None:
        if length is not None:
            raise XmlRpcError("HTTP answer has both Transfer-Encoding and Content-Length")
        if encoding.lower() != "chunked":
            raise XmlRpcError(f"unsupported HTTP Transfer-Encoding {encoding!r}")
        return _chunked(reader)
    if length is not None:
        if not length.isdigit() or len(length) > 12:
            raise XmlRpcError(f"malformed HTTP Content-Length {length!r}")
        if int(length) > max_bytes:
            raise XmlRpcError(f"answer is larger than the {max_bytes}-byte limit ({length} bytes announced)")
        return reader.exactly(int(length), "body")
    return reader.rest()


def _connect(endpoint: Endpoint, timeout: float) -> socket.socket:
    host = endpoint.host.strip("[]")
    try:  # the host is ASCII (the endpoint pattern): as bytes, getaddrinfo skips the idna codec import
        address = (host.encode("ascii"), endpoint.port)
        sock = socket.create_connection(address, timeout=timeout)  # type: ignore[arg-type]  # bytes: as getaddrinfo
    except TimeoutError:
        raise XmlRpcError(f"timed out connecting to {endpoint.netloc}") from None
    except OSError as error:
        raise XmlRpcError(f"cannot connect to {endpoint.netloc}: {error.strerror or error}") from None
    if endpoint.scheme != "https":
        return sock
    import ssl

    try:
        return ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    except (OSError, ssl.SSLError) as error:
        sock.close()
        raise XmlRpcError(f"TLS with {endpoint.netloc} failed: {error}") from None


def post(endpoint: Endpoint, body: bytes, timeout: float, max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> bytes:
    """POST ``body`` (text/xml) to ``endpoint`` and return the answer's body (status 200 only)."""
    deadline = time.monotonic() + timeout
    head = (f"POST {endpoint.path} HTTP/1.1\r\nHost: {endpoint.netloc}\r\nUser-Agent: aifactory\r\n"
            f"Content-Type: text/xml\r\nAccept-Encoding: identity\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")  # fmt: skip
    sock = _connect(endpoint, timeout)
    try:
        try:
            sock.sendall(head.encode("ascii") + body)
        except TimeoutError:
            raise XmlRpcError("timed out sending the call") from None
        reader = _Reader(sock, deadline, max_bytes + MAX_HEADER_BYTES)
        code, reason, headers = _headers(reader)
        reader.limit = reader.total - len(reader.buffer) + max_bytes  # the body alone gets max_bytes
        data = _body(reader, headers, max_bytes)
    except OSError as error:
        raise XmlRpcError(f"connection to {endpoint.netloc} failed: {error.strerror or error}") from None
    finally:
        sock.close()
    if code != 200:
        raise XmlRpcError(f"HTTP {code} {reason}".strip())
    return data


# ---------------------------------------------------------------- answer


def _value(element: etree._Element) -> Any:
    children = [child for child in element if isinstance(child.tag, str)]
    if not children:
        return element.text or ""
    if len(children) != 1:
        raise XmlRpcError("malformed XML-RPC answer: a value holds more than one type")
    typed = children[0]
    tag, text = typed.tag, (typed.text or "").strip()
    try:
        if tag == "string":
            return typed.text or ""
        if tag in ("int", "i4", "i8"):
            return int(text)
        if tag == "boolean":
            if text not in ("0", "1"):
                raise ValueError(text)
            return text == "1"
        if tag == "double":
            return float(text)
        if tag == "nil":
            return None
    except ValueError:
        raise XmlRpcError(f"malformed XML-RPC answer: bad {tag} {text[:40]!r}") from None
    if tag == "array":
        data = typed.find("data")
        if data is None:
            raise XmlRpcError("malformed XML-RPC answer: an array without data")
        return [_value(item) for item in data.iterfind("value")]
    if tag == "struct":
        result: dict[str, Any] = {}
        for member in typed.iterfind("member"):
            name, value = member.find("name"), member.find("value")
            if name is None or value is None:
                raise XmlRpcError("malformed XML-RPC answer: a struct member without name or value")
            result[name.text or ""] = _value(value)
        return result
    raise XmlRpcError(f"malformed XML-RPC answer: unsupported type {tag}")


def decode_response(data: bytes, max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> Any:
    """The value of a ``methodResponse``; a fault raises :class:`XmlRpcError`."""
    from aifactory_core.one.xmlsafe import parse_xml

    try:
        root = parse_xml(data, "XML-RPC answer", max_bytes=max_bytes)
    except DocumentError as error:
        raise XmlRpcError(error.message) from None
    if root.tag != "methodResponse":
        raise XmlRpcError(f"malformed XML-RPC answer: root element {root.tag!r}")
    fault = root.find("fault/value")
    if fault is not None:
        detail = _value(fault)
        if not isinstance(detail, dict):
            raise XmlRpcError("malformed XML-RPC fault")
        raise XmlRpcError(f"fault {detail.get('faultCode')}: {detail.get('faultString')}")
    values = root.findall("params/param/value")
    if len(values) != 1:
        raise XmlRpcError(f"malformed XML-RPC answer: {len(values)} return values")
    return _value(values[0])


def call(endpoint: str | Endpoint, method: str, params: tuple[object, ...], *, timeout: float = 30.0,
         max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> Any:  # fmt: skip
    """``method(*params)`` at ``endpoint``: the decoded return value."""
    target = endpoint if isinstance(endpoint, Endpoint) else Endpoint(endpoint)
    return decode_response(post(target, encode_call(method, params), timeout, max_bytes), max_bytes)
