"""pytest plugin: count the attacks on root (tests marked ``root_attack``, one attack per case) and
say at the end of the run how many were attempted and how many succeeded.

An attack test passes when the attack failed, so a failed attack test is an attack that succeeded;
a test that errored in its setup or was skipped was not attempted (under ``CI=true`` a skip is a
failure already, :mod:`needs`). The line is printed in the terminal summary, where CI's log shows it::

    root attacks: 131 attempted, 0 succeeded
"""

from __future__ import annotations

from typing import Any

import pytest

MARKER = "root_attack"
_ATTACKS: set[str] = set()
_OUTCOMES: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: one attack on root's privilege boundary (counted in the summary)")


def pytest_collection_finish(session: pytest.Session) -> None:
    """The attacks among the items that will run (after ``-k``/``-m`` deselection)."""
    _ATTACKS.update(item.nodeid for item in session.items if item.get_closest_marker(MARKER) is not None)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid not in _ATTACKS:
        return
    if report.when == "call":
        _OUTCOMES[report.nodeid] = "succeeded" if report.failed else ("skipped" if report.skipped else "refused")
    elif report.failed or report.skipped:  # setup or teardown
        _OUTCOMES.setdefault(report.nodeid, "skipped" if report.skipped else "error")


def counts() -> dict[str, int]:
    result = {"refused": 0, "succeeded": 0, "skipped": 0, "error": 0}
    for outcome in _OUTCOMES.values():
        result[outcome] += 1
    return result


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ATTACKS:
        return
    found = counts()
    attempted = found["refused"] + found["succeeded"]
    line = f"root attacks: {attempted} attempted, {found['succeeded']} succeeded"
    extra = [f"{found[key]} {key}" for key in ("skipped", "error") if found[key]]
    not_run = len(_ATTACKS) - len(_OUTCOMES)
    if not_run:
        extra.append(f"{not_run} not run")
    terminalreporter.write_line(line + (f" ({', '.join(extra)})" if extra else ""))
