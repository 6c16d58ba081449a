"""Concurrent admissions of one tenant: the per-group lock keeps the GPU cap.

N held 1-GPU VMs of ``tenant-a`` (cap K GPUs) are instantiated at once: N real hook processes
(``python -m aifactory_core.policy.hookmain admission``, fed the ``one.template.instantiate``
CALL_INFO sample with its new VM id rewritten) run against the XML-RPC test server of
``tests/onetestserver.py`` (real HTTP, every answer validated against OpenNebula 7.0.2's XSDs;
``one.vm.action release/hold`` change the VM's state there as in oned). Exactly K are released
and the others stay on hold with the cap rule as the reason.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.test_admission_hook import POLICY, PYTHON, SAMPLES

VMS, CAP = 10, 3


def instantiate_payload(vm_id: int) -> bytes:
    text = (SAMPLES / "hook_api_call_info_template_instantiate.xml").read_bytes()
    start = text.rindex(b"<CALL_INFO>")
    call = text[start:].replace(b"<POSITION>2</POSITION><TYPE>OUT</TYPE><VALUE>42</VALUE>",
                                f"<POSITION>2</POSITION><TYPE>OUT</TYPE><VALUE>{vm_id}</VALUE>".encode())  # fmt: skip
    assert f"<VALUE>{vm_id}</VALUE></PARAMETER><PARAMETER><POSITION>3</POSITION><TYPE>OUT".encode() in call
    return base64.b64encode(call.strip()) + b" one.template.instantiate"


def environment(server, tmp_path: Path, max_gpus: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY.format(max_gpus=max_gpus))
    auth = tmp_path / "one_auth"
    auth.write_text("oneadmin:secret\n")
    return {**os.environ, "AIFACTORY_POLICY": str(policy), "AIFACTORY_CONFIG": str(tmp_path / "absent.conf"),
            "AIFACTORY_ACCOUNTING_DIR": str(tmp_path / "state"), "ONE_XMLRPC": server.endpoint,
            "ONE_AUTH": str(auth), **(extra or {})}  # fmt: skip


def run_concurrently(env: dict[str, str], vm_ids: list[int]) -> list[subprocess.CompletedProcess[bytes]]:
    processes = [
        (vm_id, subprocess.Popen([str(PYTHON), "-m", "aifactory_core.policy.hookmain", "admission"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env))
        for vm_id in vm_ids
    ]  # fmt: skip
    results = []
    for vm_id, process in processes:
        stdout, stderr = process.communicate(instantiate_payload(vm_id), timeout=120)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def test_concurrent_instantiations_release_exactly_the_cap(one_server, tmp_path: Path) -> None:
    vm_ids = list(range(200, 200 + VMS))
    for vm_id in vm_ids:
        one_server.add_vm(vm_id, state=2)  # the sample's GPU (10de:2330) and VF, on hold for admission
    results = run_concurrently(environment(one_server, tmp_path, CAP), vm_ids)
    for result in results:
        assert result.returncode == 0, result.stderr
    states = {vm_id: one_server.vms[vm_id].findtext("STATE") for vm_id in vm_ids}
    released = sorted(vm_id for vm_id, state in states.items() if state == "1")
    assert len(released) == CAP, (states, [result.stdout for result in results])
    for vm_id in vm_ids:
        template = one_server.vms[vm_id].find("USER_TEMPLATE")
        if vm_id in released:
            assert template.findtext("AIFACTORY_ADMISSION") == "ADMITTED"
            continue
        assert states[vm_id] == "2" and template.findtext("AIFACTORY_ADMISSION") == "REFUSED"
        reason = template.findtext("AIFACTORY_POLICY_ERROR")
        assert "tenant.tenant-a.max_gpus" in reason and f"holds {CAP} GPUs" in reason, reason
    releases = [call for call in one_server.writes() if call[0] == "one.vm.action"]
    assert sorted(call[1][1] for call in releases) == released and all(call[1][0] == "release" for call in releases)
    lock = tmp_path / "state" / "admission-100.lock"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600


def test_a_lock_held_past_the_bounded_wait_fails_in_one_line_and_changes_nothing(one_server, tmp_path: Path) -> None:
    import fcntl

    one_server.add_vm(300, state=2)
    env = environment(one_server, tmp_path, CAP)
    config = tmp_path / "aifactory.conf"
    config.write_text(f'[plugin.policy]\nlock_dir = "{tmp_path / "locks"}"\nlock_timeout = 0.5\n')
    env["AIFACTORY_CONFIG"] = str(config)
    (tmp_path / "locks").mkdir()
    with open(tmp_path / "locks" / "admission-100.lock", "a+b") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        (result,) = run_concurrently(env, [300])
    assert result.returncode == 1
    message = result.stderr.decode()
    assert message.startswith("aifactory-admission: admission lock ") and message.count("\n") == 1, message
    assert "still held" in message
    assert one_server.writes() == [] and one_server.vms[300].findtext("STATE") == "2"


def test_an_unusable_lock_directory_fails_in_one_line_and_changes_nothing(one_server, tmp_path: Path) -> None:
    """A lock that cannot be taken at all (lock_dir is a file) is said as such, not as a lock timeout."""
    one_server.add_vm(301, state=2)
    env = environment(one_server, tmp_path, CAP)
    config = tmp_path / "aifactory.conf"
    config.write_text(f'[plugin.policy]\nlock_dir = "{tmp_path / "locks"}"\n')
    env["AIFACTORY_CONFIG"] = str(config)
    (tmp_path / "locks").write_text("a file where the lock directory should be")
    (result,) = run_concurrently(env, [301])
    assert result.returncode == 1
    message = result.stderr.decode()
    assert message.startswith("aifactory-admission: admission lock ") and message.count("\n") == 1, message
    assert "still held" not in message
    assert one_server.writes() == [] and one_server.vms[301].findtext("STATE") == "2"


@pytest.mark.parametrize("timeout", ["0", "-1", '"soon"', "true"])
def test_a_bad_lock_timeout_is_a_config_error(one_server, tmp_path: Path, timeout: str) -> None:
    one_server.add_vm(301, state=2)
    env = environment(one_server, tmp_path, CAP)
    config = tmp_path / "aifactory.conf"
    config.write_text(f"[plugin.policy]\nlock_timeout = {timeout}\n")
    env["AIFACTORY_CONFIG"] = str(config)
    (result,) = run_concurrently(env, [301])
    assert result.returncode == 2 and b"lock_timeout" in result.stderr, result.stderr
    assert one_server.writes() == []
