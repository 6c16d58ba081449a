"""OpenNebula's template language, both ways (probe output, ``MONITOR`` payloads, templates).

Syntax::

    KEY="value"                 KEY=unquoted            KEY=
    KEY=[ A="1", B="two" ]      # vector attribute; newlines inside [ ] are free; repeat KEY for lists

The rules below were learnt by reading OpenNebula's lexer and grammar (``src/parsers/
template_parser.l`` and ``template_syntax.y`` in OpenNebula/one) and its writers (Ruby OCA
``XMLElement#attr_to_str``, ``src/im_mad/remotes/lib/domain.rb``):

* A quoted value is ``"`` + any characters except ``"`` (newlines, ``]``, ``,``, ``=``, ``#`` and
  non-ASCII included) or the two characters ``\\"`` + ``"``. After lexing, the *only* unescape is
  ``\\"`` -> ``"``. A backslash is **not** an escape character: ``\\\\`` stays two backslashes.
* flex picks the *longest* match, so a value that ends in a backslash cannot be written: its
  closing quote would read as an escaped quote and the value would swallow the following text.
  :func:`quote` refuses such values.
* If the rest of the line after ``=`` contains ``]]>``, the lexer returns a CDATA token and the
  whole template is rejected; :func:`quote` refuses values containing ``]]>``.
* Variable names are ``[A-Za-z0-9_]+``; inside a vector they are upper-cased, and when a name is
  repeated inside one vector the first value wins (``std::map::insert``).

The writer only emits names matching ``^[A-Z0-9_]+$`` and characters that XML 1.0 can carry
(oned stores every template as XML), so what it writes reads back identically both here and in
oned. The reader follows the lexer's longest-match rules, so it reads what oned would read.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aifactory_core.errors import DocumentError

KEY = re.compile(r"\A[A-Z0-9_]+\Z")
_READ_NAME = re.compile(r"[A-Za-z0-9_]+")
_UNQUOTED = re.compile(r'[^=#\t \n,\[\]]+')
# Characters XML 1.0 cannot carry (oned keeps templates as XML): C0 controls other than
# TAB/LF/CR, surrogates and the two non-characters U+FFFE/U+FFFF.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

AttributeValue = str | dict[str, str]
Attribute = tuple[str, AttributeValue]


def check_key(key: object) -> str:
    """An attribute name the writer may emit: upper-case letters, digits and '_'."""
    if not isinstance(key, str) or not KEY.match(key):
        raise DocumentError(f"invalid template attribute name {key!r}: expected [A-Z0-9_]+")
    return key


def _text(value: object, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DocumentError(f"template attribute {key}: value must be text or a number, not {value!r}")
    return value if isinstance(value, str) else str(value)


def check_value(value: str, key: str = "value") -> str:
    """Refuse what OpenNebula's template syntax (or its XML storage) cannot carry."""
    bad = _NOT_XML.search(value)
    if bad:
        raise DocumentError(
            f"template attribute {key}: character U+{ord(bad.group()):04X} cannot be stored by OpenNebula"
        )
    if "]]>" in value:
        raise DocumentError(f"template attribute {key}: ']]>' cannot appear in an OpenNebula value")
    if value.endswith("\\"):
        raise DocumentError(
            f"template attribute {key}: a value ending in a backslash cannot be quoted for OpenNebula"
        )
    return value


def quote(value: object, key: str = "value") -> str:
    """``"value"`` with ``"`` written as ``\\"`` (the only escape OpenNebula's lexer knows)."""
    text = check_value(_text(value, key), key)
    return '"' + text.replace('"', '\\"') + '"'


def render_attribute(key: str, value: object) -> str:
    """One attribute: ``KEY="value"`` or, for a mapping, ``KEY=[ A="1", B="x" ]`` (one line)."""
    check_key(key)
    if isinstance(value, Mapping):
        pairs = [f"{check_key(name)}={quote(item, f'{key}/{name}')}" for name, item in value.items()]
        return f"{key}=[ {', '.join(pairs)} ]" if pairs else f"{key}=[ ]"
    return f"{key}={quote(value, key)}"


