"""The VMM wrapper's fast path (:mod:`aifactory_core.vmm_fast`): a VM the suite has nothing to do for
runs the original alone; every VM the full path would act for takes the full path.

Both directions: the wrappers as OpenNebula runs them (a real process; the fast path is the original
running in the wrapper's own process, which ``exec`` keeps), and in-process with ``exec`` replaced
by a recorder, on the simulated driver core of ``test_vmm_driver``. The fast path's tables are
checked against the modules they mirror, and the full path is shown to change nothing but an empty
journal for the device-less VM the fast path lets through.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from test_vmm_driver import DOMAIN, GPU, env  # noqa: F401 - fixture

from aifactory_core import vmm, vmm_actions, vmm_fast
from aifactory_core.config import load_config
from aifactory_core.domain import dump_domain, load_domain
from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import ownership
from aifactory_core.lifecycle.journal import Journal, journal_dir

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "tests" / "fixtures" / "opennebula" / "samples" / "synthesized"
VM_DIR = "/var/lib/one//datastores/0/42"
DEPLOY_ARGV = [f"{VM_DIR}/deployment.0", "gpu-node-01", "42", "gpu-node-01"]
RELEASING_ARGV = {
    "shutdown": ["uuid-42", "gpu-node-01", "42", "gpu-node-01"],
    "cancel": ["uuid-42", "gpu-node-01", "42", "gpu-node-01"],
    "save": ["uuid-42", f"{VM_DIR}/checkpoint", "gpu-node-01", "42", "gpu-node-01"],
    "migrate": ["uuid-42", "gpu-node-02", "gpu-node-01", "42", "gpu-node-01"],
}
ACTION_DATA = b"<VMM_DRIVER_ACTION_DATA><HOST>gpu-node-01</HOST></VMM_DRIVER_ACTION_DATA>"
RECORDER = """#!/bin/sh
printf '%s\\n' "$@" > "$(dirname "$0")/{action}.argv"
cat > "$(dirname "$0")/{action}.stdin"
echo $$ > "$(dirname "$0")/{action}.pid"
awk '/^SigIgn/ {{print $2}}' /proc/$$/status > "$(dirname "$0")/{action}.sigign"
echo out-{action}
exit {status}
"""
SIGPIPE_BIT = 1 << (13 - 1)


def pinned_domain() -> bytes:
    """The synthesized deployment file (oned's NUMA pinning kept) without its comment and hostdevs."""
    text = (SAMPLES / "deployment.0.xml").read_text()
    text = re.sub(r"<!--.*?-->\s*", "", text, flags=re.S)
    return re.sub(r"\s*<hostdev .*?</hostdev>", "", text, flags=re.S).encode()


def deviceless_domain() -> bytes:
    """:func:`pinned_domain` without its vCPU pins: a VM the suite has nothing to do for."""
    return re.sub(rb"\s*<vcpupin [^>]*/>", b"", pinned_domain())


def deviceless_vm() -> bytes:
    """VM 42's ``<VM>`` (owner, NIC on network 0) without its PCI device and PCI NIC."""
    text = (SAMPLES / "vm_gpu_pinned.xml").read_text()
    text = re.sub(r"<!--.*?-->\s*", "", text, flags=re.S)
    return re.sub(r"\s*<PCI>.*?</PCI>", "", text, flags=re.S).encode()


def _vm_directory(host: HostRoot) -> Path:
    directory = host.path(VM_DIR.replace("//", "/"))
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def no_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default policy file is absent (whatever this machine has at /etc/one), for the fast
    path's decision and the policy plugin alike."""
    from aifactory_plugins import policy

    monkeypatch.setattr(vmm_fast, "DEFAULT_POLICY", str(tmp_path / "absent-policy.toml"))
    monkeypatch.setattr(policy, "DEFAULT_FILE", str(tmp_path / "absent-policy.toml"))


@pytest.fixture
def deviceless(env: tuple[HostRoot, Path], no_policy: None) -> HostRoot:  # noqa: F811
    host, _originals = env
    (_vm_directory(host) / "vm.xml").write_bytes(deviceless_vm())
    return host


# ----------------------------------------------------------------------------------------------
# The tables the fast path keeps for itself (it may import nothing) against the modules they mirror.

def test_the_action_table_matches_opennebulas_argv() -> None:
    wrapped = {name for name, action in vmm_actions.ACTIONS.items() if action.wrapped}
    assert set(vmm_fast.ACTIONS) == wrapped - {"restore"} == vmm_actions.RELEASING | {"deploy"}
    for name, (count, vm_position, deployment_position) in vmm_fast.ACTIONS.items():
        action = vmm_actions.ACTIONS[name]
        assert count == len(action.argv)
        assert vm_position == action.position(vmm_actions.VM_ID)
        expected = action.position(vmm_actions.DEPLOYMENT_FILE) if name == "deploy" else None
        assert deployment_position == expected


def test_constants_match_the_modules_they_mirror() -> None:
    from aifactory_plugins import policy

    from aifactory_core import config, hostroot, plugins
    from aifactory_core.policy import hostgate

    assert (vmm_fast.ENV_HOST_ROOT, vmm_fast.ENV_STATE_DIR, vmm_fast.DEFAULT_STATE_DIR) == (
        hostroot.ENV_HOST_ROOT, hostroot.ENV_STATE_DIR, hostroot.DEFAULT_STATE_DIR)
    assert (vmm_fast.ENV_CONFIG, vmm_fast.DEFAULT_CONFIG, vmm_fast.MAX_CONFIG) == (
        config.ENV_CONFIG, config.DEFAULT_PATH, config.MAX_CONFIG_BYTES)
    assert (vmm_fast.ENV_ORIGINAL_DIR, vmm_fast.MAX_STDIN) == (vmm.ENV_ORIGINAL_DIR, vmm.MAX_STDIN)
    assert vmm_fast.MAX_VM_DOCUMENT == hostgate.MAX_VM_DOCUMENT
    assert vmm_fast.DEFAULT_POLICY == policy.DEFAULT_FILE
    assert vmm_fast.ENTRY_POINT_GROUP == plugins.ENTRY_POINT_GROUP
    registered = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["aifactory.plugins"]
    assert vmm_fast.BUILTIN_PLUGINS == registered


def test_paths_are_the_ones_the_full_path_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aifactory_core.vnm.hook import vnm_host

    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("AIFACTORY_HOST_ROOT", str(root))
    for state in ("", str(tmp_path / "state")):
        monkeypatch.setenv("AIFACTORY_STATE_DIR", state)
        host = HostRoot.resolve(None)
        found = vmm_fast.host_root()
        assert found is not None
        assert Path(vmm_fast.state_dir(found)) == host.state_dir
        assert tuple(map(Path, vmm_fast.journals(vmm_fast.state_dir(found), 42))) == (
            journal_dir(host) / "42.json", journal_dir(vnm_host(host)) / "42.json")
        assert Path(vmm_fast.state_dir(found), "owners") == ownership._owners(host)
        for deployment in (DEPLOY_ARGV[0], "/var/lib/one/datastores/100/7/deployment.3", "/d/./x//deployment.0"):
            assert Path(vmm_fast.vm_document(found, deployment)) == vmm.vm_document_of(deployment, host)


def test_only_the_known_built_ins_have_deploy_hooks() -> None:
    """The fast path skips the built-ins for a VM without hostdevs: each deploy hook a built-in has
    acts only through hostdevs, except policy's and cpu_pinning's, which the fast path checks for
    (a new one here must be judged the same way before this set grows)."""
    import importlib

    implementing = {name for name, module in vmm_fast.BUILTIN_PLUGINS.items()
                    if any(hasattr(importlib.import_module(module), hook) for hook in vmm_fast.DEPLOY_HOOKS)}
    assert implementing == {"vfio", "nvidia_gpu", "sriov", "policy", "cpu_pinning"}


# ----------------------------------------------------------------------------------------------
# What the full path does for the VM the fast path lets through: nothing but an empty journal.

def test_the_full_path_changes_nothing_for_a_vm_the_fast_path_lets_through(deviceless: HostRoot) -> None:
    host = deviceless
    domain = deviceless_domain()
    assert vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, domain) is None
    before = dump_domain(load_domain(domain))
    started, network_made = vmm.prepare_deploy(host, load_config(None), domain, 42,
                                               vmm.vm_document_of(DEPLOY_ARGV[0], host))
    assert started == before and network_made is False
    journal = Journal.load(host, 42)
    assert journal is not None and journal.phase == "prepared" and journal.steps == []
    assert ownership.held_devices(host) == {}
    assert not (host.state_dir / "pinning").exists() and not (host.state_dir / "vnm").exists()


