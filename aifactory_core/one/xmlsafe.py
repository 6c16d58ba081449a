"""Hardened XML and base64 input: the only way a document from OpenNebula becomes a tree.

Everything OpenNebula hands the suite (``$TEMPLATE``, ``$API``, ``VMM_DRIVER_ACTION_DATA``, VNM
stdin, ``one.*.info`` output) is parsed here, with one parser configuration:

* no entity substitution, no DTD loading or validation, no network access, no huge-tree mode;
* a document with a DOCTYPE is refused outright (oned never emits one; a DOCTYPE is how XXE and
  "billion laughs" documents declare their entities), checked in the prolog *before* libxml2 sees
  the document and again on the parsed tree;
* a size cap (default 16 MiB) and an element-depth cap (default 64);
* the bytes must be UTF-8 (what oned writes); any other declared encoding is refused;
* comments and processing instructions are dropped, CDATA becomes plain text.

lxml is imported inside the functions that need it: importing this module costs only the stdlib.
Every failure is a :class:`~aifactory_core.errors.DocumentError` with a one-line message.
"""

from __future__ import annotations

import binascii
import re
from typing import TYPE_CHECKING, Any

from aifactory_core.errors import DocumentError

if TYPE_CHECKING:
    from lxml import etree

MiB = 1024 * 1024
DEFAULT_MAX_BYTES = 16 * MiB
DEFAULT_MAX_DEPTH = 64

# The prolog: XML declaration, whitespace, comments and PIs before the first markup that matters.
_XML_DECL = re.compile(rb"<\?xml(?P<body>[^?]*)\?>")
_ENCODING = re.compile(rb"""encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_PROLOG_SKIP = re.compile(rb"\s+|<!--.*?-->|<\?.*?\?>", re.DOTALL)
_UTF8_NAMES = frozenset({"utf-8", "utf8"})


def _as_bytes(data: bytes | bytearray | memoryview | str, what: str) -> bytes:
    if isinstance(data, str):
        try:
            return data.encode("utf-8")
        except UnicodeEncodeError as error:
            raise DocumentError(f"{what}: text is not valid Unicode ({error.reason})") from None
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise DocumentError(f"{what}: expected bytes or text, got {type(data).__name__}")


def check_size(data: bytes, what: str, max_bytes: int) -> None:
    """Refuse ``data`` longer than ``max_bytes``."""
    if len(data) > max_bytes:
        raise DocumentError(f"{what} is {len(data)} bytes, more than the {max_bytes}-byte limit")


def check_utf8(data: bytes, what: str) -> None:
    """Refuse bytes that are not UTF-8, or that declare another encoding."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DocumentError(
            f"{what} is not UTF-8 text (byte offset {error.start}: {error.reason})"
        ) from None
    body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    match = _XML_DECL.match(body)
    if match:
        encoding = _ENCODING.search(match.group("body"))
        if encoding and encoding.group(1).decode("ascii").lower() not in _UTF8_NAMES:
            raise DocumentError(
                f"{what} declares encoding {encoding.group(1).decode('ascii')!r}; only UTF-8 is accepted"
            )


def check_prolog(data: bytes, what: str) -> None:
    """Refuse a DOCTYPE (with or without entity declarations) before the parser sees it."""
    position = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    declaration = _XML_DECL.match(data, position)
    if declaration:
        position = declaration.end()
    while True:
        skipped = _PROLOG_SKIP.match(data, position)
        if not skipped or skipped.end() == position:
            break
        position = skipped.end()
    if data.startswith(b"<!DOCTYPE", position) or data.startswith(b"<!doctype", position):
        if b"<!ENTITY" in data[position : position + MiB]:
            raise DocumentError(f"{what} has a DOCTYPE with entity declarations; refused")
        raise DocumentError(f"{what} has a DOCTYPE; refused (OpenNebula documents have none)")


def make_parser() -> etree.XMLParser:
    """The one hardened lxml parser configuration of the suite (a fresh parser per call)."""
    from lxml import etree

    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        attribute_defaults=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
        strip_cdata=True,
        collect_ids=False,
        recover=False,
    )


