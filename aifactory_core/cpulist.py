"""Linux CPU/node list syntax ("0-3,8,10-11") and hex CPU masks, both ways."""

from __future__ import annotations

import re
from collections.abc import Iterable

from aifactory_core.errors import UsageError

_RANGE = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")
MAX_CPU = 65535


def parse_cpulist(text: str | None, what: str = "CPU list") -> frozenset[int]:
    """Parse ``0-3,8`` into ``{0, 1, 2, 3, 8}``; empty or missing text gives an empty set."""
    if text is None:
        return frozenset()
    text = text.strip()
    if not text or text == "(null)":
        return frozenset()
    result: set[int] = set()
    for part in text.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise UsageError(f"invalid {what} {text!r}")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low or high > MAX_CPU:
            raise UsageError(f"invalid {what} {text!r}")
        result.update(range(low, high + 1))
    return frozenset(result)


def format_cpulist(cpus: Iterable[int]) -> str:
    """Format ``{0, 1, 2, 3, 8}`` as ``0-3,8`` (the kernel's own style)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    index = 0
    while index < len(ordered):
        start = ordered[index]
        while index + 1 < len(ordered) and ordered[index + 1] == ordered[index] + 1:
            index += 1
        end = ordered[index]
        parts.append(str(start) if start == end else f"{start}-{end}")
        index += 1
    return ",".join(parts)


def parse_cpumask(text: str | None) -> frozenset[int]:
    """Parse a sysfs hex mask (``ffff,00000000``: 32-bit words, most significant first)."""
    if not text:
        return frozenset()
    digits = text.strip().replace(",", "")
    if not re.fullmatch(r"[0-9a-fA-F]+", digits):
        raise UsageError(f"invalid CPU mask {text!r}")
    value = int(digits, 16)
    return frozenset(bit for bit in range(value.bit_length()) if value >> bit & 1)