def render_template(attributes: Mapping[str, object] | Iterable[tuple[str, object]]) -> str:
    """Attributes, one per line, each line ending in a newline. Repeat a key by passing pairs."""
    items = attributes.items() if isinstance(attributes, Mapping) else attributes
    return "".join(render_attribute(key, value) + "\n" for key, value in items)


def unescape(value: str) -> str:
    """OpenNebula's only unescape: ``\\"`` becomes ``"`` (left to right, no rescanning)."""
    return value.replace('\\"', '"')


class _Reader:
    """A hand-written lexer+parser with the token rules of ``template_parser.l``."""

    def __init__(self, text: str, what: str) -> None:
        self.text = text
        self.what = what
        self.pos = 0

    def fail(self, message: str) -> DocumentError:
        line = self.text.count("\n", 0, self.pos) + 1
        return DocumentError(f"{self.what}: {message} at line {line}")

    def skip_blank(self) -> None:
        """Blanks, newlines and comment lines between tokens (INITIAL state)."""
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in " \t\n":
                self.pos += 1
            elif char == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end + 1
            else:
                break

    def name(self) -> str:
        self.skip_blank()
        match = _READ_NAME.match(self.text, self.pos)
        if not match:
            found = self.text[self.pos : self.pos + 10]
            raise self.fail(f"expected an attribute name, found {found!r}")
        self.pos = match.end()
        return match.group()

    def equal(self) -> bool:
        """EQUAL or EQUAL_EMPTY; returns True for EQUAL_EMPTY (``KEY=`` then newline)."""
        text = self.text
        pos = self.pos
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos >= len(text) or text[pos] != "=":
            raise self.fail("expected '='")
        pos += 1
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and text[pos] == "\n":
            self.pos = pos + 1
            return True
        self.pos = pos
        return False

    def _quoted_length(self) -> int:
        """Length of the longest ``"([^"]|\\")*"`` match at pos (0 if none)."""
        text = self.text
        start = self.pos
        if start >= len(text) or text[start] != '"':
            return 0
        best = 0
        index = start + 1
        while True:
            index = text.find('"', index)
            if index < 0:
                return best
            escaped = index - 1 > start and text[index - 1] == "\\"
            best = index + 1 - start
            if not escaped:
                return best  # an unescaped quote can only close the string
            index += 1

    def value(self) -> tuple[str, str]:
        """One VALUE-state token: ('OBRACKET', '') or ('STRING', text)."""
        text = self.text
        start = self.pos
        candidates: list[tuple[int, int, str]] = []  # (length, -rule order, kind)
        if start < len(text) and text[start] == "[":
            end = start + 1
            while end < len(text) and text[end] in " \t\n":
                end += 1
            candidates.append((end - start, -0, "OBRACKET"))
        line_end = text.find("\n", start)
        line_end = len(text) if line_end < 0 else line_end
        if "]]>" in text[start:line_end]:
            candidates.append((line_end - start, -1, "CDATA"))
        quoted = self._quoted_length()
        if quoted:
            candidates.append((quoted, -2, "QUOTED"))
        unquoted = _UNQUOTED.match(text, start)
        if unquoted:
            candidates.append((unquoted.end() - start, -3, "UNQUOTED"))
        if not candidates:
            found = text[start : start + 10]
            raise self.fail(f"expected a value, found {found!r}")
        length, _, kind = max(candidates)
        self.pos = start + length
        if kind == "CDATA":
            raise self.fail("']]>' in a value is refused by OpenNebula")
        if kind == "OBRACKET":
            return ("OBRACKET", "")
        raw = text[start + 1 : start + length - 1] if kind == "QUOTED" else text[start : start + length]
        return ("STRING", unescape(raw))

    def separator(self) -> str:
        """COMMA or CBRACKET inside a vector."""
        self.skip_blank()
        if self.pos < len(self.text) and self.text[self.pos] in ",]":
            char = self.text[self.pos]
            self.pos += 1
            return char
        found = self.text[self.pos : self.pos + 10]
        raise self.fail(f"expected ',' or ']' in a vector attribute, found {found!r}")

    def vector(self, key: str) -> dict[str, str]:
        result: dict[str, str] = {}
        self.skip_blank()
        if self.pos < len(self.text) and self.text[self.pos] == "]":
            self.pos += 1
            return result
        while True:
            name = self.name().upper()
            if self.equal():
                raise self.fail(f"empty value for {key}/{name} inside a vector")
            kind, text = self.value()
            if kind != "STRING":
                raise self.fail(f"nested vector in {key}/{name}")
            result.setdefault(name, text)
            if self.separator() == "]":
                return result

    def template(self) -> list[Attribute]:
        attributes: list[Attribute] = []
        while True:
            self.skip_blank()
            if self.pos >= len(self.text):
                return attributes
            key = self.name()
            if self.equal():
                attributes.append((key, ""))
                continue
            kind, text = self.value()
            if kind == "OBRACKET":
                attributes.append((key, self.vector(key)))
            else:
                attributes.append((key, text))


