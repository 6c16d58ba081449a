"""The suite's install.sh against a real oned, and its hooks fired by oned's real hook manager.

``install.sh`` runs as root, the way an operator runs it (``realone.suite_installed``).

Then a tenant user instantiates GPU templates through the API: oned runs the admission hook with
its real ``$API`` payload, which releases the VM or keeps it on hold; the scheduler places the
released VM on a dummy host (whose probe reports an NVIDIA ``10de:0863`` at ``02:00.0``); the
accounting hooks record its GPU time from oned's real state changes.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from realone import REPO, Installed, RealOne, in_frontend

pytestmark = pytest.mark.realone
TENANT_USER = ("gpu-alice", "pw-alice")


HOOK_NAMES = sorted(path.stem for path in (REPO / "hooks" / "templates").glob("*.tmpl"))


def test_install_registers_every_hook_once_and_a_second_run_changes_nothing(suite_installed: Installed) -> None:
    assert suite_installed.hooks() == HOOK_NAMES
    again = suite_installed.install_sh()
    assert again.returncode == 0, again.stderr
    assert "nothing to change: the installation is up to date" in again.stdout
    assert suite_installed.hooks() == HOOK_NAMES
    hooks_dir = suite_installed.one.location / "var" / "remotes" / "hooks-site" / "aifactory"  # :hook_base_path:
    assert sorted(path.name for path in hooks_dir.iterdir()) == ["aifactory-accounting", "aifactory-admission"]


def test_upgrade_then_uninstall_then_install_leave_no_duplicate_or_orphan(suite_installed: Installed) -> None:
    client = suite_installed.one.client()
    upgraded = suite_installed.install_sh("--upgrade", "--no-venv")
    assert upgraded.returncode == 0, upgraded.stderr
    assert suite_installed.hooks() == HOOK_NAMES
    removed = suite_installed.install_sh("--uninstall", "--no-venv")
    assert removed.returncode == 0, removed.stderr
    assert [hook.NAME for hook in client.hookpool.info(-2, -1, -1).HOOK if hook.NAME.startswith("aifactory")] == []
    assert not (suite_installed.one.location / "var" / "remotes" / "hooks-site" / "aifactory").exists()
    again = suite_installed.install_sh()
    assert again.returncode == 0, again.stderr
    assert suite_installed.hooks() == HOOK_NAMES


def test_frontend_doctor_passes_after_install_and_fails_where_nothing_is_installed(
        real_one: RealOne, suite_installed: Installed) -> None:
    doctor = [str(suite_installed.prefix / "venv" / "bin" / "aifactory"), "doctor", "--frontend"]
    after = in_frontend(real_one, suite_installed.etc_binds, doctor)
    assert (after.returncode, after.stderr) == (0, ""), after.stdout
    assert "FAIL" not in after.stdout
    assert f"PASS  hooks: {len(HOOK_NAMES)} hooks registered" in after.stdout
    elsewhere = in_frontend(real_one, suite_installed.etc_binds, doctor, {"ONE_LOCATION": str(real_one.top / "none")})
    assert elsewhere.returncode == 1
    assert "the suite is not installed" in elsewhere.stdout


# --- hooks fired by oned -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tenant(real_one: RealOne, suite_installed: Installed) -> Iterator[dict[str, int]]:
    """A tenant with a 1-GPU cap, its user, a dummy host with a GPU, and a held GPU template. The
    dummy host goes OFFLINE afterwards: ``onehost sync`` (later tests) fails on a host it cannot reach."""
    client = real_one.client()
    # A cluster of its own: the dummy host and a system datastore whose transfers are dummy too.
    cluster = client.cluster.allocate("dummy-gpus")
    system_ds = client.datastore.allocate('NAME="dummy-system" TYPE="SYSTEM_DS" TM_MAD="dummy"', cluster)
    host = client.host.allocate("gpu-dummy", "dummy", "dummy", cluster)
    _wait(lambda: client.host.info(host).STATE == 2, "the dummy host to be MONITORED", 120)
    _wait(lambda: int(client.datastore.info(system_ds).FREE_MB) > 0, "the dummy system datastore's capacity", 120)
    template = client.template.allocate(
        'NAME="gpu-1" CPU="1" MEMORY="64" GPU="1" SUBMIT_ON_HOLD="YES" '
        'PCI=[ VENDOR="10de", DEVICE="0863", CLASS="0302" ]')
    usb = client.template.allocate('NAME="usb" CPU="1" MEMORY="64" PCI=[ VENDOR="1b21", DEVICE="0aa7", CLASS="0c03" ]')
    uid = client.user.allocate(*TENANT_USER, "core", [])
    ledger = real_one.top / "ledger"
    ledger.mkdir()
    policy = real_one.top / "policy.toml"
    policy.write_text(f"""
[opennebula]
version = "7.0"
zone = 0
infrastructure_admin_groups = ["oneadmin"]

[tenant.lab]
group = "lab"
vdc = "vdc-lab"
clusters = [{cluster}]
max_gpus = 1
networks = []
templates = [{template}, {usb}]
price_per_gpu_hour = 3.0

