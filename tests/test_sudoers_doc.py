"""What sudoers allows ``oneadmin``, what the root helper accepts and what the docs say it allows
are one list: ``drivers/sudoers/aifactory``, :data:`aifactory_core.roothelper.VERBS` (with its
grammar, :func:`~aifactory_core.roothelper.parse`) and the sudoers rows of ``docs/host-setup.md``
and ``docs/threat-model.md``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aifactory_core import roothelper
from aifactory_core.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
SAMPLES = {"set-driver": ["0000:1b:00.0", "vfio-pci"], "reset": ["0000:1b:00.0"], "vf-set": ["eth0", "0", "vlan=5"],
           "vf-scrub": ["eth0", "0", "eth"], "xid-log": ["0"]}


def sudoers_verbs() -> list[str]:
    text = (REPO / "drivers/sudoers/aifactory").read_text()
    commands = re.findall(r"^(?!#).*?(/\S+) (\S+) \*", text, flags=re.MULTILINE)
    assert {path for path, _verb in commands} == {roothelper.DEFAULT_ROOT_HELPER}, commands
    return [verb for _path, verb in commands]


def doc_row(name: str, first_cell: str) -> str:
    rows = [line for line in (REPO / "docs" / name).read_text().splitlines() if line.startswith(f"| {first_cell} ")]
    assert len(rows) == 1, rows
    return rows[0]


def host_setup_verbs() -> list[str]:
    """The verbs the sudoers row of docs/host-setup.md names: ``… <verb> …`` in backticks."""
    row = doc_row("host-setup.md", "sudoers snippet")
    return re.findall(r"`(?:\S*aifactory-root-helper|…) ([a-z-]+)", row)


def threat_model_verbs() -> list[str]:
    row = doc_row("threat-model.md", "`/etc/sudoers.d/aifactory`")
    return re.findall(r"`([a-z]+(?:-[a-z]+)*)`", row.split("verbs:", 1)[1])


def test_sudoers_the_helper_and_the_docs_name_the_same_verbs() -> None:
    expected = sorted(roothelper.VERBS)
    assert sorted(sudoers_verbs()) == expected
    assert sorted(host_setup_verbs()) == expected
    assert sorted(threat_model_verbs()) == expected
    assert sorted(SAMPLES) == expected  # a new verb needs its sample below, so its grammar is checked


@pytest.mark.parametrize("verb", roothelper.VERBS)
def test_each_verb_is_in_the_helpers_grammar_and_its_usage(verb: str) -> None:
    assert roothelper.parse([verb, *SAMPLES[verb]])[0] == verb
    assert f" {verb} " in f" {roothelper.USAGE.replace('|', ' ')} "


@pytest.mark.parametrize("word", ["list", "set-driver2", "Set-Driver", "--help", "", "reset;", "vf_set"])
def test_no_other_verb_is_in_the_grammar(word: str) -> None:
    with pytest.raises(UsageError):
        roothelper.parse([word, "0000:1b:00.0", "vfio-pci"])
