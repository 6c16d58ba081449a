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
    _domain_runs(host, 41)
    assert _run("deploy", ["/d/deployment.0", "h", "42", "h"], DOMAIN, monkeypatch) == 1
    err = capfd.readouterr().err
    assert err == f"aifactory deploy: device {GPU} held by VM 41\n"
    assert not (originals / "deploy.argv").exists()


def _domain_runs(host: HostRoot, vm: int) -> None:
    """libvirt's record of the running domain one-<vm> (what reconciliation reads)."""
    directory = host.path("/run/libvirt/qemu")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"one-{vm}.pid").write_text("4242\n")


def test_a_device_held_by_a_vm_without_a_domain_is_given_back_and_deployed(
        env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """The guest of VM 41 powered itself off and OpenNebula terminated it without a driver action:
    its claim is reconciled before VM 42's deploy would be refused."""
    host, originals = env
    _original(originals, "deploy")
    ownership.claim(host, GPU, 41)
    host.path("/run/libvirt/qemu").mkdir(parents=True)  # libvirt runs no domain one-41
    assert _run("deploy", ["/d/deployment.0", "h", "42", "h"], DOMAIN, monkeypatch) == 0
    assert "VM 41 no longer ran: what it held was given back before this claim" in capfd.readouterr().err
    assert ownership.held_devices(host) == {GPU: 42}


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
        assert ("-c 'import sys; from aifactory_core.vmm_fast import main; sys.exit(main())' "
                '"$(basename "$0")" "$0" "$@"') in path.read_text()
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


# ----------------------------------------------------------------------------------------------
# Every wrapped action: the argv OpenNebula's driver builds (aifactory_core.vmm_actions).

VM_DIR = "/var/lib/one//datastores/0/42"
CHECKPOINT = f"{VM_DIR}/checkpoint"
DEPLOY_ARGV = [f"{VM_DIR}/deployment.0", "gpu-node-01", "42", "gpu-node-01"]
RELEASING_ARGV = {
    "shutdown": ["uuid-42", "gpu-node-01", "42", "gpu-node-01"],
    "cancel": ["uuid-42", "gpu-node-01", "42", "gpu-node-01"],
    "save": ["uuid-42", CHECKPOINT, "gpu-node-01", "42", "gpu-node-01"],
    "migrate": ["uuid-42", "gpu-node-02", "gpu-node-01", "42", "gpu-node-01"],
}
RESTORE_ARGV = [CHECKPOINT, "gpu-node-01", "uuid-42", "42", "gpu-node-01"]
ACTION_DATA = "<VMM_DRIVER_ACTION_DATA><HOST>gpu-node-01</HOST></VMM_DRIVER_ACTION_DATA>"
RESTORE_RECORDER = """#!/bin/sh
printf '%s\\n' "$@" > "$(dirname "$0")/restore.argv"
basename "$(readlink "$AIFACTORY_HOST_ROOT/sys/bus/pci/devices/{gpu}/driver")" > "$(dirname "$0")/restore.driver"
echo "restore failed: {status}" >&2
exit {status}
"""


def _deployed(host: HostRoot, originals: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """VM 42 deployed with the GPU, its deployment file written where OpenNebula's deploy writes it."""
    _original(originals, "deploy")
    assert _run("deploy", DEPLOY_ARGV, DOMAIN, monkeypatch) == 0
    deployment = host.path(DEPLOY_ARGV[0])
    deployment.parent.mkdir(parents=True, exist_ok=True)
    deployment.write_bytes((originals / "deploy.stdin").read_bytes())
    assert ownership.held_devices(host) == {GPU: 42}


def _restore_original(originals: Path, status: int = 0) -> None:
    path = originals / "restore.one"
    path.write_text(RESTORE_RECORDER.format(gpu=GPU, status=status))
    path.chmod(0o755)


@pytest.mark.parametrize("action", sorted(RELEASING_ARGV))
def test_each_releasing_action_reads_the_vm_id_where_opennebula_puts_it(
        env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
        action: str) -> None:
    """save and migrate get five arguments, the VM id fourth; shutdown and cancel four, the VM id third."""
    host, originals = env
    _deployed(host, originals, monkeypatch)
    _original(originals, action, stdout="")
    capfd.readouterr()
    assert _run(action, RELEASING_ARGV[action], ACTION_DATA, monkeypatch) == 0, capfd.readouterr().err
    assert (originals / f"{action}.argv").read_text().splitlines() == RELEASING_ARGV[action]
    assert (originals / f"{action}.stdin").read_text() == ACTION_DATA
    assert HostInventory(host).pci[GPU].driver == "nvidia" and ownership.held_devices(host) == {}


@pytest.mark.parametrize("action", sorted(RELEASING_ARGV))
def test_a_failed_releasing_action_keeps_the_devices(env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch,
                                                     action: str) -> None:
    host, originals = env
    _deployed(host, originals, monkeypatch)
    _original(originals, action, stdout="", status=1)
    assert _run(action, RELEASING_ARGV[action], ACTION_DATA, monkeypatch) == 1
    assert HostInventory(host).pci[GPU].driver == "vfio-pci" and ownership.held_devices(host) == {GPU: 42}


@pytest.mark.parametrize(("action", "argv"), [
    ("save", ["uuid-42", CHECKPOINT, "gpu-node-01", "42"]),  # the old reading: four arguments
    ("save", ["uuid-42", CHECKPOINT, "gpu-node-01", "not-a-vm", "gpu-node-01"]),
    ("migrate", ["uuid-42", "gpu-node-02", "gpu-node-01", "42", "gpu-node-01", "extra"]),
    ("restore", ["uuid-42", "gpu-node-01", "42", "gpu-node-01"]),
    ("reboot", ["uuid-42", "gpu-node-01", "42", "gpu-node-01"]),  # not an action the suite wraps
])
def test_an_argv_of_the_wrong_shape_is_refused_before_the_original_runs(
        env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
        action: str, argv: list[str]) -> None:
    host, originals = env
    _deployed(host, originals, monkeypatch)
    _original(originals, action)
    capfd.readouterr()
    assert _run(action, argv, ACTION_DATA, monkeypatch) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"aifactory {action}: "), err
    assert not (originals / f"{action}.argv").exists()
    assert ownership.held_devices(host) == {GPU: 42}


def test_restore_claims_and_binds_the_devices_again_before_the_original_runs(
        env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    host, originals = env
    _deployed(host, originals, monkeypatch)
    _original(originals, "save", stdout="")
    assert _run("save", RELEASING_ARGV["save"], ACTION_DATA, monkeypatch) == 0
    assert HostInventory(host).pci[GPU].driver == "nvidia" and ownership.held_devices(host) == {}

    _restore_original(originals)
    assert _run("restore", RESTORE_ARGV, ACTION_DATA, monkeypatch) == 0
    assert (originals / "restore.argv").read_text().splitlines() == RESTORE_ARGV
    assert (originals / "restore.driver").read_text() == "vfio-pci\n"  # bound when the original ran
    assert HostInventory(host).pci[GPU].driver == "vfio-pci" and ownership.held_devices(host) == {GPU: 42}


def test_a_failed_restore_gives_back_what_it_claimed(env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    host, originals = env
    _deployed(host, originals, monkeypatch)
    _original(originals, "save", stdout="")
    assert _run("save", RELEASING_ARGV["save"], ACTION_DATA, monkeypatch) == 0
    _restore_original(originals, status=1)
    capfd.readouterr()
    assert _run("restore", RESTORE_ARGV, ACTION_DATA, monkeypatch) == 1
    assert capfd.readouterr().err == "restore failed: 1\n"  # the original's error, alone
    assert (originals / "restore.driver").read_text() == "vfio-pci\n"
    assert HostInventory(host).pci[GPU].driver == "nvidia" and ownership.held_devices(host) == {}


def test_a_failed_restore_leaves_a_claim_it_found(env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """restore also wakes a domain the guest suspended: never saved, it still holds its devices."""
    host, originals = env
    _deployed(host, originals, monkeypatch)
    _restore_original(originals, status=1)
    assert _run("restore", RESTORE_ARGV, ACTION_DATA, monkeypatch) == 1
    assert HostInventory(host).pci[GPU].driver == "vfio-pci" and ownership.held_devices(host) == {GPU: 42}


def test_restore_of_a_device_another_vm_holds_is_refused(env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    host, originals = env
    _deployed(host, originals, monkeypatch)
    _original(originals, "save", stdout="")
    assert _run("save", RELEASING_ARGV["save"], ACTION_DATA, monkeypatch) == 0
    ownership.claim(host, GPU, 41)
    _domain_runs(host, 41)
    _restore_original(originals)
    capfd.readouterr()
    assert _run("restore", RESTORE_ARGV, ACTION_DATA, monkeypatch) == 1
    assert capfd.readouterr().err == f"aifactory restore: device {GPU} held by VM 41\n"
    assert not (originals / "restore.argv").exists()
    assert ownership.held_devices(host) == {GPU: 41}


@pytest.mark.parametrize(("checkpoint", "message"), [
    (CHECKPOINT, "no deployment file beside"),
    ("/var/lib/one//datastores/0/41/checkpoint", "is not in VM 42's directory"),
    ("checkpoint", "is not an absolute path"),
    ("/var/lib/one/datastores/0/../../../etc/42/checkpoint", "is not an absolute path"),
])
def test_restore_without_the_vms_deployment_file_is_refused_in_one_line(
        env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
        checkpoint: str, message: str) -> None:
    host, originals = env
    _restore_original(originals)
    assert _run("restore", [checkpoint, *RESTORE_ARGV[1:]], ACTION_DATA, monkeypatch) != 0
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("aifactory restore: ") and message in err, err
    assert not (originals / "restore.argv").exists()
    assert ownership.held_devices(host) == {}


def test_the_newest_deployment_file_is_the_one_restore_reads(env: tuple[HostRoot, Path]) -> None:
    host, _originals = env
    directory = host.path("/var/lib/one/datastores/0/42")
    directory.mkdir(parents=True)
    for name in ("deployment.2", "deployment.10", "deployment.9", "deployment.x", "vm.xml"):
        (directory / name).write_text("")
    assert vmm.deployment_file_beside(CHECKPOINT, 42, host) == directory / "deployment.10"


# ----------------------------------------------------------------------------------------------
# Log lines: in the VM's log after a success, never in a failed action's error message.

def test_warnings_stay_out_of_a_failed_actions_error_message(
        env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    """OpenNebula 6.10 makes a failed action's whole stderr the VM's error: only the error may be there."""
    host, originals = env
    config = tmp_path / "aifactory.conf"
    config.write_text('[plugins]\nenabled = ["vfio", "nvidia_gpu", "sriov"]\n[plugin.sriov]\nnuma_local = "warn"\n')
    monkeypatch.setenv("AIFACTORY_CONFIG", str(config))
    original = originals / "deploy.one"
    original.write_text("#!/bin/sh\ncat >/dev/null\necho 'Could not create domain from deployment.0' >&2\nexit 1\n")
    original.chmod(0o755)
    assert _run("deploy", DEPLOY_ARGV, _gpu_and_vf_domain(GPU, "0000:aa:00.2"), monkeypatch) == 1
    assert capfd.readouterr().err == "Could not create domain from deployment.0\n"
    assert ownership.held_devices(host) == {}


def test_error_records_of_a_failed_action_are_kept(env: tuple[HostRoot, Path], monkeypatch: pytest.MonkeyPatch,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    import logging

    def failing(*_args: object) -> int:
        logging.getLogger("aifactory_core.lifecycle.executor").warning("VM 42: a warning")
        logging.getLogger("aifactory_core.lifecycle.executor").error("VM 42: rollback incomplete")
        raise HostError("release of VM 42 incomplete")

    _original(env[1], "cancel")
    monkeypatch.setattr(vmm, "release_vm", failing)
    assert _run("cancel", RELEASING_ARGV["cancel"], ACTION_DATA, monkeypatch) == 1
    assert capfd.readouterr().err == ("ERROR: aifactory cancel: VM 42: rollback incomplete\n"
                                      "aifactory cancel: release of VM 42 incomplete\n")
