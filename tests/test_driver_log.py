"""Log lines of the network hook and the VMM wrapper stay out of a failed action's error message.

OpenNebula 6.10 makes a failed VMM action's whole stderr the VM's error; a VNM hook's stderr is the
error of a failed hook (``VNMDriver#run_hooks``: ``Error running <hook>`` and its stderr), and only
its stdout is logged after a success. So a hook writes its held lines to stdout after a success
and, after a failure, only its ERROR lines and the error to stderr. (The VMM wrapper's own cases
are in ``tests/test_vmm_driver.py``: ``test_warnings_stay_out_of_a_failed_actions_error_message``.)
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from aifactory_core.driverlog import HeldLog, hold_log
from aifactory_core.errors import HostError
from aifactory_core.vnm import hook

DOCUMENT = b"PFZNPjxJRD40MjwvSUQ+PC9WTT4="  # never parsed: run() is replaced


@pytest.fixture
def hook_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIFACTORY_HOST_ROOT", str(tmp_path))
    monkeypatch.setenv("AIFACTORY_CONFIG", str(tmp_path / "none.conf"))
    monkeypatch.delenv("AIFACTORY_DEBUG", raising=False)
    monkeypatch.setattr("aifactory_core.config.load_config", lambda *_args: None)


def _warn_then(outcome: Exception | None) -> object:
    def run(phase: str, *_args: object) -> str:
        logging.getLogger("aifactory.sriov").warning("VM 42: VF 0000:aa:00.2 is on NUMA node 1, the GPUs on 0")
        logging.getLogger("aifactory_core.lifecycle.executor").info("VM 42: not held (below WARNING)")
        if outcome is not None:
            logging.getLogger("aifactory_core.lifecycle.executor").error("VM 42: rollback incomplete: vf 0")
            raise outcome
        return f"VM 42: 1 network action(s) made ({phase})"
    return run


def test_vnm_hook_success_logs_its_warnings_where_opennebula_logs_them(
        hook_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(hook, "run", _warn_then(None))
    assert hook.main(["pre"], io.BytesIO(DOCUMENT)) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == ("WARN: aifactory vnm pre: VM 42: VF 0000:aa:00.2 is on NUMA node 1, the GPUs on 0\n"
                   "VM 42: 1 network action(s) made (pre)\n")


def test_vnm_hook_failure_stderr_is_the_error_alone(
        hook_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(hook, "run", _warn_then(HostError("cannot configure VF 0 of 0000:aa:00.0")))
    assert hook.main(["clean"], io.BytesIO(DOCUMENT)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("ERROR: aifactory vnm clean: VM 42: rollback incomplete: vf 0\n"
                   "aifactory: cannot configure VF 0 of 0000:aa:00.0\n")


def test_a_second_hold_replaces_the_first_and_nothing_reaches_the_last_resort_handler(
        capfd: pytest.CaptureFixture[str]) -> None:
    first = hold_log("deploy")
    second = hold_log("vnm post")
    logger = logging.getLogger("aifactory.cpu_pinning")
    logger.warning("VM 7: placed away from its GPU")
    assert first.lines == []
    assert [line for _level, line in second.lines] == ["WARN: aifactory vnm post: VM 7: placed away from its GPU"]
    assert [h for h in logging.getLogger("aifactory").handlers if isinstance(h, HeldLog)] == [second]
    second.write(succeeded=False)
    assert capfd.readouterr() == ("", "")  # held, then dropped: never Python's bare "message" on stderr
