"""The wrapped VMM actions: OpenNebula's argv/stdin/stdout/exit contract kept around the original.

The original driver script is a real executable that records what it received. Binding runs
through the simulated driver core (see ``simkernel``); real binding is in the real-kernel tests.
"""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import needs
import pytest
from simkernel import SimulatedDriverCore

from aifactory_core import vmm
from aifactory_core.domain import load_domain, pci_hostdevs
from aifactory_core.errors import DocumentError, HostError, UsageError
from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import ownership

GPU = "0000:1b:00.0"
DOMAIN = """<domain type='kvm'>
  <name>one-42</name><memory unit='KiB'>1048576</memory><vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <devices>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x1b' slot='0x00' function='0x0'/></source>
    </hostdev>
  </devices>
  <metadata><one:vm xmlns:one='http://opennebula.org/xmlns/libvirt/1.0'>
    <one:uid>5</one:uid><one:gid>100</one:gid><one:uname>alice</one:uname><one:gname>tenant-a</one:gname>
  </one:vm></metadata>
</domain>
"""
RECORDER = """#!/bin/sh
printf '%s\\n' "$@" > "$(dirname "$0")/{action}.argv"
cat > "$(dirname "$0")/{action}.stdin"
echo {stdout}
exit {status}
"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[HostRoot, Path]:
    from hostroots import generate_host

    root = generate_host("dgx-h100", tmp_path / "root")
    state = tmp_path / "state"
    originals = tmp_path / "remotes"
    originals.mkdir()
    monkeypatch.setenv("AIFACTORY_HOST_ROOT", str(root))
    monkeypatch.setenv("AIFACTORY_STATE_DIR", str(state))
    monkeypatch.setenv("AIFACTORY_CONFIG", os.devnull)
    monkeypatch.setenv(vmm.ENV_ORIGINAL_DIR, str(originals))
    SimulatedDriverCore().install(monkeypatch)
    return HostRoot(root, state), originals


def _original(directory: Path, action: str, stdout: str = "uuid-42", status: int = 0) -> None:
    path = directory / f"{action}.one"
    path.write_text(RECORDER.format(action=action, stdout=stdout, status=status))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run(action: str, argv: list[str], stdin: str, monkeypatch: pytest.MonkeyPatch) -> int:
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    return vmm.main([action, f"/var/tmp/one/vmm/kvm/{action}", *argv])


def test_deploy_prepares_rewrites_and_calls_the_original(env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    host, originals = env
    _original(originals, "deploy")
    argv = ["/var/lib/one//datastores/0/42/deployment.0", "gpu-node-01", "42", "gpu-node-01"]
    assert _run("deploy", argv, DOMAIN, monkeypatch) == 0
    assert capfd.readouterr().out == "uuid-42\n"  # the deploy id, as OpenNebula reads it
    assert (originals / "deploy.argv").read_text().split() == argv
    started = load_domain((originals / "deploy.stdin").read_bytes())
    assert [element.get("managed") for element, _ref in pci_hostdevs(started)] == ["no"]
    pcie_root = started.find("devices/controller[@model='pcie-root']")
    assert pcie_root is not None and int(pcie_root.findtext("pcihole64")) >= 128 * 1024 * 1024  # 128 GiB BAR
    assert HostInventory(host).pci[GPU].driver == "vfio-pci"
    assert ownership.held_devices(host) == {GPU: 42}

    _original(originals, "cancel")
    assert _run("cancel", ["uuid-42", "gpu-node-01", "42", "gpu-node-01"], "<VMM_DRIVER_ACTION_DATA/>",
                monkeypatch) == 0
    assert HostInventory(host).pci[GPU].driver == "nvidia"
    assert ownership.held_devices(host) == {}
    assert _run("cancel", ["uuid-42", "gpu-node-01", "42", "gpu-node-01"], "", monkeypatch) == 0  # idempotent


def test_failed_original_deploy_gives_the_devices_back(env: tuple[HostRoot, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    host, originals = env
    _original(originals, "deploy", stdout="", status=1)
    assert _run("deploy", ["/d/deployment.0", "h", "42", "h"], DOMAIN, monkeypatch) == 1
    assert HostInventory(host).pci[GPU].driver == "nvidia" and ownership.held_devices(host) == {}


def test_device_held_by_another_vm_refuses_deploy(env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    host, originals = env
    _original(originals, "deploy")
    ownership.claim(host, GPU, 41)
    assert _run("deploy", ["/d/deployment.0", "h", "42", "h"], DOMAIN, monkeypatch) == 1
    err = capfd.readouterr().err
    assert err == f"aifactory deploy: device {GPU} held by VM 41\n"
    assert not (originals / "deploy.argv").exists()


@pytest.mark.parametrize(
    ("argv", "stdin", "error"),
    [
        (["/d/deployment.0", "h", "../42", "h"], DOMAIN, UsageError),
        (["/d/deployment.0", "h"], DOMAIN, UsageError),
        (["/d/deployment.0", "h", "42", "h"], "<VM/>", DocumentError),
        (["/d/deployment.0", "h", "42", "h"], DOMAIN.replace("bus='0x1b'", "bus='0xee'"), HostError),
    ],
)
def test_bad_input_refused_with_one_line_and_nothing_changed(
        env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
        argv: list[str], stdin: str, error: type) -> None:
    host, originals = env
    _original(originals, "deploy")
    assert _run("deploy", argv, stdin, monkeypatch) != 0
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("aifactory deploy: ")
    assert not (originals / "deploy.argv").exists()
    assert HostInventory(host).pci[GPU].driver == "nvidia" and ownership.held_devices(host) == {}


def test_wrapper_scripts_are_shellcheck_clean_and_keep_the_action_name() -> None:
    wrappers = sorted((Path(__file__).parent.parent / "drivers" / "vmm" / "kvm").iterdir())
    assert {path.name for path in wrappers} >= {"deploy", "cancel", "shutdown"}
    for path in wrappers:
        assert os.access(path, os.X_OK)
        assert '-m aifactory_core.vmm "$(basename "$0")" "$0" "$@"' in path.read_text()
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", *map(str, wrappers)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_sudoers_snippet_allows_only_the_root_helper() -> None:
    snippet = Path(__file__).parent.parent / "drivers" / "sudoers" / "aifactory"
    visudo = needs.tool("visudo", "/usr/sbin/visudo", hint="apt-get install sudo")
    result = subprocess.run([visudo, "-cf", str(snippet)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = snippet.read_text()
    helper = "/usr/local/lib/aifactory/venv/bin/aifactory-root-helper"
    assert f"{helper} set-driver *" in text and f"{helper} reset *" in text
    granted = [line for line in text.splitlines() if line.startswith("oneadmin")]
    assert granted == ["oneadmin ALL=(root) NOPASSWD: AIFACTORY_ROOT_HELPER"]


@pytest.mark.parametrize("argv", [["set-driver", "../0000:00:03.0", "vfio-pci"], ["set-driver", "0000:00:03.0", "a/b"],
                                  ["set-driver", "0000:00:03.0", "vfio pci"], ["unbind", "0000:00:03.0"], [],
                                  ["reset", "0000:00:03.0", "extra"], ["reset", "/sys/bus/pci/devices/x"]])
def test_root_helper_grammar_is_closed(argv: list[str]) -> None:
    from aifactory_core.roothelper import parse

    with pytest.raises(UsageError):
        parse(argv)


def test_a_defect_is_one_line_not_a_traceback(env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    def broken(*_args: object) -> bytes:
        raise KeyError("boom")

    monkeypatch.setattr(vmm, "prepare_deploy", broken)
    assert _run("deploy", ["/d/deployment.0", "h", "42", "h"], DOMAIN, monkeypatch) == 1
    assert capfd.readouterr().err == "aifactory deploy: internal error: KeyError: 'boom'\n"


def test_vm_document_is_found_beside_the_deployment_file_inside_the_host_root(env: tuple[HostRoot, Path]) -> None:
    host, _originals = env
    assert vmm.vm_document_of("/var/lib/one//datastores/0/42/deployment.0", host) == host.path(
        "/var/lib/one/datastores/0/42/vm.xml")
    for bad in ("deployment.0", "/var/lib/one/datastores/0/../../../etc/deployment.0", "/a\0b/deployment.0"):
        with pytest.raises(UsageError, match="is not an absolute path"):
            vmm.vm_document_of(bad, host)


def _gpu_and_vf_domain(gpu: str, vf: str) -> str:
    def hostdev(address: str) -> str:
        domain, bus, slot_function = address.split(":")
        slot, function = slot_function.split(".")
        return (f"<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x{domain}' "
                f"bus='0x{bus}' slot='0x{slot}' function='0x{function}'/></source></hostdev>")
    return DOMAIN.replace(DOMAIN[DOMAIN.index("<hostdev"):DOMAIN.index("</hostdev>") + len("</hostdev>")],
                          hostdev(gpu) + hostdev(vf))


@pytest.mark.parametrize(("mode", "gpu", "status", "line"), [
    ("warn", GPU, 0, "WARN: aifactory deploy: VM 42: VF 0000:aa:00.2 is on NUMA node 1, the VM's GPUs on 0"),
    ("require", GPU, 1, "aifactory deploy: VM 42 refused: [plugin.sriov] numa_local = require: VF 0000:aa:00.2 "
                        "is on NUMA node 1, the VM's GPUs on 0"),
    ("require", "0000:c3:00.0", 0, None),  # GPU and VF both on node 1
    ("off", GPU, 0, None),
])
def test_a_vf_far_from_the_vms_gpus_is_logged_or_refused(
        env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
        tmp_path: Path, mode: str, gpu: str, status: int, line: str | None) -> None:
    """The DGX-shaped tree: GPUs on nodes 0 and 1, ConnectX VFs 0000:aa:00.2-5 on node 1."""
    host, originals = env
    config = tmp_path / "aifactory.conf"
    config.write_text(f'[plugins]\nenabled = ["vfio", "nvidia_gpu", "sriov"]\n[plugin.sriov]\nnuma_local = "{mode}"\n')
    monkeypatch.setenv("AIFACTORY_CONFIG", str(config))
    _original(originals, "deploy")
    argv = ["/var/lib/one//datastores/0/42/deployment.0", "gpu-node-01", "42", "gpu-node-01"]
    assert _run("deploy", argv, _gpu_and_vf_domain(gpu, "0000:aa:00.2"), monkeypatch) == status
    err = capfd.readouterr().err
    if line is None:
        assert "NUMA node" not in err
    else:
        assert line in err and len(err.strip().splitlines()) == 1
    assert (HostInventory(host).pci[gpu].driver == "vfio-pci") == (status == 0)


def test_numa_local_setting_is_checked(tmp_path: Path) -> None:
    from aifactory_core.config import load_config
    from aifactory_core.errors import ConfigError
    from aifactory_core.plugins import build_manager

    config = tmp_path / "aifactory.conf"
    config.write_text('[plugins]\nenabled = ["sriov"]\n[plugin.sriov]\nnuma_local = "sometimes"\n')
    with pytest.raises(ConfigError, match="numa_local = 'sometimes': expected warn, require or off"):
        build_manager(load_config(str(config)))
