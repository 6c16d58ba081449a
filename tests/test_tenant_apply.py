"""``tenant``: ACL syntax, the CLI's checks, and what it does with a broken endpoint or answer.

What ``tenant apply`` does to OpenNebula is tested against a real oned in
``tests/oned/test_oned_tenant_apply.py``; here only what a real oned will not produce on demand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyone
import pyone.acl
import pytest

from aifactory_core.policy.acl import parse_rule, tenant_rules
from aifactory_core.policy.schema import load_policy

EXAMPLE = Path(__file__).parent.parent / "examples" / "policy.toml"
CLI = [sys.executable, "-m", "aifactory_core.cli"]  # the environment running the tests


def test_acl_strings_parse_with_pyone_helper_identically() -> None:
    """Every rule the policy implies parses with pyone's ``OneAcl.parse_rule`` to the same numbers."""
    policy = load_policy(str(EXAMPLE))
    helper = pyone.acl.OneAcl()
    rules = [rule for tenant in policy.tenants.values() for rule in tenant_rules(policy, tenant, tenant.group_id or 0)]
    assert len(rules) >= 10
    for rule in rules:
        theirs = tuple(int(value, 16) for value in helper.parse_rule(rule))
        assert theirs == parse_rule(rule)[: len(theirs)], rule
    assert "@100 HOST/%101 USE #0" in rules and "#9 VM/@100 USE+MANAGE #0" in rules


@pytest.mark.parametrize("rule", ["@1 HOST/%1 USE #0 extra", "@x HOST/#1 USE", "@1 GPU/#1 USE", "@1 HOST/#1 READ",
                                  "%1 HOST/#1 USE", "@1 HOST/#1 USE @0"])
def test_malformed_acl_strings_are_refused(rule: str) -> None:
    from aifactory_core.errors import UsageError

    with pytest.raises(UsageError):
        parse_rule(rule)


def test_cli_check_exit_codes_and_show(tmp_path: Path) -> None:
    """``aifactory tenant`` as a real process: check (0 / 2 naming key and line) and show. Applying is
    tested against a real oned (tests/oned/test_oned_tenant_apply.py)."""
    import os
    import subprocess

    env = {key: value for key, value in os.environ.items() if key != "AIFACTORY_CONFIG"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "tenant", *args], capture_output=True, text=True, env=env, timeout=60, check=False)

    ok = run("check", str(EXAMPLE))
    assert ok.returncode == 0 and "valid, 2 tenants" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('vendor = "10de"', 'vendor = "NVIDIA"', 1))
    refused = run("check", str(bad))
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"aifactory: {bad}:35: tenant.llm-lab.devices[0].vendor: must be a hex id")
    show = run("show", str(EXAMPLE))
    assert "#9 VM/@100 USE+MANAGE #0" in show.stdout
    assert "; VLANs 200-209; VNIs none; IB pkeys 0x8010-0x801f\n" in show.stdout  # pkeys in hex, as written
    assert "; VNIs 30000-30099; IB pkeys none\n" in show.stdout


@pytest.mark.parametrize("endpoint", ["bogus", "localhost:2633", "ftp://one/RPC2"])
def test_apply_to_a_malformed_endpoint_is_refused_in_one_line(tmp_path: Path, endpoint: str) -> None:
    import os
    import subprocess

    env = {key: value for key, value in os.environ.items() if key != "AIFACTORY_CONFIG"}
    result = subprocess.run([*CLI, "tenant", "apply", str(EXAMPLE), "--dry-run", "--endpoint", endpoint,
                             "--session", "oneadmin:secret"], capture_output=True, text=True, env=env, timeout=60,
                            check=False)  # fmt: skip
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"aifactory: unsupported XML-RPC endpoint {endpoint!r}: "
                             "expected http(s)://host[:port]/path\n")  # fmt: skip


@pytest.mark.parametrize("session", ["oneadmin", "", ":secret", "oneadmin:se\ncret"])
def test_apply_with_a_malformed_session_is_refused_in_one_line(session: str) -> None:
    import os
    import subprocess

    env = {key: value for key, value in os.environ.items() if key != "AIFACTORY_CONFIG"}
    result = subprocess.run([*CLI, "tenant", "apply", str(EXAMPLE), "--dry-run", "--endpoint", "http://127.0.0.1:9/RPC2",
                             "--session", session], capture_output=True, text=True, env=env, timeout=60,
                            check=False)  # fmt: skip
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "aifactory: --session: expected user:password\n"


class _AnswersOf:
    """oned as a broken endpoint would answer: documents with ids that are not numbers (the test
    server cannot send these, since every answer it gives is checked against OpenNebula's XSDs)."""

    def __init__(self, documents: dict[str, str]) -> None:
        self.documents = documents

    def document(self, method: str) -> object:
        from aifactory_core.one.xmlsafe import parse_xml

        return parse_xml(self.documents.get(method, f"<{method.split('.')[1].upper()}_POOL/>"))


@pytest.mark.parametrize(("method", "document", "message"), [
    ("one.grouppool.info", "<GROUP_POOL><GROUP><ID>x1</ID><NAME>a</NAME></GROUP></GROUP_POOL>",
     "oned answered a group ID 'x1', not a number"),
    ("one.vdcpool.info", "<VDC_POOL><VDC><ID>0</ID><NAME>v</NAME><GROUPS><ID>1e3</ID></GROUPS></VDC></VDC_POOL>",
     "oned answered a VDC group ID '1e3', not a number"),
    ("one.acl.info", "<ACL_POOL><ACL><USER>zz</USER><RESOURCE>1</RESOURCE><RIGHTS>1</RIGHTS><ZONE>1</ZONE></ACL>"
     "</ACL_POOL>", "oned answered an ACL USER 'zz', not a number"),
])
def test_ids_that_are_not_numbers_are_onederrors_not_defects(method: str, document: str, message: str) -> None:
    from aifactory_core.policy.apply import read_state
    from aifactory_core.policy.oned import OnedError

    with pytest.raises(OnedError) as raised:
        read_state(_AnswersOf({method: document}))  # type: ignore[arg-type]
    assert str(raised.value) == message
