"""Subnet-manager back-ends.

OpenSM: every host's changes go to the fabric's one partition authority (in process, or through the
``python -m aifactory_plugins.infiniband.authority`` entry point as a process, as ``ssh`` would run
it on the SM's host); the generated ``partitions.conf`` follows the grammar of OpenSM's
``doc/partition-config.txt`` (``Name=PKey [, ipoib] [, defmember=...] : guid=full|limited, ... ;``)
and the reload runs the configured argv. UFM: a local HTTP server on 127.0.0.1 implements the two
UFM Enterprise REST endpoints the back-end uses (``POST /ufmRest/resources/pkeys`` with
guids/pkey/membership/index0/ip_over_ib, and ``DELETE /ufmRest/resources/pkeys/<pkey>/guids/<list>``)
with UFM's documented validation (pkey "0x0"-"0x7fff" exclusive, GUIDs 16-20 hex characters,
membership full|limited) and keeps the partition table, so the test reads what the SM would hold.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from aifactory_plugins.infiniband import sm
from aifactory_plugins.infiniband.authority import PartitionAuthority

from aifactory_core.errors import ConfigError, HostError

G1, G2 = "a1:f0:00:00:00:54:02:01", "0xa1f0000000560201"
MANAGEMENT = ["0x9c63c003005548ae", "58:a2:e1:03:00:2a:09:b8"]  # the hosts' own PF ports (ibstat recordings)
AUTHORITY = ["-m", "aifactory_plugins.infiniband.authority"]


def recorder(calls: list[list[str]], status: int = 0, stderr: str = "") -> Any:
    def runner(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, status, "", stderr)

    return runner


def test_opensm_partitions_file_and_reload(tmp_path: Path) -> None:
    calls: list[list[str]] = []
    authority = PartitionAuthority(tmp_path / "sm", tmp_path / "partitions.conf", ("systemctl", "reload", "opensm"),
                                   (), recorder(calls))
    opensm = sm.OpenSM("gpu-node-01", local=authority)
    opensm.add_members(0x10, [G1], "full")
    opensm.add_members(0x8011, [G2], "limited")
    opensm.add_members(0x10, [G1], "full")  # idempotent: no second reload
    text = (tmp_path / "partitions.conf").read_text()
    assert "Default=0x7fff, ipoib : ALL=limited, ALL_SWITCHES=full, SELF=full ;" in text
    assert "ALL=full" not in text  # tenant ports are no full members of the default partition
    assert "tenant_0x0010=0x0010, ipoib, defmember=limited : 0xa1f0000000540201=full ;" in text
    assert "tenant_0x0011=0x0011, ipoib, defmember=limited : 0xa1f0000000560201=limited ;" in text
    assert len(calls) == 2
    opensm.remove_members(0x10, [G1])
    opensm.remove_members(0x10, [G1])  # idempotent
    assert "tenant_0x0010" not in (tmp_path / "partitions.conf").read_text()
    assert len(calls) == 3


def test_opensm_reload_failure_is_reported(tmp_path: Path) -> None:
    authority = PartitionAuthority(tmp_path / "sm", tmp_path / "p.conf", ("reload-opensm",), (),
                                   recorder([], 1, "opensm not running"))
    with pytest.raises(HostError, match="opensm not running"):
        sm.OpenSM("gpu-node-01", local=authority).add_members(0x12, [G1], "full")


@pytest.fixture
def fabric(tmp_path: Path) -> dict[str, Any]:
    """The SM's host: its own configuration (partitions file, reload command, management ports) and
    state dir; the argv every KVM host reaches its partition authority through (here ``env`` stands
    in for ``ssh sm-node``)."""
    sm_host = tmp_path / "sm-node"
    sm_host.mkdir()
    reload = sm_host / "reload-opensm"
    reload.write_text(f"#!/bin/sh\necho reloaded >> {sm_host / 'reloads'}\n")
    reload.chmod(0o755)
    config = sm_host / "aifactory.conf"
    config.write_text(f'[plugin.infiniband]\npartitions_file = "{sm_host / "partitions.conf"}"\n'
                      f'opensm_reload = ["{reload}"]\nmanagement_guids = {json.dumps(MANAGEMENT)}\n')
    argv = ["env", f"AIFACTORY_CONFIG={config}", f"AIFACTORY_STATE_DIR={sm_host / 'state'}", sys.executable,
            *AUTHORITY]  # fmt: skip
    return {"dir": sm_host, "argv": argv, "partitions": sm_host / "partitions.conf"}


def test_two_hosts_vms_merge_in_one_authority_and_neither_overwrites_the_other(fabric: dict[str, Any]) -> None:
    """Tenant llm-lab (pkey 0x8010) and tenant vision (pkey 0x0020) have VMs on gpu-node-01 and
    gpu-node-02. Each host sends its changes to the one partition authority on the SM's host;
    partitions.conf holds both hosts' ports, and a host's release takes out only its own port."""
    node1 = sm.OpenSM("gpu-node-01", fabric["argv"])
    node2 = sm.OpenSM("gpu-node-02", fabric["argv"])
    node1.add_members(0x8010, ["a1:f0:00:00:00:54:03:00"], "full")     # VM 42, llm-lab
    node1.add_members(0x0020, ["a1:f0:00:00:00:56:03:00"], "full")     # VM 43, vision
    node2.add_members(0x8010, ["a1:f0:00:00:00:58:03:00"], "full")     # VM 44, llm-lab
    node2.add_members(0x0020, ["a1:f0:00:00:00:5a:03:00"], "limited")  # VM 45, vision (limited member)
    assert fabric["partitions"].read_text() == (
        "# generated by aifactory: do not edit (the fabric's partitions, merged from every host's VM ports)\n"
        "Default=0x7fff, ipoib : ALL=limited, ALL_SWITCHES=full, SELF=full, 0x58a2e103002a09b8=full, "
        "0x9c63c003005548ae=full ;\n"
        "tenant_0x0010=0x0010, ipoib, defmember=limited : 0xa1f0000000540300=full, 0xa1f0000000580300=full ;\n"
        "tenant_0x0020=0x0020, ipoib, defmember=limited : 0xa1f0000000560300=full, 0xa1f00000005a0300=limited ;\n")
    _keep_for_the_record(fabric["partitions"])
    node1.remove_members(0x0020, ["a1:f0:00:00:00:56:03:00"])  # VM 43 released on gpu-node-01
    node1.remove_members(0x0020, ["a1:f0:00:00:00:5a:03:00"])  # gpu-node-02's port is not gpu-node-01's to remove
    assert fabric["partitions"].read_text().splitlines()[2:] == [
        "tenant_0x0010=0x0010, ipoib, defmember=limited : 0xa1f0000000540300=full, 0xa1f0000000580300=full ;",
        "tenant_0x0020=0x0020, ipoib, defmember=limited : 0xa1f00000005a0300=limited ;"]
    assert (fabric["dir"] / "reloads").read_text().count("reloaded") == 5  # one per change, none for a no-op


def _keep_for_the_record(path: Path) -> None:
    """Show the file (``pytest -s``) and copy it into ``$AIFACTORY_TEST_ARTIFACTS`` when that is set."""
    import os
    import shutil

    print(f"--- {path.name} written by the partition authority for two hosts ---\n{path.read_text()}", end="")
    artifacts = os.environ.get("AIFACTORY_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / "partitions.conf")


def test_concurrent_changes_from_two_hosts_all_land(fabric: dict[str, Any]) -> None:
    """Both hosts deploying at once: every change is made under the authority's lock, none lost."""
    from concurrent.futures import ThreadPoolExecutor

    nodes = {name: sm.OpenSM(name, fabric["argv"]) for name in ("gpu-node-01", "gpu-node-02")}
    jobs = [(name, f"0xa1f0000000{vm:02x}0300") for vm in range(0x40, 0x48) for name in nodes]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda job: nodes[job[0]].add_members(0x10, [job[1]], "full"), jobs))
    line = fabric["partitions"].read_text().splitlines()[2]
    assert line.count("=full") == 8 and all(guid in line for _, guid in jobs)
    state = json.loads((fabric["dir"] / "state" / "ib-partitions.json").read_text())
    assert sorted(state) == ["gpu-node-01", "gpu-node-02"]
    assert [len(state[name]["0x0010"]) for name in sorted(state)] == [8, 8]


