"""Read the guest's pytest JUnit XML back into per-test results keyed by node id."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

NODEID_PROPERTY = "testhost_nodeid"
"""The in-guest plugin records each item's node id under this JUnit property."""

Phase = Literal["setup", "call", "teardown"]


@dataclass
class InnerResult:
    """One test as the guest's pytest saw it."""

    nodeid: str
    duration: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)  # phase -> failure text
    skipped: str | None = None  # skip reason
    xfailed: str | None = None  # xfail reason
    output: list[tuple[str, str]] = field(default_factory=list)  # (section title, text)

    @property
    def outcome(self) -> str:
        if self.failures:
            return "failed"
        if self.skipped is not None or self.xfailed is not None:
            return "skipped"
        return "passed"


def mangle_nodeid(nodeid: str) -> tuple[str, str]:
    """(classname, name) as pytest's junitxml writes them for ``nodeid``."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def _phase_of_error(message: str) -> Phase:
    return "teardown" if "teardown" in message else "setup"


def _text(el: ET.Element) -> str:
    message = el.get("message", "")
    body = (el.text or "").strip()
    return body if message and message in body else "\n".join(p for p in (message, body) if p)


def parse(path: Path, expected: list[str]) -> dict[str, InnerResult]:
    """Results for the ``expected`` node ids found in ``path`` (missing ones are left out)."""
    by_mangled = {mangle_nodeid(n): n for n in expected}
    results: dict[str, InnerResult] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        nodeid = props.get(NODEID_PROPERTY) or by_mangled.get((case.get("classname", ""), case.get("name", "")))
        if nodeid is None:
            continue
        res = InnerResult(nodeid, float(case.get("time") or 0.0))
        for el in case:
            if el.tag == "failure":
                res.failures["call"] = _text(el)
            elif el.tag == "error":
                res.failures[_phase_of_error(el.get("message", ""))] = _text(el)
            elif el.tag == "skipped":
                reason = el.get("message", "")
                if el.get("type") == "pytest.xfail":
                    res.xfailed = reason
                else:
                    res.skipped = reason
            elif el.tag in ("system-out", "system-err") and (el.text or "").strip():
                res.output.append((f"guest {el.tag}", el.text or ""))
        results[nodeid] = res
    return results
