"""The host gate: ``aifactory_admit`` through the plugin manager, and ``admit_domain`` from the
deployment file (the synthesized ``deployment.0.xml``; devices identified through the real H100
host capture's sysfs or the synthetic DGX host)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from aifactory_plugins.policy import admit_domain

from aifactory_core.config import parse_config
from aifactory_core.domain import load_domain
from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot
from aifactory_core.one.vm import parse_vm
from aifactory_core.policy.schema import parse_policy

SAMPLES = Path(__file__).parent / "fixtures" / "opennebula" / "samples" / "synthesized"
POLICY = """
[tenant.a]
group = "tenant-a"
group_id = 100
clusters = [100]
max_gpus = {cap}
networks = [0, 7]
vlans = ["1000-1009"]

[[tenant.a.devices]]
name = "H100"
vendor = "10de"
device = "{device}"
clusters = [100]
"""


def policy(cap: int = 2, device: str = "2330"):
    return parse_policy(POLICY.format(cap=cap, device=device))


def domain(text: str | None = None):
    return load_domain(text if text is not None else (SAMPLES / "deployment.0.xml").read_bytes())


def test_domain_sample_is_admitted_from_its_metadata() -> None:
    """GPU 10de:2330 plus a ConnectX VF (a network function: not a GPU, not counted)."""
    assert admit_domain(domain(), policy(), cluster_id=100) == []
    assert admit_domain(domain(), policy(cap=0), cluster_id=100) == [
        "policy rule tenant.a.max_gpus: tenant a holds 0 GPUs; 1 more exceed its cap of 0"
    ]
    (refusal,) = admit_domain(domain(), policy(device="2335"), cluster_id=100)
    assert refusal.startswith("policy rule tenant.a.devices: device 10de:2330 class 0302 is not granted")
    (refusal,) = admit_domain(domain(), policy(), cluster_id=101)
    assert "only on clusters 100" in refusal


def test_domain_without_metadata_or_with_mismatched_list_is_refused() -> None:
    head, devices, body = (SAMPLES / "deployment.0.xml").read_text().partition("<devices>")  # past the comment
    text = head + devices + body
    no_meta = head + devices + re.sub(r"<metadata>.*</metadata>", "", body, flags=re.DOTALL)
    assert admit_domain(domain(no_meta), policy()) == [
        "policy rule tenant: the deployment file has no <one:vm> metadata, so the owner is unknown"]
    short = text.replace("10de:2330:0302,15b3:101e:0200", "10de:2330:0302")
    assert "2 hostdevs but <one:pci_devices> names 1" in admit_domain(domain(short), policy())[0]
    other_group = text.replace("<one:gid>100</one:gid>", "<one:gid>300</one:gid>").replace(
        "<one:gname>tenant-a</one:gname>", "<one:gname>intruders</one:gname>")
    assert admit_domain(domain(other_group), policy())[0].startswith("policy rule tenant: group intruders")


def test_domain_devices_are_identified_by_host_sysfs(h100_root: Path) -> None:
    """With the inventory, the host's sysfs says what each hostdev is, whatever the metadata claims."""
    inventory = HostInventory(HostRoot(h100_root))
    gpu = next(item for item in inventory.pci.values() if item.vendor_id == 0x10DE and item.class_code >> 16 == 3)
    head, devices, body = (SAMPLES / "deployment.0.xml").read_text().partition("<devices>")  # past the comment
    bus, slot, function = gpu.address[5:7], gpu.address[8:10], gpu.address[11]
    one_gpu = head + devices + re.sub(
        r"<hostdev.*?</hostdev>\s*<hostdev.*?</hostdev>",
        f"<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' "
        f"bus='0x{bus}' slot='0x{slot}' function='0x{function}'/></source></hostdev>", body, flags=re.DOTALL)
    lying = one_gpu.replace("10de:2330:0302,15b3:101e:0200", "10de:ffff:0302")
    granted = policy(device=f"{gpu.device_id:04x}")
    assert admit_domain(domain(lying), granted, inventory, 100) == []
    assert "not granted" in admit_domain(domain(lying), policy(device="ffff"), inventory, 100)[0]
    absent = one_gpu.replace(f"bus='0x{bus}'", "bus='0x7e'")
    assert "is not a PCI function of this host" in admit_domain(domain(absent), granted, inventory, 100)[0]


def test_admit_hook_through_the_plugin_manager(tmp_path: Path, h100_root: Path) -> None:
    from aifactory_core.plugins import build_manager

    path = tmp_path / "policy.toml"
    path.write_text(POLICY.format(cap=1, device="2330"))
    config = parse_config({"plugins": {"enabled": ["policy"]}, "plugin": {"policy": {"file": str(path)}}})
    manager, _ = build_manager(config)
    inventory = HostInventory(HostRoot(h100_root))
    vm = parse_vm((SAMPLES / "vm_gpu_pinned.xml").read_bytes())
    assert [r for result in manager.hook.aifactory_admit(inventory=inventory, request=vm, config=config)
            for r in result] == []  # fmt: skip
    path.write_text(POLICY.format(cap=0, device="2330"))
    reasons = [r for out in manager.hook.aifactory_admit(inventory=inventory, request=vm, config=config) for r in out]
    assert reasons == ["policy rule tenant.a.max_gpus: tenant a holds 0 GPUs; 1 more exceed its cap of 0"]
    path.write_text("[tenant.a]\nmax_gpus = 1\n")  # broken policy: fail closed
    reasons = [r for out in manager.hook.aifactory_admit(inventory=inventory, request=vm, config=config) for r in out]
    assert len(reasons) == 1 and "policy-file" in reasons[0] and "missing required key 'group'" in reasons[0]


def test_no_policy_file_and_not_required_admits(tmp_path: Path, h100_root: Path) -> None:
    from aifactory_plugins.policy import aifactory_admit

    config = parse_config({"plugin": {"policy": {"file": str(tmp_path / "absent.toml"), "required": False}}})
    vm = parse_vm((SAMPLES / "vm_gpu_pinned.xml").read_bytes())
    assert aifactory_admit(HostInventory(HostRoot(h100_root)), vm, config) is None
    required = parse_config({"plugin": {"policy": {"file": str(tmp_path / "absent.toml")}}})
    (reason,) = aifactory_admit(HostInventory(HostRoot(h100_root)), vm, required)
    assert "cannot read policy" in reason


@pytest.mark.parametrize("section", [{"colour": 1}, {"file": 3}, {"required": "yes"}, {"cluster_id": -1},
                                     {"on_refusal": "explode"}])  # fmt: skip
def test_plugin_config_is_validated(section: dict) -> None:
    from aifactory_plugins.policy import aifactory_configure

    from aifactory_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"plugin\.policy"):
        aifactory_configure(parse_config({}), "policy", section)