def test_a_hosts_earlier_memberships_reach_the_authority_before_its_first_change(fabric: dict[str, Any],
                                                                                 tmp_path: Path) -> None:
    """A host upgraded from keeping its own partition state: its running VMs' ports are handed to the
    authority with its first change, beside the other host's, and the old file is retired."""
    legacy = tmp_path / "node1-state" / "opensm-partitions.json"
    legacy.parent.mkdir()
    legacy.write_text(json.dumps({"0x0010": {"0xa1f0000000540300": "full"},
                                  "0x0020": {"0xa1f0000000560300": "limited"}}))
    sm.OpenSM("gpu-node-02", fabric["argv"]).add_members(0x10, ["0xa1f0000000580300"], "full")
    sm.OpenSM("gpu-node-01", fabric["argv"], legacy_state=legacy).add_members(0x20, ["0xa1f00000005a0300"], "full")
    assert fabric["partitions"].read_text().splitlines()[2:] == [
        "tenant_0x0010=0x0010, ipoib, defmember=limited : 0xa1f0000000540300=full, 0xa1f0000000580300=full ;",
        "tenant_0x0020=0x0020, ipoib, defmember=limited : 0xa1f0000000560300=limited, 0xa1f00000005a0300=full ;"]
    assert not legacy.exists() and legacy.with_name("opensm-partitions.json.migrated").exists()


