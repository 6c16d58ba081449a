"""GPU time written back into the VM's USER_TEMPLATE by the accounting state hook.

The hook runs as OpenNebula runs it (``hooks/aifactory-accounting`` fed ``$TEMPLATE``, base64 of
the synthesized ``vm_gpu_pinned.xml`` sample with a known ``HISTORY_RECORDS`` timeline) and
calls ``one.vm.update`` on the XML-RPC test server of ``tests/onetestserver.py`` (real HTTP,
every answer validated against OpenNebula 7.0.2's XSDs). The values are checked against
``aifactory usage --csv`` over the same ledger.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from lxml import etree

from tests.test_accounting import EVENTS, ROOT, TRUTH

POLICY = '[tenant.a]\ngroup = "tenant-a"\ngroup_id = 100\nmax_gpus = 4\nprice_per_gpu_hour = 3.6\n'
ATTRIBUTES = ("AIFACTORY_GPU_SECONDS", "AIFACTORY_GPU_HOURS", "AIFACTORY_GPU_COST")


def run_hook(tmp_path: Path, endpoint: str, document: etree._Element, policy: bool = True):
    auth = tmp_path / "one_auth"
    auth.write_text("oneadmin:secret\n")
    (tmp_path / "policy.toml").write_text(POLICY)
    env = {**os.environ, "AIFACTORY_PYTHON": sys.executable,
           "AIFACTORY_ACCOUNTING_DIR": str(tmp_path / "acct"), "AIFACTORY_CONFIG": str(tmp_path / "none.conf"),
           "AIFACTORY_POLICY": str(tmp_path / ("policy.toml" if policy else "absent.toml")),
           "ONE_XMLRPC": endpoint, "ONE_AUTH": str(auth)}  # fmt: skip
    return subprocess.run([str(ROOT / "hooks" / "aifactory-accounting")], input=base64.b64encode(
        etree.tostring(document)), capture_output=True, env=env, timeout=60, check=False)  # fmt: skip


def attributes(server, vm_id: int = 42) -> dict[str, str | None]:
    template = server.vms[vm_id].find("USER_TEMPLATE")
    return {name: template.findtext(name) for name in ATTRIBUTES}


def usage_csv(tmp_path: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "aifactory_core.cli", "usage", "--from", "0", "--to", "4102444800", "--csv",
         "--ledger", str(tmp_path / "acct"), "--policy", str(tmp_path / "policy.toml")],
        capture_output=True, text=True, timeout=60, check=False,
        env={key: value for key, value in os.environ.items() if key != "AIFACTORY_CONFIG"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_done_vm_gets_its_totals_and_they_match_the_usage_report(one_server, tmp_path: Path) -> None:
    one_server.add_vm(42, state=6)
    result = run_hook(tmp_path, one_server.endpoint, EVENTS[-1])
    assert result.returncode == 0, result.stderr
    assert b"USER_TEMPLATE AIFACTORY_GPU_SECONDS" in result.stdout, result.stdout
    values = attributes(one_server)
    assert values["AIFACTORY_GPU_SECONDS"] == str(TRUTH)
    assert usage_csv(tmp_path) == ["tenant,vm_id,gpu_hours,cost",
                                   f"a,42,{values['AIFACTORY_GPU_HOURS']},{values['AIFACTORY_GPU_COST']}"]  # fmt: skip
    assert values["AIFACTORY_GPU_COST"] == f"{TRUTH / 3600 * 3.6:.4f}"
    before = etree.tostring(one_server.vms[42].find("USER_TEMPLATE"))
    again = run_hook(tmp_path, one_server.endpoint, EVENTS[-1])  # the same event delivered twice
    assert again.returncode == 0, again.stderr
    assert etree.tostring(one_server.vms[42].find("USER_TEMPLATE")) == before
    updates = [call for call in one_server.writes() if call[0] == "one.vm.update"]
    assert len(updates) == 2 and updates[0] == updates[1] and updates[0][1][2] == 1  # merged, same text


def test_running_stays_count_once_closed_and_late_events_change_nothing(one_server, tmp_path: Path) -> None:
    one_server.add_vm(42, state=3)
    seen = []
    for event in (EVENTS[0], EVENTS[2], EVENTS[0], EVENTS[1], EVENTS[3], EVENTS[2]):  # missed, late, repeated
        result = run_hook(tmp_path, one_server.endpoint, event)
        assert result.returncode == 0, result.stderr
        seen.append(int(attributes(one_server)["AIFACTORY_GPU_SECONDS"]))
    assert seen == [0, 1000, 1000, 1000, TRUTH, TRUTH]


def test_without_a_readable_policy_the_cost_is_left_out(one_server, tmp_path: Path) -> None:
    one_server.add_vm(42, state=6)
    result = run_hook(tmp_path, one_server.endpoint, EVENTS[-1], policy=False)
    assert result.returncode == 0, result.stderr
    assert attributes(one_server) == {"AIFACTORY_GPU_SECONDS": str(TRUTH),
                                      "AIFACTORY_GPU_HOURS": f"{TRUTH / 3600:.4f}", "AIFACTORY_GPU_COST": None}


def test_refused_update_is_reported_and_the_ledger_record_stands(one_server, tmp_path: Path) -> None:
    """oned refuses the update (here: it knows no VM 42): exit 0, the ledger holds the stays."""
    result = run_hook(tmp_path, one_server.endpoint, EVENTS[-1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(b"\n") == 1 and b"USER_TEMPLATE not updated (one.vm.update:" in result.stdout
    ledger = json.loads((tmp_path / "acct" / "ledger.json").read_text())
    assert ledger["vms"]["42"]["intervals"] == {"0": [1000, 2000], "1": [3000, 4500]}


def test_unreachable_oned_loses_no_ledger_record(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_hook(tmp_path, f"http://127.0.0.1:{port}/RPC2", EVENTS[-1])
    assert result.returncode == 0, result.stderr
    assert b"USER_TEMPLATE not updated" in result.stdout
    assert usage_csv(tmp_path) == ["tenant,vm_id,gpu_hours,cost", f"a,42,{TRUTH / 3600:.4f},{TRUTH / 3600 * 3.6:.4f}"]