def parse_template(text: str, what: str = "template") -> list[Attribute]:
    """Read template text into ``[(KEY, "value" | {SUB: "value"}), ...]`` in document order.

    Follows OpenNebula's lexer (longest match, ``\\"`` as the only escape, CDATA refused); a syntax
    error raises :class:`DocumentError` naming the line.
    """
    if not isinstance(text, str):
        raise DocumentError(f"{what}: expected text, got {type(text).__name__}")
    return _Reader(text, what).template()


def template_to_dict(attributes: Iterable[Attribute]) -> dict[str, list[AttributeValue]]:
    """Group parsed attributes by name, keeping every occurrence in order."""
    grouped: dict[str, list[AttributeValue]] = {}
    for key, value in attributes:
        grouped.setdefault(key, []).append(value)
    return grouped


def vm_monitor_line(
    vm_id: int | str,
    deploy_id: str,
    attributes: Mapping[str, object] | Iterable[tuple[str, object]],
) -> str:
    """One ``vm/monitor`` probe line: ``VM = [ ID="42", DEPLOY_ID="…", MONITOR="<base64>" ]``.

    MONITOR is the strict (one-line) base64 of ``KEY="VAL"`` lines, as ``domain.rb`` writes it;
    monitord merges these keys into the VM's monitoring record.
    """
    from aifactory_core.errors import UsageError
    from aifactory_core.validate import vm_id as check_vm_id

    try:
        number = check_vm_id(vm_id)
    except UsageError as error:
        raise DocumentError(str(error)) from None
    body = render_template(attributes)
    encoded = base64.b64encode(body.encode("utf-8")).decode("ascii")
    return f'VM = [ ID="{number}", DEPLOY_ID={quote(deploy_id, "DEPLOY_ID")}, MONITOR="{encoded}" ]'


@dataclass(frozen=True)
class VmMonitorRecord:
    """One ``VM = [ ... ]`` line of ``vm/monitor`` output, MONITOR decoded."""

    vm_id: int
    deploy_id: str
    monitor: tuple[Attribute, ...]


def parse_vm_monitor(text: str, what: str = "vm/monitor output") -> list[VmMonitorRecord]:
    """Read ``vm/monitor`` probe output (non-VM attributes are ignored)."""
    from aifactory_core.one.xmlsafe import decode_base64

    records: list[VmMonitorRecord] = []
    for key, value in parse_template(text, what):
        if key != "VM":
            continue
        if not isinstance(value, dict):
            raise DocumentError(f"{what}: VM must be a vector attribute")
        raw_id = value.get("ID", "")
        if not raw_id.isdigit() or len(raw_id) > 10:
            raise DocumentError(f"{what}: VM/ID {raw_id!r} is not a VM id")
        payload = decode_base64(value.get("MONITOR", ""), f"{what} VM {raw_id} MONITOR")
        try:
            monitor_text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise DocumentError(f"{what}: VM {raw_id} MONITOR is not UTF-8") from None
        records.append(
            VmMonitorRecord(
                vm_id=int(raw_id),
                deploy_id=value.get("DEPLOY_ID", ""),
                monitor=tuple(parse_template(monitor_text, f"{what} VM {raw_id} MONITOR")),
            )
        )
    return records