@pytest.mark.parametrize(("stdin", "fragment"), [
    (b"not json", "not JSON"),
    (b'{"op": "add", "host": "gpu-node-01", "pkey": 32767, "guids": ["0xa1f0000000540300"]}', "default partition"),
    (b'{"op": "add", "host": "../etc", "pkey": 16, "guids": ["0xa1f0000000540300"]}', "invalid host name"),
    (b'{"op": "add", "host": "gpu-node-01", "pkey": 16, "guids": ["ALL"]}', "invalid GUID"),
    (b'{"op": "drop", "host": "gpu-node-01", "pkey": 16, "guids": ["0xa1f0000000540300"]}', "expected add or remove"),
    (b'{"op": "add", "host": "gpu-node-01", "pkey": 16, "guids": ["0xa1f0000000540300"], "membership": "both"}',
     "membership"),
])  # fmt: skip
def test_authority_refuses_bad_changes_with_one_line(fabric: dict[str, Any], stdin: bytes, fragment: str) -> None:
    result = subprocess.run(fabric["argv"], input=stdin, capture_output=True, timeout=60, check=False)
    assert result.returncode == 2
    message = result.stderr.decode()
    assert message.startswith("aifactory partition authority: ") and message.count("\n") == 1, message
    assert fragment in message
    assert not fabric["partitions"].exists()