def test_oneds_numa_pinning_is_planned_by_the_full_path(deviceless: HostRoot, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    host = deviceless
    config = tmp_path / "aifactory.conf"
    config.write_text('[plugins]\nenabled = ["cpu_pinning"]\n')
    monkeypatch.setenv("AIFACTORY_CONFIG", str(config))
    domain = pinned_domain()
    assert vmm_fast.domain_reason(domain) == "the domain pins vCPUs (vcpupin)"
    vmm.prepare_deploy(host, load_config(None), domain, 42)
    assert (host.state_dir / "pinning" / "42.json").exists()  # what the fast path must not skip


def test_plan_unpinned_all_plans_a_vm_without_devices(deviceless: HostRoot, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    host = deviceless
    config = tmp_path / "aifactory.conf"
    config.write_text('[plugins]\nenabled = ["cpu_pinning"]\n[plugin.cpu_pinning]\nplan_unpinned = "all"\n')
    monkeypatch.setenv("AIFACTORY_CONFIG", str(config))
    domain = deviceless_domain()
    assert vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, domain) == (
        f"the configuration {config} mentions 'cpu_pinning'")
    started, _network = vmm.prepare_deploy(host, load_config(None), domain, 42)
    assert b"<vcpupin" in started and (host.state_dir / "pinning" / "42.json").exists()


def test_a_tenant_policy_decides_a_vm_without_devices(deviceless: HostRoot, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy gate refuses a device-less VM of tenant llm-lab (gid 100): its NIC's network 0 is
    not granted. So a host with a policy takes the full path for every deploy."""
    from aifactory_core.errors import PolicyRefused

    host = deviceless
    config = tmp_path / "aifactory.conf"
    config.write_text(f'[plugin.policy]\nfile = "{REPO / "examples" / "policy.toml"}"\n')
    monkeypatch.setenv("AIFACTORY_CONFIG", str(config))
    domain = deviceless_domain()
    assert vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, domain) == f"the configuration {config} mentions 'policy'"
    with pytest.raises(PolicyRefused, match="network 0 is not granted"):
        vmm.prepare_deploy(host, load_config(None), domain, 42, vmm.vm_document_of(DEPLOY_ARGV[0], host))

    monkeypatch.setenv("AIFACTORY_CONFIG", os.devnull)  # the same policy at the default path
    default = tmp_path / "aifactory-policy.toml"
    default.write_bytes((REPO / "examples" / "policy.toml").read_bytes())
    monkeypatch.setattr(vmm_fast, "DEFAULT_POLICY", str(default))
    assert vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, domain) == f"a tenant policy applies ({default})"


# ----------------------------------------------------------------------------------------------
# Each thing that sends a call to the full path, against the same call without it.

@pytest.mark.parametrize(("change", "reason"), [
    (lambda d: d.replace(b"<devices>", b"<devices><hostdev mode='subsystem' type='pci'/>", 1),
     "the domain mentions hostdev"),
    (lambda d: d.replace(b"<interface type='bridge'>", b"<interface type='hostdev'>"), "the domain mentions hostdev"),
    (lambda d: d.replace(b"<devices>", b"<devices><!-- HostDev -->", 1), "the domain mentions hostdev"),
    (lambda d: d.replace(b"<interface type='bridge'>", b"<interface type='&#104;ostdev'>"),
     "the domain holds a character reference"),
    (lambda d: d.replace(b"<name>", b"<vcpupin vcpu='0' cpuset='1'/><name>", 1), "the domain pins vCPUs (vcpupin)"),
    (lambda d: d.replace(b"<name>", b"<name>\0", 1), "the domain holds a NUL byte"),
    (lambda d: b'<?xml version="1.0"?>\n' + d, "the domain is not a plain <domain> document"),
    (lambda d: b"<!DOCTYPE domain>\n" + d, "the domain is not a plain <domain> document"),
    (lambda d: "<domain".encode("utf-16") + d[7:], "the domain is not a plain <domain> document"),
    (lambda d: b"<domainx" + d[7:], "the domain is not a plain <domain> document"),
    (lambda d: b"<VM/>", "the domain is not a plain <domain> document"),
    (lambda d: d + b" " * vmm_fast.MAX_STDIN, f"the domain is larger than {vmm_fast.MAX_STDIN} bytes"),
])
def test_a_domain_that_may_take_devices_or_pins_takes_the_full_path(deviceless: HostRoot, change: object,
                                                                    reason: str) -> None:
    domain = deviceless_domain()
    assert vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, domain) is None
    assert vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, change(domain)) == reason  # type: ignore[operator]


@pytest.mark.parametrize(("document", "reason"), [
    (lambda v: v.replace(b"</TEMPLATE>", b"<PCI><TYPE>NIC</TYPE><NETWORK_ID>21</NETWORK_ID></PCI></TEMPLATE>"),
     "lists a PCI device or NIC"),
    (lambda v: v.replace(b"</TEMPLATE>", b"<PCI><VENDOR>10de</VENDOR></PCI></TEMPLATE>"), "lists a PCI device or NIC"),
    (lambda v: b'<?xml version="1.0" encoding="UTF-16"?>' + v, "is not plain UTF-8 XML"),
    (lambda v: v.decode().encode("utf-16"), "is not plain UTF-8 XML"),
    (lambda v: v + b" " * vmm_fast.MAX_VM_DOCUMENT, "is larger than"),
])
def test_a_vm_document_with_a_pci_device_or_nic_takes_the_full_path(deviceless: HostRoot, document: object,
                                                                     reason: str) -> None:
    path = _vm_directory(deviceless) / "vm.xml"
    assert vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, deviceless_domain()) is None
    path.write_bytes(document(deviceless_vm()))  # type: ignore[operator]
    found = vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, deviceless_domain())
    assert found is not None and found.startswith(str(path)) and reason in found


def test_utf8_declarations_and_no_vm_document_stay_on_the_fast_path(deviceless: HostRoot) -> None:
    path = _vm_directory(deviceless) / "vm.xml"
    for head in (b'<?xml version="1.0" encoding="UTF-8"?>\n', b"<?xml version='1.0' encoding='utf-8'?>",
                 b'\xef\xbb\xbf<?xml version="1.0"?>'):
        path.write_bytes(head + deviceless_vm().split(b"?>", 1)[1])
        assert vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, deviceless_domain()) is None, head
    path.unlink()
    assert vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, deviceless_domain()) is None


@pytest.mark.parametrize(("config", "word"), [
    ('[plugin.policy]\nfile = "/etc/one/p.toml"\n', "policy"),
    ('plugin.policy.required = true\n', "policy"),
    ('[plugins]\ndisabled = ["Policy"]\n', "policy"),
    ('[plugin.cpu_pinning]\nplan_unpinned = "all"\n', "cpu_pinning"),
    ('[plugin."\\u0070olicy"]\nrequired = true\n', "\\"),
])
def test_a_configuration_naming_policy_or_cpu_pinning_takes_the_full_path(
        deviceless: HostRoot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str, word: str) -> None:
    from aifactory_core.install.manifest import DEFAULT_CONFIG

    path = tmp_path / "aifactory.conf"
    path.write_text(DEFAULT_CONFIG)  # as install.sh writes it: on the fast path
    monkeypatch.setenv("AIFACTORY_CONFIG", str(path))
    assert vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, deviceless_domain()) is None
    path.write_text(config)
    assert vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, deviceless_domain()) == (
        f"the configuration {path} mentions {word!r}")


def test_a_missing_configuration_that_was_asked_for_takes_the_full_path(
        deviceless: HostRoot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIFACTORY_CONFIG", str(tmp_path / "absent.conf"))
    assert vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, deviceless_domain()) == (
        f"the configuration {tmp_path / 'absent.conf'} is missing")


def _distribution(directory: Path, name: str, entry_points: str, module: str | None = None) -> None:
    info = directory / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    if module is not None:
        (directory / f"{name}.py").write_text(textwrap.dedent(module))


PLUGIN_MODULE = """
    from aifactory_core.hookspecs import hookimpl

    AIFACTORY_API_VERSION = 1


    @hookimpl
    def aifactory_doctor_checks():
        return None
"""


def test_a_vendor_plugin_takes_the_full_path_unless_it_declares_no_deploy_hooks(
        deviceless: HostRoot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aifactory_core.config import parse_config
    from aifactory_core.plugins import build_manager

    site = tmp_path / "site"
    monkeypatch.syspath_prepend(str(site))
    _distribution(site, "acme_probe", "[aifactory.plugins]\nacme_probe = acme_probe\n", PLUGIN_MODULE)
    assert vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, deviceless_domain()) == (
        "plugin 'acme_probe' (acme_probe) is no built-in and does not declare itself in aifactory.no_deploy_hooks")

    (site / "acme_probe-1.0.dist-info" / "entry_points.txt").write_text(
        "[aifactory.plugins]\nacme_probe = acme_probe\n\n[aifactory.no_deploy_hooks]\nacme_probe = acme_probe\n")
    assert vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, deviceless_domain()) is None
    _manager, loaded = build_manager(parse_config({"plugins": {"enabled": ["acme_probe"]}}))
    assert [plugin.name for plugin in loaded] == ["acme_probe"]

    (site / "acme_probe-1.0.dist-info" / "entry_points.txt").write_text(  # declared for another module
        "[aifactory.plugins]\nacme_probe = acme_probe\n\n[aifactory.no_deploy_hooks]\nacme_probe = acme_other\n")
    assert vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, deviceless_domain()) is not None


def test_a_plugin_declaring_no_deploy_hooks_that_has_one_is_refused(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from aifactory_core.config import parse_config
    from aifactory_core.errors import PluginError
    from aifactory_core.plugins import build_manager

    site = tmp_path / "site"
    monkeypatch.syspath_prepend(str(site))
    _distribution(site, "acme_admit", "[aifactory.plugins]\nacme_admit = acme_admit\n\n"
                  "[aifactory.no_deploy_hooks]\nacme_admit = acme_admit\n",
                  PLUGIN_MODULE + "\n\n    @hookimpl\n    def aifactory_admit(request):\n        return None\n")
    with pytest.raises(PluginError, match="'acme_admit' declares no deploy hooks .* but implements aifactory_admit"):
        build_manager(parse_config({"plugins": {"enabled": ["acme_admit"]}}))


def test_a_built_in_name_on_another_module_takes_the_full_path(deviceless: HostRoot, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    monkeypatch.syspath_prepend(str(site))
    _distribution(site, "acme_vfio", "[aifactory.plugins]\nvfio = acme_vfio\n")
    assert vmm_fast.full_path_reason("deploy", DEPLOY_ARGV, deviceless_domain()) == (
        "plugin 'vfio' (acme_vfio) is no built-in and does not declare itself in aifactory.no_deploy_hooks")


def test_entry_points_are_read_as_importlib_reads_them() -> None:
    text = ("# comment\n[console_scripts]\nx = y\n[aifactory.plugins]\n  a = m.a  \n;b = m.b\n"
            "[aifactory.plugins.more]\nc = m.c\n[aifactory.no_deploy_hooks]\na = m.a\n")
    assert vmm_fast.entry_points(text) == {"aifactory.plugins": [("a", "m.a"), (";b", "m.b")],
                                           "aifactory.no_deploy_hooks": [("a", "m.a")]}
    from importlib.metadata import EntryPoints

    parsed = EntryPoints._from_text(text)  # type: ignore[attr-defined]
    assert [(entry.name, entry.value) for entry in parsed if entry.group == "aifactory.plugins"] == [
        ("a", "m.a"), (";b", "m.b")]
    assert vmm_fast.entry_points("[aifactory.plugins]\nno equals sign\n") is None


@pytest.mark.parametrize(("action", "argv", "reason"), [
    ("restore", [f"{VM_DIR}/checkpoint", "h", "uuid-42", "42", "h"], "'restore' has no fast path"),
    ("reboot", ["uuid-42", "h", "42", "h"], "'reboot' has no fast path"),
    ("shutdown", ["uuid-42", "h", "42"], "3 arguments, not 4"),
    ("save", ["uuid-42", f"{VM_DIR}/checkpoint", "h", "42"], "4 arguments, not 5"),
    ("shutdown", ["uuid-42", "h", " 42", "h"], "VM id ' 42' is not a plain number"),
    ("shutdown", ["uuid-42", "h", "٤٢", "h"], "VM id '٤٢' is not a plain number"),
    ("shutdown", ["uuid-42", "h", "2147483648", "h"], "VM id '2147483648' is not a plain number"),
    ("deploy", ["deployment.0", "h", "42", "h"], "the deployment file is not a plain absolute path"),
    ("deploy", ["/var/lib/one/../../etc/42/deployment.0", "h", "42", "h"],
     "the deployment file is not a plain absolute path"),
])
def test_an_argv_the_full_path_must_judge_takes_it(deviceless: HostRoot, action: str, argv: list[str],
                                                   reason: str) -> None:
    assert vmm_fast.full_path_reason(action, argv, deviceless_domain()) == reason


def test_a_host_root_that_is_no_directory_takes_the_full_path(deviceless: HostRoot, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert vmm_fast.full_path_reason("cancel", RELEASING_ARGV["cancel"]) is None
    monkeypatch.setenv("AIFACTORY_HOST_ROOT", str(tmp_path / "absent"))
    assert vmm_fast.full_path_reason("cancel", RELEASING_ARGV["cancel"]) == "the host root is not a directory"


# ----------------------------------------------------------------------------------------------
# The state of the VM: a journal or a claim sends every action to the full path.

@pytest.mark.parametrize("action", ["deploy", *sorted(RELEASING_ARGV)])
def test_a_journal_or_a_claim_sends_every_action_to_the_full_path(deviceless: HostRoot, action: str) -> None:
    host = deviceless
    argv = DEPLOY_ARGV if action == "deploy" else RELEASING_ARGV[action]
    domain = deviceless_domain() if action == "deploy" else None
    assert vmm_fast.full_path_reason(action, argv, domain) is None
    ownership.claim(host, "0000:c3:00.0", 41)  # another VM's claim changes nothing for VM 42
    assert vmm_fast.full_path_reason(action, argv, domain) is None
    ownership.claim(host, GPU, 42)
    assert vmm_fast.full_path_reason(action, argv, domain) == f"VM 42 holds device {GPU}"
    ownership.disown(host, GPU, 42)
    for journal_host in (host, HostRoot(host.root, host.state_dir / "vnm")):
        journal = Journal(journal_host, 42)
        journal.save()
        assert vmm_fast.full_path_reason(action, argv, domain) == f"VM 42 has a journal ({journal.path})"
        journal.remove()
    assert vmm_fast.full_path_reason(action, argv, domain) is None


def test_an_unreadable_ownership_record_takes_the_full_path(deviceless: HostRoot, tmp_path: Path) -> None:
    owners = deviceless.state_dir / "owners"
    owners.mkdir(parents=True)
    (tmp_path / "elsewhere").write_text("42\n")
    (owners / GPU).symlink_to(tmp_path / "elsewhere")
    found = vmm_fast.full_path_reason("cancel", RELEASING_ARGV["cancel"])
    assert found is not None and found.startswith(f"cannot read the ownership record {owners / GPU}")


# ----------------------------------------------------------------------------------------------
# In-process: the fast path calls exec; every other call runs the full path (simulated driver core).

class Execed(Exception):
    pass


@pytest.fixture
def exec_recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], bytes | None]]:
    calls: list[tuple[str, list[str], bytes | None]] = []

    def record(original: str, argv: list[str], stdin: bytes | None) -> None:
        calls.append((original, argv, stdin))
        raise Execed(original)

    monkeypatch.setattr(vmm_fast, "exec_original", record)
    return calls


def _main(action: str, argv: list[str], stdin: bytes, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    return vmm_fast.main([action, f"/var/tmp/one/vmm/kvm/{action}", *argv])


def _recorder(directory: Path, action: str, status: int = 0) -> None:
    path = directory / f"{action}.one"
    path.write_text(RECORDER.format(action=action, status=status))
    path.chmod(0o755)


def test_a_vm_with_a_gpu_is_deployed_and_released_by_the_full_path(
        env: tuple[HostRoot, Path], no_policy: None, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        exec_recorded: list[tuple[str, list[str], bytes | None]]) -> None:
    host, originals = env
    for action in ("deploy", "shutdown", "cancel"):
        _recorder(originals, action)
    assert _main("deploy", DEPLOY_ARGV, DOMAIN.encode(), monkeypatch) == 0
    assert HostInventory(host).pci[GPU].driver == "vfio-pci" and ownership.held_devices(host) == {GPU: 42}
    assert b'managed="no"' in (originals / "deploy.stdin").read_bytes()  # the full path's edited domain
    assert _main("shutdown", RELEASING_ARGV["shutdown"], ACTION_DATA, monkeypatch) == 0
    assert HostInventory(host).pci[GPU].driver == "nvidia" and ownership.held_devices(host) == {}
    assert Journal.load(host, 42) is None
    assert exec_recorded == []
    with pytest.raises(Execed):  # nothing left: the next cancel runs the original alone
        _main("cancel", RELEASING_ARGV["cancel"], ACTION_DATA, monkeypatch)


def test_a_claim_without_a_journal_is_given_back_by_the_full_path(
        env: tuple[HostRoot, Path], no_policy: None, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        exec_recorded: list[tuple[str, list[str], bytes | None]]) -> None:
    """The policy gate claims a deploy's devices before prepare journals them: a deploy that died in
    between leaves an ownership record alone, which cancel gives back."""
    host, originals = env
    ownership.claim(host, GPU, 42)
    _recorder(originals, "cancel")
    assert _main("cancel", RELEASING_ARGV["cancel"], ACTION_DATA, monkeypatch) == 0
    assert ownership.held_devices(host) == {} and exec_recorded == []


def test_a_deploy_whose_vm_document_lists_a_pci_nic_takes_the_full_path(
        deviceless: HostRoot, env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        exec_recorded: list[tuple[str, list[str], bytes | None]]) -> None:
    """The full path configures a PCI NIC's VF at deploy when VNM pre could not; without a tenant
    grant for it (no policy here) it refuses, before the original runs."""
    _host, originals = env
    vm_xml = _vm_directory(deviceless) / "vm.xml"
    vm_xml.write_bytes((SAMPLES / "vm_gpu_pinned.xml").read_bytes())
    _recorder(originals, "deploy")
    assert _main("deploy", DEPLOY_ARGV, deviceless_domain(), monkeypatch) != 0
    assert exec_recorded == [] and not (originals / "deploy.argv").exists()


def test_a_deviceless_deploy_hands_the_domain_to_exec_unchanged(
        deviceless: HostRoot, env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        exec_recorded: list[tuple[str, list[str], bytes | None]]) -> None:
    _host, originals = env
    _recorder(originals, "deploy")
    with pytest.raises(Execed):
        _main("deploy", DEPLOY_ARGV, deviceless_domain(), monkeypatch)
    assert exec_recorded == [(str(originals / "deploy.one"), DEPLOY_ARGV, deviceless_domain())]
    assert not journal_dir(deviceless).exists()


def test_an_original_that_cannot_be_run_leaves_the_error_to_the_full_path(
        deviceless: HostRoot, env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capfd: pytest.CaptureFixture[str], exec_recorded: list[tuple[str, list[str], bytes | None]]) -> None:
    _host, originals = env
    assert _main("shutdown", RELEASING_ARGV["shutdown"], ACTION_DATA, monkeypatch) == 2
    assert capfd.readouterr().err == (f"aifactory shutdown: original shutdown driver {originals / 'shutdown.one'} "
                                      "is missing: re-run install.sh --upgrade\n")
    assert exec_recorded == []


# ----------------------------------------------------------------------------------------------
# The wrappers as OpenNebula runs them: on the fast path the original is the wrapper's own process.

@pytest.fixture
def wrapper_env(deviceless: HostRoot, env: tuple[HostRoot, Path]) -> dict[str, str]:  # noqa: F811
    if os.path.exists("/etc/one/aifactory-policy.toml"):
        pytest.skip("this machine has a tenant policy at /etc/one/aifactory-policy.toml: every deploy is decided")
    return {**os.environ, "AIFACTORY_PYTHON": sys.executable}


def _wrapper(action: str, argv: list[str], stdin: bytes, environment: dict[str, str],
             originals: Path) -> tuple[subprocess.CompletedProcess[bytes], int]:
    process = subprocess.Popen([str(REPO / "drivers" / "vmm" / "kvm" / action), *argv], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)
    out, err = process.communicate(stdin, timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), process.pid


@pytest.mark.parametrize(("action", "status"), [("deploy", 0), ("deploy", 3), *((name, 0) for name in RELEASING_ARGV),
                                                ("cancel", 1)])
def test_the_wrapper_becomes_the_original_for_a_vm_without_devices(
        env: tuple[HostRoot, Path], wrapper_env: dict[str, str], action: str, status: int) -> None:  # noqa: F811
    host, originals = env
    _recorder(originals, action, status)
    argv, stdin = (DEPLOY_ARGV, deviceless_domain()) if action == "deploy" else (RELEASING_ARGV[action], ACTION_DATA)
    result, pid = _wrapper(action, argv, stdin, wrapper_env, originals)
    assert (result.returncode, result.stdout, result.stderr) == (status, f"out-{action}\n".encode(), b"")
    assert (originals / f"{action}.pid").read_text() == f"{pid}\n"  # exec: no child process
    assert (originals / f"{action}.argv").read_text().splitlines() == argv
    assert (originals / f"{action}.stdin").read_bytes() == stdin  # byte for byte, as OpenNebula sent it
    assert int((originals / f"{action}.sigign").read_text(), 16) & SIGPIPE_BIT == 0  # as subprocess leaves it
    assert not journal_dir(host).exists()


def test_the_wrapper_runs_the_full_path_for_a_vm_with_a_journal(
        env: tuple[HostRoot, Path], wrapper_env: dict[str, str]) -> None:  # noqa: F811
    host, originals = env
    Journal(host, 42, phase="prepared").save()  # what a full-path deploy of a VM without devices leaves
    _recorder(originals, "shutdown")
    result, pid = _wrapper("shutdown", RELEASING_ARGV["shutdown"], ACTION_DATA, wrapper_env, originals)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"out-shutdown\n", b"")
    assert (originals / "shutdown.pid").read_text() != f"{pid}\n"  # the full path's child
    assert Journal.load(host, 42) is None  # released
