import pytest
from hypothesis import given
from hypothesis import strategies as st

from aifactory_core.cpulist import format_cpulist, parse_cpulist, parse_cpumask
from aifactory_core.errors import UsageError


def test_parse_kernel_lists() -> None:
    assert parse_cpulist("0-3,8,10-11") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpulist("") == frozenset()
    assert parse_cpulist("5") == {5}


@pytest.mark.parametrize("bad", ["3-1", "a", "1,,2", "0-70000", "-1"])
def test_parse_refuses_garbage(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_cpulist(bad)


@given(st.sets(st.integers(min_value=0, max_value=512)))
def test_format_parse_round_trip(cpus: set[int]) -> None:
    assert parse_cpulist(format_cpulist(cpus)) == cpus


def test_masks_as_sysfs_writes_them() -> None:
    assert parse_cpumask("ffff") == set(range(16))
    assert parse_cpumask("00000001,00000000") == {32}
