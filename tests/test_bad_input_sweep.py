"""Bad input at every installed entry point: a non-zero exit, one stderr line, no traceback, no
"internal error" (the catch-all that means an unchecked value reached code that raised), and the
host tree unchanged.

The entry points run as real processes, as OpenNebula or an administrator starts them: the
``aifactory`` CLI, the VMM wrapper, a VNM hook, the admission and accounting hooks and the root
helper. Cases that other tests already pin (addresses in ``test_validate.py``, the VMM contract in
``test_vmm_driver.py``, the hook payloads in ``test_admission_hook.py``) are not repeated here; this
sweep holds the inputs in between. The root helper works on the live ``/``: only inputs its grammar
refuses before any write are given to it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hostroots import REPO, h100_root  # noqa: F401 - fixture

BIN = Path(sys.executable).parent
BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaaaaaaaa">'
                  '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><VM><ID>&b;</ID></VM>')
EXTERNAL_ENTITY = '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY x SYSTEM "file:///etc/passwd">]><VM><ID>&x;</ID></VM>'


# (case id, argv with {tmp} for the case's directory, files to write there first, stdin)
CLI_CASES: list[tuple[str, list[str], list[tuple[str, str | bytes]], bytes]] = [
    ("vm-entity-expansion", ["vm", "{tmp}/vm.xml"], [("vm.xml", BILLION_LAUGHS)], b""),
    ("vm-external-entity", ["vm", "{tmp}/vm.xml"], [("vm.xml", EXTERNAL_ENTITY)], b""),
    ("vm-truncated", ["vm", "{tmp}/vm.xml"], [("vm.xml", "<VM><ID>4")], b""),
    ("vm-base64-garbage", ["vm", "{tmp}/vm.xml"], [("vm.xml", "PFZNPjxJRD4=!!!***")], b""),
    ("vm-binary", ["vm", "{tmp}/vm.xml"], [("vm.xml", bytes(range(256)))], b""),
    ("vm-oversized", ["vm", "{tmp}/vm.xml"], [("vm.xml", "<VM>" + "<A>x</A>" * 3_000_000 + "</VM>")], b""),
    ("vm-id-not-number", ["vm", "{tmp}/vm.xml"], [("vm.xml", "<VM><ID>4x</ID></VM>")], b""),
    ("vm-missing-file", ["vm", "{tmp}/absent.xml"], [], b""),
    ("plan-truncated-vm", ["plan", "--vm", "{tmp}/vm.xml"], [("vm.xml", "<VM><ID>")], b""),
    ("plan-deployment-entity", ["plan", "--vm", "{tmp}/vm.xml", "--deployment", "{tmp}/d.xml"],
     [("vm.xml", "<VM><ID>1</ID><TEMPLATE><VCPU>1</VCPU><MEMORY>512</MEMORY></TEMPLATE></VM>"),
      ("d.xml", BILLION_LAUGHS.replace("<VM><ID>&b;</ID></VM>", "<domain>&b;</domain>"))], b""),
    ("tenant-check-wrong-types", ["tenant", "check", "{tmp}/p.toml"],
     [("p.toml", '[tenant.a]\ngroup = "a"\nmax_gpus = "many"\n')], b""),
    ("tenant-check-not-toml", ["tenant", "check", "{tmp}/p.toml"], [("p.toml", "[tenant.a\n")], b""),
    ("usage-bad-date", ["usage", "--from", "yesterday", "--to", "2026-11-27"], [], b""),
    ("config-wrong-type", ["--config", "{tmp}/c.toml", "inventory"],
     [("c.toml", '[plugin.sriov]\nnuma_local = 7\n')], b""),
    ("config-not-toml", ["--config", "{tmp}/c.toml", "inventory"], [("c.toml", "plugin = [\n")], b""),
    ("device-bind-driver-with-space", ["device", "bind", "0000:00:06.0", "--driver", "vfio pci", "--dry-run"], [], b""),
    ("device-bind-driver-with-slash", ["device", "bind", "0000:00:06.0", "--driver", "../vfio", "--dry-run"], [], b""),
    ("device-release-dotdot", ["device", "release", "0000:00:06.0/../../x"], [], b""),
    ("device-bind-absent", ["device", "bind", "0000:ff:1f.7", "--dry-run"], [], b""),
    ("vf-pool-bad-name", ["vf-pool", "eth0;reboot", "4", "--dry-run"], [], b""),
    ("vf-pool-absent", ["vf-pool", "nosuchpf0", "2", "--dry-run"], [], b""),
]


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for directory, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = Path(directory, name)
            digest.update(str(path.relative_to(root)).encode())
            if not path.is_symlink():
                digest.update(path.read_bytes())
        for name in dirs:
            path = Path(directory, name)
            if path.is_symlink():
                digest.update(f"{path.relative_to(root)}->{os.readlink(path)}".encode())
    return digest.hexdigest()


def _assert_refused(result: subprocess.CompletedProcess[bytes]) -> None:
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode != 0, (result.returncode, result.stdout, stderr)
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.parametrize(("argv", "files", "stdin"), [case[1:] for case in CLI_CASES],
                         ids=[case[0] for case in CLI_CASES])
def test_cli_refuses_bad_input_in_one_line_and_changes_nothing(
        h100_root: Path, tmp_path: Path, argv: list[str], files: list[tuple[str, str | bytes]],  # noqa: F811
        stdin: bytes) -> None:
    for name, content in files:
        (tmp_path / name).write_bytes(content.encode() if isinstance(content, str) else content)
    state = tmp_path / "state"
    state.mkdir()
    before = (_tree_digest(h100_root), _tree_digest(state))
    env = {**os.environ, "AIFACTORY_CONFIG": os.devnull, "AIFACTORY_HOST_ROOT": str(h100_root),
           "AIFACTORY_STATE_DIR": str(state)}
    result = subprocess.run([str(BIN / "aifactory"), *(arg.format(tmp=tmp_path) for arg in argv)], input=stdin,
                            capture_output=True, env=env, timeout=120, check=False)
    _assert_refused(result)
    assert (_tree_digest(h100_root), _tree_digest(state)) == before


SCRIPT_CASES: list[tuple[str, list[str], bytes]] = [
    ("vmm-deploy-no-arguments", [str(REPO / "drivers/vmm/kvm/deploy")], b""),
    ("vmm-deploy-vmid-not-number", [str(REPO / "drivers/vmm/kvm/deploy"), "/x/deployment.0", "host", "4x", "host"],
     b"<domain type='kvm'><name>one-4</name></domain>"),
    ("vmm-deploy-entity-domain", [str(REPO / "drivers/vmm/kvm/deploy"), "{tmp}/deployment.0", "host", "4", "host"],
     BILLION_LAUGHS.replace("<VM><ID>&b;</ID></VM>", "<domain>&b;</domain>").encode()),
    ("vmm-shutdown-no-arguments", [str(REPO / "drivers/vmm/kvm/shutdown")], b""),
    ("vmm-save-vmid-third", [str(REPO / "drivers/vmm/kvm/save"), "one-42", "/x/42/checkpoint", "host", "42"], b""),
    ("vmm-restore-no-deployment-file", [str(REPO / "drivers/vmm/kvm/restore"), "{tmp}/42/checkpoint", "host",
                                        "one-42", "42", "host"], b"<VMM_DRIVER_ACTION_DATA/>"),
    ("vnm-pre-base64-garbage", [str(REPO / "drivers/vnm/802.1Q/pre.d/aifactory-network")], b"@@@not base64@@@"),
    ("vnm-pre-entity", [str(REPO / "drivers/vnm/802.1Q/pre.d/aifactory-network")],
     base64.b64encode(BILLION_LAUGHS.encode())),
    ("vnm-clean-truncated", [str(REPO / "drivers/vnm/ovswitch/clean.d/aifactory-network")],
     base64.b64encode(b"<VM><ID>7</ID><TEMPLATE><NIC>")),
    ("admission-garbage", [str(REPO / "hooks/aifactory-admission")], b"%%% one.template.instantiate"),
    ("admission-entity", [str(REPO / "hooks/aifactory-admission")],
     base64.b64encode(EXTERNAL_ENTITY.encode()) + b" one.template.instantiate"),
    ("accounting-garbage", [str(REPO / "hooks/aifactory-accounting")], b"not-base64!"),
    ("root-helper-dotdot", [str(BIN / "aifactory-root-helper"), "set-driver", "../../x", "vfio-pci"], b""),
    ("root-helper-driver-space", [str(BIN / "aifactory-root-helper"), "set-driver", "0000:ff:1f.7", "vfio pci"], b""),
    ("root-helper-unknown-verb", [str(BIN / "aifactory-root-helper"), "unbind-all"], b""),
    ("root-helper-vf-index", [str(BIN / "aifactory-root-helper"), "vf-scrub", "eth0", "-1"], b""),
]


@pytest.mark.parametrize(("argv", "stdin"), [case[1:] for case in SCRIPT_CASES], ids=[case[0] for case in SCRIPT_CASES])
def test_drivers_hooks_and_helper_refuse_bad_input_in_one_line(
        h100_root: Path, tmp_path: Path, argv: list[str], stdin: bytes) -> None:  # noqa: F811
    state = tmp_path / "state"
    state.mkdir()
    before = (_tree_digest(h100_root), _tree_digest(state))
    env = {**os.environ, "AIFACTORY_PYTHON": sys.executable, "AIFACTORY_CONFIG": os.devnull,
           "AIFACTORY_HOST_ROOT": str(h100_root), "AIFACTORY_STATE_DIR": str(state),
           "AIFACTORY_ACCOUNTING_DIR": str(state), "AIFACTORY_POLICY": str(tmp_path / "absent-policy.toml"),
           "ONE_XMLRPC": "http://127.0.0.1:9/RPC2", "ONE_AUTH": str(tmp_path / "absent-auth"),
           "AIFACTORY_HOOK_SOCKET": str(tmp_path / "absent.sock")}
    result = subprocess.run([arg.format(tmp=tmp_path) for arg in argv], input=stdin, capture_output=True, env=env,
                            timeout=120, check=False, cwd=tmp_path)
    _assert_refused(result)
    assert (_tree_digest(h100_root), _tree_digest(state)) == before
