"""GPU-seconds from VM state-hook documents: reconciled by history SEQ, persisted atomically.

Documents are the synthesized ``vm_gpu_pinned.xml`` sample (1 GPU + 1 VF) with its
``HISTORY_RECORDS`` rewritten to a known timeline; the hook is run as OpenNebula runs it.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from aifactory_core.one.xmlsafe import parse_xml
from aifactory_core.policy.accounting import Ledger, merge, report, vm_usage_from_element
from aifactory_core.policy.schema import parse_policy

ROOT = Path(__file__).parent.parent
SAMPLES = ROOT / "tests" / "fixtures" / "opennebula" / "samples" / "synthesized"
BASE = parse_xml((SAMPLES / "vm_gpu_pinned.xml").read_bytes())
POLICY = parse_policy('[tenant.a]\ngroup = "tenant-a"\ngroup_id = 100\nmax_gpus = 4\nprice_per_gpu_hour = 3.6\n')

# Timeline: RUNNING 1000-2000 on host stay 0; POWEROFF; resumed 3000-4500 (stay 1); DONE.
STAYS = [(0, 1000, 2000), (1, 3000, 4500)]


def document(stays: list[tuple[int, int, int]]) -> etree._Element:
    root = copy.deepcopy(BASE)
    records = root.find("HISTORY_RECORDS")
    template = records[0]
    records.remove(template)
    for seq, start, end in stays:
        history = copy.deepcopy(template)
        for tag, value in (("SEQ", seq), ("RSTIME", start), ("RETIME", end)):
            history.find(tag).text = str(value)
        records.append(history)
    return root


# The documents the state hooks see, in order: RUNNING, POWEROFF, RUNNING, DONE.
EVENTS = [document([(0, 1000, 0)]), document([(0, 1000, 2000)]), document([(0, 1000, 2000), (1, 3000, 0)]),
          document(STAYS)]  # fmt: skip
EVENT_TIMES = [1000, 2000, 3000, 4500]
TRUTH = sum(end - start for _, start, end in STAYS)  # 1 GPU


def seconds(data: dict, start: int = 0, end: int = 10_000, now: int = 10_000) -> int:
    return sum(line.gpu_seconds for line in report(data, POLICY, start, end, now))


def test_full_event_sequence_gives_the_exact_gpu_time_and_cost() -> None:
    data = {"version": 1, "vms": {}}
    for event in EVENTS:
        merge(data, vm_usage_from_element(event))
    (line,) = report(data, POLICY, 0, 10_000, 10_000)
    assert (line.tenant, line.vm_id, line.gpu_seconds) == ("a", 42, TRUTH)
    assert line.cost == pytest.approx(TRUTH / 3600 * 3.6)
    assert seconds(data, 1500, 3500) == 500 + 500  # the window clips both stays


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=10))
def test_missed_repeated_or_reordered_events_neither_lose_nor_double_count(order: list[int]) -> None:
    """Any subset of the events, repeated and shuffled, followed by the final one, gives the truth;
    before the final one, the report at the time of the latest event seen never exceeds the truth."""
    data = {"version": 1, "vms": {}}
    for index in order:
        merge(data, vm_usage_from_element(EVENTS[index]))
    seen_at = max((EVENT_TIMES[index] for index in order), default=0)
    assert seconds(data, now=seen_at) <= TRUTH
    merge(data, vm_usage_from_element(EVENTS[-1]))
    assert seconds(data) == TRUTH
    for index in order:  # late duplicates after DONE change nothing
        merge(data, vm_usage_from_element(EVENTS[index]))
    assert seconds(data) == TRUTH


def test_open_interval_counts_to_now() -> None:
    data = {"version": 1, "vms": {}}
    merge(data, vm_usage_from_element(EVENTS[0]))
    assert seconds(data, now=1600) == 600


def test_ledger_write_is_atomic_when_the_process_dies_mid_write(tmp_path: Path, monkeypatch) -> None:
    ledger = Ledger(tmp_path)
    ledger.record(vm_usage_from_element(EVENTS[1]))
    before = ledger.path.read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ledger.record(vm_usage_from_element(EVENTS[3]))
    monkeypatch.undo()
    assert ledger.path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ledger.json.")] == []
    ledger.record(vm_usage_from_element(EVENTS[3]))
    assert seconds(ledger.read()) == TRUTH


def test_corrupt_ledger_is_reported_not_overwritten(tmp_path: Path) -> None:
    from aifactory_core.errors import UsageError

    (tmp_path / "ledger.json").write_text("{not json")
    with pytest.raises(UsageError, match="unreadable"):
        Ledger(tmp_path).record(vm_usage_from_element(EVENTS[0]))
    assert (tmp_path / "ledger.json").read_text() == "{not json"


def test_ledger_entry_of_an_unknown_shape_is_reported_not_overwritten(tmp_path: Path) -> None:
    from aifactory_core.errors import UsageError

    (tmp_path / "ledger.json").write_text('{"version": 1, "vms": {"42": "x"}}')
    with pytest.raises(UsageError, match="unknown format"):
        Ledger(tmp_path).record(vm_usage_from_element(EVENTS[0]))
    assert (tmp_path / "ledger.json").read_text() == '{"version": 1, "vms": {"42": "x"}}'


def test_history_with_end_before_start_is_refused() -> None:
    from aifactory_core.errors import DocumentError

    with pytest.raises(DocumentError, match="RETIME 900 is before RSTIME 1000"):
        vm_usage_from_element(document([(0, 1000, 900)]))


def run_hook(tmp_path: Path, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "AIFACTORY_PYTHON": sys.executable,
           "AIFACTORY_ACCOUNTING_DIR": str(tmp_path / "acct"), "AIFACTORY_CONFIG": str(tmp_path / "none.conf")}
    return subprocess.run([str(ROOT / "hooks" / "aifactory-accounting")], input=stdin, capture_output=True,
                          env=env, timeout=60, check=False)  # fmt: skip


def test_hook_records_the_state_hook_sample_and_usage_reports_it(tmp_path: Path) -> None:
    message = parse_xml((SAMPLES / "hook_message_state_vm_running.xml").read_bytes())
    template = base64.b64encode(etree.tostring(message.find("VM")))  # what HEM passes as $TEMPLATE
    result = run_hook(tmp_path, template)
    assert result.returncode == 0, result.stderr
    assert b"VM 42: 1 GPUs, 1 running intervals recorded" in result.stdout
    data = json.loads((tmp_path / "acct" / "ledger.json").read_text())
    assert data["vms"]["42"]["intervals"] == {"0": [1764852961, None]}
    policy = tmp_path / "policy.toml"
    policy.write_text('[tenant.a]\ngroup = "tenant-a"\nmax_gpus = 1\nprice_per_gpu_hour = 1.0\n')
    usage = subprocess.run(
        [sys.executable, "-m", "aifactory_core.cli", "usage", "--from", "1764852961", "--to", str(1764852961 + 7200),
         "--csv", "--ledger", str(tmp_path / "acct"), "--policy", str(policy)],
        capture_output=True, text=True, timeout=60, check=False,
        env={key: value for key, value in os.environ.items() if key != "AIFACTORY_CONFIG"},
    )  # fmt: skip
    assert usage.returncode == 0, usage.stderr
    assert usage.stdout.splitlines() == ["tenant,vm_id,gpu_hours,cost", "a,42,2.0000,2.0000"]


@pytest.mark.parametrize("stdin", [b"", b"!!!", base64.b64encode(b"<HOST><ID>1</ID></HOST>")])
def test_hook_refuses_bad_payload_and_writes_nothing(tmp_path: Path, stdin: bytes) -> None:
    result = run_hook(tmp_path, stdin)
    assert result.returncode == 2 and result.stderr.startswith(b"aifactory-accounting: ")
    assert not (tmp_path / "acct").exists()


def test_hook_with_an_unusable_ledger_directory_fails_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "acct").write_text("a file where the ledger directory should be")
    message = parse_xml((SAMPLES / "hook_message_state_vm_running.xml").read_bytes())
    result = run_hook(tmp_path, base64.b64encode(etree.tostring(message.find("VM"))))
    assert result.returncode == 1
    assert result.stderr.startswith(b"aifactory-accounting: GPU ledger ") and result.stderr.count(b"\n") == 1
