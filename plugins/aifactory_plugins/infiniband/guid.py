"""InfiniBand GUIDs for VM NICs: unique across the cluster, stable for the life of a VM NIC.

Layout of the 64 bits (most significant first)::

    16 bits cluster prefix | 31 bits VM id | 8 bits NIC id | 1 bit node/port | 8 bits generation

Distinct (VM, NIC, kind) triples differ in the middle 40 bits, so one cluster prefix never yields
the same GUID twice; the generation (0 first) moves a GUID off one found taken by something
outside the suite (a physical HCA's burned-in GUID on the same fabric). The prefix must not be
0x0000 or 0xffff (the reserved all-zero/all-ones forms) and should be unique per cluster on a
shared fabric.
"""

from __future__ import annotations

from collections.abc import Container

from aifactory_core.errors import HostError, UsageError
from aifactory_core.validate import int_in_range, vm_id

KINDS = {"node": 0, "port": 1}
MAX_NIC_ID = 255
MAX_GENERATION = 255


def format_guid(value: int) -> str:
    text = f"{value:016x}"
    return ":".join(text[i:i + 2] for i in range(0, 16, 2))


def parse_prefix(value: object) -> int:
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            number = int(text, 16)
        except ValueError:
            raise UsageError(f"invalid GUID prefix {value!r}: expected 4 hex digits") from None
        value = number
    prefix = int_in_range(value, 0x0001, 0xFFFE, "GUID prefix")
    return prefix


def guid_for(prefix: int, vm: int, nic: int, kind: str, generation: int = 0) -> int:
    """The GUID of one VM NIC (as an integer)."""
    if kind not in KINDS:
        raise UsageError(f"invalid GUID kind {kind!r}: expected node or port")
    return (parse_prefix(prefix) << 48 | vm_id(vm) << 17 | int_in_range(nic, 0, MAX_NIC_ID, "NIC id") << 9
            | KINDS[kind] << 8 | int_in_range(generation, 0, MAX_GENERATION, "GUID generation"))


def allocate(prefix: int, vm: int, nic: int, kind: str, taken: Container[int] = ()) -> int:
    """The first GUID of this VM NIC not in ``taken`` (generation 0 unless a collision moved it)."""
    for generation in range(MAX_GENERATION + 1):
        candidate = guid_for(prefix, vm, nic, kind, generation)
        if candidate not in taken:
            return candidate
    raise HostError(f"no free {kind} GUID for VM {vm} NIC {nic}: every generation is taken")


def owner_of(value: int) -> tuple[int, int, int, str, int]:
    """Decode a GUID this module made: (prefix, VM id, NIC id, kind, generation)."""
    kind = "port" if value >> 8 & 1 else "node"
    return value >> 48, value >> 17 & 0x7FFFFFFF, value >> 9 & 0xFF, kind, value & 0xFF
