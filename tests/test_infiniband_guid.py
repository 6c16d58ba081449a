"""GUID allocation and pkey mapping: property tests (no duplicates, stable per VM NIC)."""

from __future__ import annotations

import pytest
from aifactory_plugins.infiniband import guid, pkey
from hypothesis import given
from hypothesis import strategies as st

from aifactory_core.errors import HostError, UsageError
from aifactory_core.host.netlink_vf import guid as parse_guid

prefixes = st.integers(0x0001, 0xFFFE)
vms = st.integers(0, 2**31 - 1)
nics = st.integers(0, 255)
kinds = st.sampled_from(["node", "port"])
nic_keys = st.tuples(vms, nics, kinds)


@given(prefixes, st.lists(nic_keys, min_size=2, max_size=200, unique=True))
def test_distinct_vm_nics_never_share_a_guid(prefix: int, keys: list[tuple[int, int, str]]) -> None:
    values = [guid.allocate(prefix, vm, nic, kind) for vm, nic, kind in keys]
    assert len(set(values)) == len(values)


@given(prefixes, nic_keys)
def test_a_vm_nic_always_gets_the_same_guid_and_it_decodes_back(prefix: int, key: tuple[int, int, str]) -> None:
    vm, nic, kind = key
    first = guid.allocate(prefix, vm, nic, kind)
    assert guid.allocate(prefix, vm, nic, kind) == first
    assert guid.owner_of(first) == (prefix, vm, nic, kind, 0)
    text = guid.format_guid(first)
    assert parse_guid(text) == text and first not in (0, 2**64 - 1)


@given(prefixes, nic_keys, st.sets(st.integers(0, 2**64 - 1), max_size=20))
def test_collisions_move_to_the_next_generation_deterministically(prefix: int, key: tuple[int, int, str],
                                                                   foreign: set[int]) -> None:
    vm, nic, kind = key
    taken = foreign | {guid.guid_for(prefix, vm, nic, kind, g) for g in range(3)}
    chosen = guid.allocate(prefix, vm, nic, kind, taken)
    assert chosen not in taken
    assert guid.owner_of(chosen)[:4] == (prefix, vm, nic, kind)
    assert chosen == guid.allocate(prefix, vm, nic, kind, taken)


def test_exhausted_generations_and_bad_inputs() -> None:
    every = {guid.guid_for(0xA1F0, 1, 1, "port", g) for g in range(256)}
    with pytest.raises(HostError, match="no free port GUID"):
        guid.allocate(0xA1F0, 1, 1, "port", every)
    for bad in (0, 0xFFFF, "zz"):
        with pytest.raises(UsageError):
            guid.parse_prefix(bad)
    with pytest.raises(UsageError):
        guid.guid_for(0xA1F0, 1, 256, "port")
    with pytest.raises(UsageError):
        guid.guid_for(0xA1F0, -1, 0, "port")


@given(st.integers(0x0001, 0x7FFE), st.sampled_from(["full", "limited"]))
def test_pkey_membership_round_trip(identity: int, member: str) -> None:
    programmed = pkey.with_membership(identity, member)
    assert programmed & 0x7FFF == identity
    assert bool(programmed & 0x8000) == (member == "full")
    assert pkey.pkey(f"{programmed:#06x}") == identity == pkey.pkey(str(identity))


@pytest.mark.parametrize("bad", ["0x0000", "0x8000", "0x7fff", "0x10000", "-1", "65536", "0xzz", "", True, 1.5])
def test_pkeys_outside_the_partition_range_are_refused(bad: object) -> None:
    with pytest.raises(UsageError, match="pkey"):
        pkey.pkey(bad)
