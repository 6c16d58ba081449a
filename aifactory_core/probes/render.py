"""The probes' template writer: OpenNebula template syntax with the rules of
:mod:`aifactory_core.one.template`, in a module that loads in microseconds.

``aifactory_core.one.template`` is the reference (its reader parses what this writes; the tests
check that both writers produce the same bytes for every attribute the probes emit and for hostile
values). It is not imported here because it pulls in ``dataclasses``/``inspect`` (~12 ms), which
alone would exceed the probes' start-up budget. A value the syntax cannot carry is not refused with
an exception as the reference does — a probe must never fail — but cleaned: characters XML cannot
hold are dropped, ``]]>`` is broken up and a trailing backslash is removed.
"""

_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
# C0 controls other than TAB/LF/CR: XML 1.0 cannot carry them (oned keeps templates as XML).
_C0 = dict.fromkeys([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20)])
# Characters that make a printable ASCII value need cleaning or escaping (``]]>``, ``\``, ``"``).
_NEEDS_CLEANING = frozenset('"\\>')

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    Attributes = Iterable[tuple[str, object]]


def clean(value: object) -> str:
    """Text OpenNebula's lexer and XML storage can carry (None becomes the empty string)."""
    if value is None:
        return ""
    text = str(int(value)) if isinstance(value, bool) else str(value)
    text = text.translate(_C0)
    if not text.isascii():  # surrogates and U+FFFE/U+FFFF cannot be stored either
        text = "".join(char for char in text if not ("\ud800" <= char <= "\udfff" or char in "\ufffe\uffff"))
    return text.replace("]]>", "]] >").rstrip("\\")


def valid_key(key: str) -> bool:
    """``[A-Z0-9_]+``, the names OpenNebula's writer and reader agree on."""
    return bool(key) and _KEY_CHARS.issuperset(key)


def quote(value: object) -> str:
    kind = type(value)
    if kind is int:
        return f'"{value}"'
    if (isinstance(value, str) and kind is str and value.isascii() and value.isprintable()
            and _NEEDS_CLEANING.isdisjoint(value)):
        return f'"{value}"'  # nothing to clean or escape: the common case, without the copies
    return '"' + clean(value).replace('"', '\\"') + '"'


def attribute(key: str, value: object) -> str:
    """``KEY="value"`` or ``KEY=[ A="1", B="x" ]`` on one line."""
    if not valid_key(key):
        raise ValueError(f"invalid attribute name {key!r}")
    if isinstance(value, dict):
        if not value:
            return f"{key}=[ ]"
        if not _valid_keys(value):
            for name in value:
                if not valid_key(name):
                    raise ValueError(f"invalid attribute name {key}/{name!r}")
        # A vector holds tens of values, nearly all integers or text with nothing to clean: when all
        # its text is such (one check of it joined), those are written without a call each.
        text = "".join([item for item in value.values() if type(item) is str])
        if text.isascii() and text.isprintable() and _NEEDS_CLEANING.isdisjoint(text):
            pairs = ", ".join([f'{name}="{item}"' if type(item) is str or type(item) is int else
                               f"{name}={quote(item)}" for name, item in value.items()])
        else:
            pairs = ", ".join([f"{name}={quote(item)}" for name, item in value.items()])
        return f"{key}=[ {pairs} ]"
    return f"{key}={quote(value)}"


def _valid_keys(names: dict[str, object]) -> bool:
    """Every name of a vector is a valid key (one check of them joined; False: check each)."""
    try:
        return "" not in names and _KEY_CHARS.issuperset("".join(names))
    except TypeError:
        return False


def error_text(error: BaseException, *, prefix: str = "", limit: int = 300) -> str:
    """A problem attribute's text for an exception: ``<prefix><Type>: <message>`` on one line
    (whitespace runs, newlines included, become one space), at most ``limit`` characters."""
    return f"{prefix}{type(error).__name__}: {' '.join(str(error).split())}"[:limit]


def template(attributes: "Attributes") -> str:
    return "".join(attribute(key, value) + "\n" for key, value in attributes)


def vm_line(vm_id: int, deploy_id: str, attributes: "Attributes") -> str:
    """``VM = [ ID="42", DEPLOY_ID="one-42", MONITOR="<base64>" ]`` as ``domain.rb`` writes it."""
    import binascii  # an extension module the host/system probe, which writes no VM line, never loads

    encoded = binascii.b2a_base64(template(attributes).encode("utf-8"), newline=False).decode("ascii")
    return f'VM = [ ID="{int(vm_id)}", DEPLOY_ID={quote(deploy_id)}, MONITOR="{encoded}" ]'
