"""The policy file: valid files load; every invalid one fails naming the key and its line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aifactory_core.policy.decide import Usage, decide
from aifactory_core.policy.schema import PolicyError, load_policy, parse_policy

EXAMPLE = Path(__file__).parent.parent / "examples" / "policy.toml"
BASE = """[opennebula]
version = "7.0"

[tenant.a]
group = "ga"
max_gpus = 2
vlans = ["100-199"]

[[tenant.a.devices]]
name = "H100"
vendor = "10de"

[tenant.b]
group = "gb"
max_gpus = 1
vlans = ["200-299"]
"""


def test_example_policy_loads() -> None:
    policy = load_policy(str(EXAMPLE))
    assert set(policy.tenants) == {"llm-lab", "vision"}
    lab = policy.tenants["llm-lab"]
    assert lab.max_gpus == 6 and lab.devices[0].clusters == frozenset({101})
    assert 0x10 in lab.ib_pkeys and 0x20 not in lab.ib_pkeys  # 0x8010-0x801f without the membership bit
    assert policy.tenant_for(101, None) is policy.tenants["vision"]


def test_pkeys_are_shown_in_hex_as_written(tmp_path: Path) -> None:
    """The membership bit is dropped for matching, kept for showing; VLANs stay decimal."""
    path = tmp_path / "policy.toml"
    path.write_text(BASE.replace('vlans = ["200-299"]',
                                    'vlans = ["200-299"]\nib_pkeys = ["0x8010-0x801f", "0x0005", 32800]'))
    tenant = load_policy(str(path)).tenants["b"]
    assert tenant.ib_pkeys.ranges == ((0x5, 0x5), (0x10, 0x1F), (0x20, 0x20))
    assert str(tenant.ib_pkeys) == "0x0005,0x8010-0x801f,0x8020"
    assert str(tenant.vlans) == "200-299"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('version = "7.0"', 'version = "5.0"', "policy.toml:2: opennebula.version: '5.0'"),
        ("max_gpus = 2", "max_gpus = -2", "policy.toml:6: tenant.a.max_gpus: -2 is outside"),
        ("max_gpus = 2", 'max_gpus = "2"', "policy.toml:6: tenant.a.max_gpus: must be an integer"),
        ("max_gpus = 2", "max_gpus = 2\ncolour = 1", "policy.toml:7: tenant.a.colour: unknown key"),
        ('vendor = "10de"', 'vendor = "nvidia"', "policy.toml:11: tenant.a.devices[0].vendor: must be a hex id"),
        ('vlans = ["200-299"]', 'vlans = ["150-299"]', "policy.toml:16: tenant.b.vlans: 150-299 overlaps tenant 'a'"),
        ('vlans = ["100-199"]', 'vlans = ["199-100"]', "policy.toml:7: tenant.a.vlans[0]: '199-100'"),
        ('vlans = ["100-199"]', 'vlans = ["100-5000"]', "policy.toml:7: tenant.a.vlans[0]"),
        ('group = "gb"', 'group = "ga"', "policy.toml:14: tenant.b.group: group 'ga' is already tenant 'a'"),
        ('group = "gb"', 'group = "oneadmin"', "tenant.b.group: 'oneadmin' is an infrastructure admin group"),
        ('group = "gb"\n', "", "policy.toml:13: tenant.b: missing required key 'group'"),
        ('group = "gb"', 'group = "g b"', "policy.toml:14: tenant.b.group: must be a name"),
        ("max_gpus = 2", "max_gpus = 2\nnetworks = [1, 1]", "policy.toml:7: tenant.a.networks: lists an id twice"),
        ('vendor = "10de"', 'vendor = "10de"\n\n[[tenant.a.devices]]\nname = "x"\nvendor = "10de"\nclusters = []\n'
         'device = 7', "policy.toml:17: tenant.a.devices[1].device: must be a hex id"),
        ("[tenant.a]", "[tenant.a", "policy.toml: not valid TOML"),
    ],
)  # fmt: skip
def test_invalid_policy_names_key_and_line(old: str, new: str, expected: str) -> None:
    assert old in BASE
    with pytest.raises(PolicyError) as caught:
        parse_policy(BASE.replace(old, new, 1), "policy.toml")
    assert expected in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)




def test_usage_totals_follow_updates() -> None:
    usage = Usage.of([(1, "a", 2), (2, "a", 1), (3, "b", 1)])
    assert usage.held_by_others("a", 1) == 1 and usage.held_by_others("a", 9) == 3
    usage.set(1, "a", 0)
    usage.discard(3)
    assert usage.totals == {"a": 1, "b": 0} and usage.held_by_others("a", 2) == 0


def test_sample_vm_decides_by_the_example_rules() -> None:
    """The synthesized sample VM (tenant-a, gid 100, H100 + VF on network 7 VLAN 1001, cluster 100)."""
    from aifactory_core.one.vm import parse_vm

    sample = Path(__file__).parent / "fixtures" / "opennebula" / "samples" / "synthesized" / "vm_gpu_pinned.xml"
    vm = parse_vm(sample.read_bytes())
    text = BASE.replace('group = "ga"', 'group = "tenant-a"\ngroup_id = 100\nnetworks = [0, 7]').replace(
        '["100-199"]', '["1000-1009"]')
    policy = parse_policy(text)
    assert decide(policy, vm).admitted
    refused = decide(policy, vm, Usage.of([(7, "a", 2), (42, "a", 1)]))  # its own GPU is not "others"
    assert [r.rule for r in refused.refusals] == ["tenant.a.max_gpus"]
    narrow = parse_policy(text.replace("networks = [0, 7]", "networks = [0]"))
    assert [r.rule for r in decide(narrow, vm).refusals] == ["tenant.a.networks"]
    other = parse_policy(text.replace('vendor = "10de"', 'vendor = "1002"'))
    assert [r.rule for r in decide(other, vm).refusals] == ["tenant.a.devices"]


def test_device_grant_clusters_must_be_the_tenants() -> None:
    text = BASE.replace("max_gpus = 2", "max_gpus = 2\nclusters = [1]").replace(
        'vendor = "10de"', 'vendor = "10de"\nclusters = [7]')
    with pytest.raises(PolicyError, match=r"policy.toml:13: tenant.a.devices\[0\].clusters: cluster 7 is not among"):
        parse_policy(text, "policy.toml")


def _overlaps_brute_force(spans: dict[str, list[tuple[int, int]]]) -> bool:
    flat = [(low, high, key) for key, items in spans.items() for low, high in items]
    return any(a[2] != b[2] and a[0] <= b[1] and b[0] <= a[1] for a in flat for b in flat)


_spans = st.dictionaries(st.sampled_from(["a", "b", "c", "d"]),
                         st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)), min_size=1, max_size=3),
                         min_size=1)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(_spans)
def test_vlan_overlap_between_tenants_is_found_exactly(spans: dict[str, list[tuple[int, int]]]) -> None:
    ranges = {key: [(low, low + width) for low, width in items] for key, items in spans.items()}
    text = "".join(
        f'[tenant.{key}]\ngroup = "g{key}"\nmax_gpus = 1\nvlans = {[f"{lo}-{hi}" for lo, hi in items]}\n'
        for key, items in ranges.items()
    ).replace("'", '"')
    if _overlaps_brute_force(ranges):
        with pytest.raises(PolicyError, match="overlaps tenant"):
            parse_policy(text)
    else:
        parse_policy(text)
