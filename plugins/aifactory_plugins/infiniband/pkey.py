"""Partition keys: the 15-bit identity plus the membership bit the Subnet Manager programs."""

from __future__ import annotations

from aifactory_core.errors import UsageError

FULL_MEMBER_BIT = 0x8000
DEFAULT_PKEY = 0x7FFF
MEMBERSHIPS = ("full", "limited")


def pkey(value: object) -> int:
    """A partition key 0x0001-0x7fff (``0x8001`` is read as 0x0001: the top bit is membership).

    Refuses 0x0000 (invalid), 0x7fff (the default partition every port is in: granting it
    isolates nothing) and anything that is not 16-bit hex or decimal.
    """
    if isinstance(value, bool):
        raise UsageError(f"invalid pkey {value!r}")
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            number = int(text, 16) if text.startswith("0x") else int(text, 10)
        except ValueError:
            raise UsageError(f"invalid pkey {value!r}: expected 0x0001-0x7ffe") from None
    elif isinstance(value, int):
        number = value
    else:
        raise UsageError(f"invalid pkey {value!r}")
    if not 0 <= number <= 0xFFFF:
        raise UsageError(f"pkey {value!r} outside 0x0001-0x7fff")
    identity = number & 0x7FFF
    if identity == 0 or identity == DEFAULT_PKEY:
        raise UsageError(f"pkey {value!r} outside 0x0001-0x7ffe (0x0000 is invalid, 0x7fff the default partition)")
    return identity


def membership(value: object) -> str:
    if value not in MEMBERSHIPS:
        raise UsageError(f"invalid pkey membership {value!r}: expected full or limited")
    return str(value)


def with_membership(identity: int, member: str) -> int:
    """The 16-bit pkey as programmed in a port's table: top bit set for full members."""
    return pkey(identity) | (FULL_MEMBER_BIT if membership(member) == "full" else 0)