def _check_tree(root: etree._Element, what: str, max_depth: int) -> None:
    from lxml import etree

    docinfo = root.getroottree().docinfo
    doctype: object = getattr(docinfo, "doctype", "")
    if doctype or docinfo.internalDTD is not None:
        raise DocumentError(f"{what} has a DOCTYPE; refused (OpenNebula documents have none)")
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        element, depth = stack.pop()
        if depth > max_depth:
            raise DocumentError(f"{what} nests elements deeper than {max_depth} levels")
        for child in element:
            if isinstance(child, etree._Entity):
                raise DocumentError(f"{what} contains an entity reference &{child.name};; refused")
            stack.append((child, depth + 1))


def parse_xml(
    data: bytes | bytearray | memoryview | str,
    what: str = "XML document",
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> etree._Element:
    """Parse one XML document with every guard applied and return its root element."""
    raw = _as_bytes(data, what)
    check_size(raw, what, max_bytes)
    if not raw.strip():
        raise DocumentError(f"{what} is empty")
    check_utf8(raw, what)
    check_prolog(raw, what)
    from lxml import etree

    try:
        root = etree.fromstring(raw, parser=make_parser())
    except etree.XMLSyntaxError as error:
        message = str(error.msg or error).strip()
        line = f" (line {error.lineno})" if error.lineno else ""
        raise DocumentError(f"{what} is not well-formed XML: {message}{line}") from None
    except (ValueError, etree.ParserError) as error:
        raise DocumentError(f"{what} could not be parsed: {error}") from None
    if root is None:
        raise DocumentError(f"{what} has no root element")
    _check_tree(root, what, max_depth)
    return root


_B64_SPACE = re.compile(rb"[\r\n]+")


def decode_base64(
    text: bytes | bytearray | memoryview | str,
    what: str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """Strictly decode standard base64 (``+/`` alphabet, ``=`` padding) as oned writes it.

    Leading/trailing whitespace and line breaks (Ruby's ``Base64.encode64`` wraps lines) are
    accepted; any other character outside the alphabet, bad padding, an empty payload, or a
    payload that would decode to more than ``max_bytes`` is refused.
    """
    if isinstance(text, str):
        if not text.isascii():
            raise DocumentError(f"invalid base64 in {what}: non-ASCII characters")
        raw = text.encode("ascii")
    elif isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
    else:
        raise DocumentError(f"invalid base64 in {what}: expected text, got {type(text).__name__}")
    encoded_limit = (max_bytes + 2) // 3 * 4
    # Line breaks add at most one byte per 60 characters; allow for them before stripping.
    if len(raw) > encoded_limit + encoded_limit // 30 + 64:
        raise DocumentError(f"{what} is larger than the {max_bytes}-byte limit once decoded")
    compact = _B64_SPACE.sub(b"", raw.strip())
    if not compact:
        raise DocumentError(f"invalid base64 in {what}: empty")
    if len(compact) > encoded_limit:
        raise DocumentError(f"{what} is larger than the {max_bytes}-byte limit once decoded")
    try:
        decoded = binascii.a2b_base64(compact, strict_mode=True)
    except (binascii.Error, ValueError) as error:
        raise DocumentError(f"invalid base64 in {what}: {error}") from None
    check_size(decoded, what, max_bytes)
    return decoded


def parse_base64_xml(
    text: bytes | bytearray | memoryview | str,
    what: str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> etree._Element:
    """Decode base64 (as in ``$TEMPLATE``/``$API``/VNM stdin) and parse the XML inside."""
    return parse_xml(
        decode_base64(text, what, max_bytes=max_bytes), what, max_bytes=max_bytes, max_depth=max_depth
    )


def looks_like_xml(data: bytes) -> bool:
    """True when ``data`` looks like XML rather than base64: it starts with '<' after a byte-order
    mark and whitespace (UTF-16/32 count as XML, so that the UTF-8 check names the problem)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True
    body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    return body.lstrip(b" \t\r\n\x00")[:1] == b"<"