class UfmHandler(BaseHTTPRequestHandler):
    pkeys: dict[str, dict[str, str]] = {}

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/ufmRest/resources/pkeys":
            return self._reply(404, {"error": "not found"})
        if self.headers.get("Authorization") != "Basic dG9rZW4=":
            return self._reply(401, {"error": "unauthorized"})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key = body.get("pkey", "")
        if not re.fullmatch(r"0x[0-9a-fA-F]{1,4}", key) or not 0 < int(key, 16) < 0x7FFF:
            return self._reply(400, {"error": "pkey must be between 0x0 and 0x7fff exclusive"})
        if not body.get("guids") or not all(re.fullmatch(r"[0-9a-fA-F]{16,20}", g) for g in body["guids"]):
            return self._reply(400, {"error": "bad guids"})
        if body.get("membership", "full") not in ("full", "limited"):
            return self._reply(400, {"error": "bad membership"})
        entry = self.pkeys.setdefault(f"{int(key, 16):#06x}", {})
        entry.update({g.lower(): body.get("membership", "full") for g in body["guids"]})
        return self._reply(200, {})

    def do_DELETE(self) -> None:  # noqa: N802
        match = re.fullmatch(r"/ufmRest/resources/pkeys/(0x[0-9a-fA-F]+)/guids/([0-9a-fA-F,]+)", self.path)
        if match is None:
            return self._reply(404, {"error": "not found"})
        entry = self.pkeys.get(f"{int(match.group(1), 16):#06x}")
        if entry is None:
            return self._reply(404, {"error": "pkey not found"})
        for g in match.group(2).split(","):
            entry.pop(g.lower(), None)
        return self._reply(200, {})


@pytest.fixture
def ufm_server() -> Iterator[str]:
    UfmHandler.pkeys = {}
    server = HTTPServer(("127.0.0.1", 0), UfmHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ufmRest"
    finally:
        server.shutdown()
        server.server_close()


def test_ufm_add_and_remove_guids(ufm_server: str) -> None:
    ufm = sm.Ufm(ufm_server, token="dG9rZW4=")
    ufm.add_members(0x10, [G1, G2], "limited")
    assert UfmHandler.pkeys == {"0x0010": {"a1f0000000540201": "limited", "a1f0000000560201": "limited"}}
    ufm.remove_members(0x10, [G1])
    assert UfmHandler.pkeys == {"0x0010": {"a1f0000000560201": "limited"}}
    ufm.remove_members(0x20, [G1])  # absent pkey: 404 means already gone


def test_ufm_errors_are_host_errors(ufm_server: str) -> None:
    with pytest.raises(HostError, match="HTTP 401"):
        sm.Ufm(ufm_server, token="wrong").add_members(0x10, [G1], "full")
    with pytest.raises(HostError, match="UFM POST"):
        sm.Ufm("http://127.0.0.1:9/ufmRest", token="x", timeout_s=2).add_members(0x10, [G1], "full")


def test_backend_selection_from_config(tmp_path: Path) -> None:
    local = sm.from_settings({"partitions_file": str(tmp_path / "p.conf")}, tmp_path)
    assert isinstance(local, sm.OpenSM) and local.authority == () and local.local is not None
    assert local.local.partitions_file == tmp_path / "p.conf" and local.local.state_dir == tmp_path
    remote = sm.from_settings({"partition_authority": ["ssh", "sm-node", "python3", *AUTHORITY]}, tmp_path)
    assert isinstance(remote, sm.OpenSM) and remote.authority[:2] == ("ssh", "sm-node") and remote.local is None
    with pytest.raises(ConfigError, match="partition_authority"):
        sm.from_settings({"partition_authority": "ssh sm-node"}, tmp_path)
    with pytest.raises(ConfigError, match="management_guids"):
        sm.from_settings({"management_guids": ["ALL"]}, tmp_path)
    token = tmp_path / "token"
    token.write_text("dG9rZW4=\n")
    ufm = sm.from_settings({"subnet_manager": "ufm", "ufm_url": "https://ufm/ufmRest", "ufm_token_file": str(token)},
                           tmp_path)
    assert isinstance(ufm, sm.Ufm) and ufm.token == "dG9rZW4="
    with pytest.raises(ConfigError, match="expected opensm or ufm"):
        sm.from_settings({"subnet_manager": "sm9000"}, tmp_path)
    with pytest.raises(ConfigError, match="ufm_url"):
        sm.from_settings({"subnet_manager": "ufm", "ufm_url": "file:///etc/passwd"}, tmp_path)