[[tenant.lab.devices]]
name = "dummy-gpu"
vendor = "10de"
device = "0863"
clusters = [{cluster}]
""")
    apply = subprocess.run([str(suite_installed.prefix / "venv" / "bin" / "aifactory"), "tenant", "apply", str(policy),
                            "--endpoint", real_one.endpoint, "--session", f"oneadmin:{real_one.password}"],
                           capture_output=True, text=True, timeout=120, check=False)
    assert apply.returncode == 0, apply.stderr
    gid = next(group.ID for group in client.grouppool.info().GROUP if group.NAME == "lab")
    client.user.chgrp(uid, gid)
    config = real_one.location / "etc" / "aifactory.conf"
    with config.open("a") as handle:
        handle.write(f'\n[plugin.policy]\nfile = "{policy}"\naccounting_dir = "{ledger}"\n')
    subprocess.run(["chown", "-R", "oneadmin:oneadmin", str(ledger), str(policy)], check=True)
    yield {"host": host, "template": template, "usb": usb, "uid": uid, "gid": gid}
    client.host.status(host, 2)  # OFFLINE


def _wait(condition: object, what: str, timeout: float, one: RealOne | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                                 + (f"\n{hook_executions(one)}" if one else ""))
        time.sleep(0.5)


def hook_executions(one: RealOne) -> str:
    """The suite's hook runs as oned recorded them (exit code, decoded stdout and stderr)."""
    import base64
    import xmlrpc.client

    from lxml import etree

    lines = []
    server = xmlrpc.client.ServerProxy(one.endpoint)
    ok, pool, *_ = server.one.hookpool.info(f"oneadmin:{one.password}", -2, -1, -1)
    for hook in etree.fromstring(pool.encode()).iterfind("HOOK"):
        ok, answer, *_ = server.one.hook.info(f"oneadmin:{one.password}", int(hook.findtext("ID")))
        for record in etree.fromstring(answer.encode()).iterfind("HOOKLOG/HOOK_EXECUTION_RECORD"):
            result = record.find("EXECUTION_RESULT")
            decoded = [base64.b64decode(result.findtext(tag) or "").decode(errors="replace").strip()
                       for tag in ("STDOUT", "STDERR")]
            lines.append(f"{hook.findtext('NAME')}: exit {result.findtext('CODE')} {decoded}")
    return "\n".join(lines) or "(no hook ran)"


def _state(one: RealOne, vm: int) -> tuple[int, int]:
    info = one.client().vm.info(vm)
    return info.STATE, info.LCM_STATE


def _user_template(one: RealOne, vm: int) -> dict[str, str]:
    import xmlrpc.client

    from lxml import etree

    ok, answer, *_ = xmlrpc.client.ServerProxy(one.endpoint).one.vm.info(f"oneadmin:{one.password}", vm, False)
    assert ok, answer
    user_template = etree.fromstring(answer.encode()).find("USER_TEMPLATE")
    return {child.tag: child.text or "" for child in user_template}


RUNNING = (3, 3)  # ACTIVE / RUNNING
HOLD = (2, 0)


def test_admission_hook_releases_a_granted_gpu_vm_oned_caps_the_next_and_the_hook_holds_an_ungranted_device(
        real_one: RealOne, tenant: dict[str, int]) -> None:
    import pyone

    alice = real_one.client(":".join(TENANT_USER))
    first = alice.template.instantiate(tenant["template"], "first", False, "", False)
    _wait(lambda: _state(real_one, first) == RUNNING, f"VM {first} RUNNING (released by the hook)", 120, real_one)
    assert _user_template(real_one, first)["AIFACTORY_ADMISSION"] == "ADMITTED"
    assert real_one.client().vm.info(first).TEMPLATE["PCI"]["ADDRESS"] == "0000:02:00:0"

    # The tenant's cap (max_gpus = 1) is oned's own group quota: oned refuses the call itself.
    with pytest.raises(pyone.OneAuthorizationException, match="limit of 1 reached for GPU quota"):
        alice.template.instantiate(tenant["template"], "second", False, "", False)

    ungranted = alice.template.instantiate(tenant["usb"], "usb", False, "", False)
    _wait(lambda: _user_template(real_one, ungranted).get("AIFACTORY_ADMISSION") == "REFUSED",
          f"VM {ungranted} refused by the hook", 120, real_one)
    assert _state(real_one, ungranted) == HOLD
    assert "1b21:0aa7" in _user_template(real_one, ungranted)["AIFACTORY_POLICY_ERROR"]


def test_accounting_hooks_record_gpu_time_from_real_state_changes(
        real_one: RealOne, tenant: dict[str, int]) -> None:
    client = real_one.client()
    alice = real_one.client(":".join(TENANT_USER))
    for vm in client.vmpool.info(-2, -1, -1, -1).VM:  # the tenant's earlier VMs free its one GPU
        client.vm.action("terminate-hard", vm.ID)
    _wait(lambda: not client.vmpool.info(-2, -1, -1, -1).VM, "the earlier VMs to end", 120, real_one)
    vm = alice.template.instantiate(tenant["template"], "metered", False, "", False)
    _wait(lambda: _state(real_one, vm) == RUNNING, f"VM {vm} RUNNING", 120, real_one)
    time.sleep(2)
    client.vm.action("terminate-hard", vm)
    ledger = real_one.top / "ledger" / "ledger.json"
    _wait(lambda: ledger.exists() and _closed(ledger, vm), f"VM {vm}'s closed interval in the ledger", 120, real_one)
    entry = json.loads(ledger.read_text())["vms"][str(vm)]
    assert entry["gpus"] == 1 and entry["gid"] == tenant["gid"]


def _closed(ledger: Path, vm: int) -> bool:
    entry = json.loads(ledger.read_text()).get("vms", {}).get(str(vm))
    intervals = list(entry["intervals"].values()) if entry else []
    return bool(intervals) and all(end is not None and end >= start for start, end in intervals)
