"""``tenant apply`` against an OpenNebula XML-RPC endpoint.

No oned can run here: ``tests/onetestserver.py`` is a real HTTP XML-RPC server whose every XML
answer is validated against OpenNebula 7.0.2's XSDs before it is sent; the client is pyone
(its XML-RPC transport) over real HTTP, exactly as in production.
"""

from __future__ import annotations

from pathlib import Path

import pyone
import pyone.acl
import pytest

from aifactory_core.policy.acl import parse_rule, tenant_rules
from aifactory_core.policy.apply import apply_policy
from aifactory_core.policy.oned import Oned
from aifactory_core.policy.schema import load_policy

EXAMPLE = Path(__file__).parent.parent / "examples" / "policy.toml"


@pytest.fixture
def policy_without_ids(tmp_path: Path) -> Path:
    """The example policy minus the group ids (the test server allocates ids from 100 up)."""
    text = "\n".join(line for line in EXAMPLE.read_text().splitlines() if not line.startswith("group_id"))
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_apply_twice_changes_nothing_the_second_time(one_server, policy_without_ids: Path) -> None:
    policy = load_policy(str(policy_without_ids))
    oned = Oned(one_server.endpoint, "oneadmin:secret")
    first = apply_policy(oned, policy)
    written = one_server.writes()
    assert {call[0] for call in written} == {
        "one.group.allocate", "one.vdc.allocate", "one.vdc.addgroup", "one.vdc.addcluster", "one.acl.addrule",
        "one.group.quota", "one.group.addadmin",
    }  # fmt: skip
    assert len(first) == len(written)
    groups = {group.name: group.id for group in one_server.groups.values()}
    assert groups["llm-lab"] >= 100 and groups["vision"] >= 100
    assert one_server.groups[groups["llm-lab"]].quota == {"GPU": "6", "RUNNING_GPU": "6"}
    assert one_server.groups[groups["llm-lab"]].admins == [7]

    before = len(one_server.calls)
    second = apply_policy(oned, policy)
    assert second == []
    assert [call[0] for call in one_server.calls[before:]] and not [
        call for call in one_server.calls[before:] if not call[0].endswith("info")
    ]


def test_dry_run_lists_changes_and_writes_nothing(one_server, policy_without_ids: Path) -> None:
    policy = load_policy(str(policy_without_ids))
    oned = Oned(one_server.endpoint, "oneadmin:secret")
    planned = apply_policy(oned, policy, dry_run=True)
    assert one_server.writes() == []
    text = [str(change) for change in planned]
    assert "llm-lab: create group llm-lab" in text
    assert "llm-lab: add ACL @<new:llm-lab> HOST/%101 USE #0" in text
    made = apply_policy(oned, policy)
    assert len(made) == len(planned)  # the dry run announced exactly what the real run did
    assert apply_policy(oned, policy, dry_run=True) == []


def test_apply_updates_a_changed_quota_only(one_server, policy_without_ids: Path) -> None:
    oned = Oned(one_server.endpoint, "oneadmin:secret")
    apply_policy(oned, load_policy(str(policy_without_ids)))
    changed = policy_without_ids.read_text().replace("max_gpus = 6", "max_gpus = 5")
    policy_without_ids.write_text(changed)
    again = apply_policy(oned, load_policy(str(policy_without_ids)))
    assert [str(change) for change in again] == ['llm-lab: set quota VM=[ GPU="5", RUNNING_GPU="5" ]']


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


def test_pyone_bindings_read_the_test_server_documents(one_server) -> None:
    """pyone's own generated bindings (not only its transport) accept the server's answers."""
    client = pyone.OneServer(one_server.endpoint, session="oneadmin:secret")
    gid = client.group.allocate("tenant-x")
    assert client.group.info(gid).NAME == "tenant-x"
    assert [acl.ID for acl in client.acl.info().ACL] == [0, 1]


def test_cli_check_exit_codes_and_apply_dry_run(one_server, policy_without_ids: Path, tmp_path: Path) -> None:
    """``aifactory tenant`` as a real process: check (0 / 2 naming key and line), apply twice."""
    import os
    import subprocess

    cli = str(Path(__file__).parent.parent / ".venv" / "bin" / "aifactory")
    env = {key: value for key, value in os.environ.items() if key != "AIFACTORY_CONFIG"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([cli, "tenant", *args], capture_output=True, text=True, env=env, timeout=60, check=False)

    ok = run("check", str(EXAMPLE))
    assert ok.returncode == 0 and "valid, 2 tenants" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('vendor = "10de"', 'vendor = "NVIDIA"', 1))
    refused = run("check", str(bad))
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"aifactory: {bad}:35: tenant.llm-lab.devices[0].vendor: must be a hex id")
    endpoint = ["--endpoint", one_server.endpoint, "--session", "oneadmin:secret"]
    dry = run("apply", str(policy_without_ids), "--dry-run", *endpoint)
    assert dry.returncode == 0 and "+ llm-lab: create group llm-lab" in dry.stdout and one_server.writes() == []
    first = run("apply", str(policy_without_ids), *endpoint)
    assert first.returncode == 0 and first.stdout.strip().endswith("changes")
    second = run("apply", str(policy_without_ids), *endpoint)
    assert second.stdout.strip() == "OpenNebula already matches the policy: no change"
    show = run("show", str(EXAMPLE))
    assert "#9 VM/@100 USE+MANAGE #0" in show.stdout


@pytest.mark.parametrize("endpoint", ["bogus", "localhost:2633", "ftp://one/RPC2"])
def test_apply_to_a_malformed_endpoint_is_refused_in_one_line(tmp_path: Path, endpoint: str) -> None:
    import os
    import subprocess

    cli = str(Path(__file__).parent.parent / ".venv" / "bin" / "aifactory")
    env = {key: value for key, value in os.environ.items() if key != "AIFACTORY_CONFIG"}
    result = subprocess.run([cli, "tenant", "apply", str(EXAMPLE), "--dry-run", "--endpoint", endpoint,
                             "--session", "oneadmin:secret"], capture_output=True, text=True, env=env, timeout=60,
                            check=False)  # fmt: skip
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"aifactory: unsupported XML-RPC endpoint {endpoint!r}: "
                             "expected http(s)://host[:port]/path\n")  # fmt: skip


@pytest.mark.parametrize("session", ["oneadmin", "", ":secret", "oneadmin:se\ncret"])
def test_apply_with_a_malformed_session_is_refused_in_one_line(session: str) -> None:
    import os
    import subprocess

    cli = str(Path(__file__).parent.parent / ".venv" / "bin" / "aifactory")
    env = {key: value for key, value in os.environ.items() if key != "AIFACTORY_CONFIG"}
    result = subprocess.run([cli, "tenant", "apply", str(EXAMPLE), "--dry-run", "--endpoint", "http://127.0.0.1:9/RPC2",
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
