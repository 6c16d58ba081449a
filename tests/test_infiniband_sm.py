"""Subnet-manager back-ends.

OpenSM: the generated ``partitions.conf`` follows the grammar of OpenSM's
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
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from aifactory_plugins.infiniband import sm

from aifactory_core.errors import ConfigError, HostError

G1, G2 = "a1:f0:00:00:00:54:02:01", "0xa1f0000000560201"


def test_opensm_partitions_file_and_reload(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def runner(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    opensm = sm.OpenSM(tmp_path / "partitions.conf", tmp_path / "state.json", ("systemctl", "reload", "opensm"),
                       runner)
    opensm.add_members(0x10, [G1], "full")
    opensm.add_members(0x8011, [G2], "limited")
    opensm.add_members(0x10, [G1], "full")  # idempotent: no second reload
    text = (tmp_path / "partitions.conf").read_text()
    assert "Default=0x7fff, ipoib : ALL=full ;" in text
    assert "tenant_0x0010=0x0010, ipoib, defmember=limited : 0xa1f0000000540201=full ;" in text
    assert "tenant_0x0011=0x0011, ipoib, defmember=limited : 0xa1f0000000560201=limited ;" in text
    assert len(calls) == 2
    opensm.remove_members(0x10, [G1])
    opensm.remove_members(0x10, [G1])  # idempotent
    assert "tenant_0x0010" not in (tmp_path / "partitions.conf").read_text()
    assert len(calls) == 3


def test_opensm_reload_failure_is_reported(tmp_path: Path) -> None:
    def runner(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 1, "", "opensm not running")

    opensm = sm.OpenSM(tmp_path / "p.conf", tmp_path / "s.json", ("reload-opensm",), runner)
    with pytest.raises(HostError, match="opensm not running"):
        opensm.add_members(0x12, [G1], "full")


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
    assert isinstance(sm.from_settings({}, tmp_path), sm.OpenSM)
    token = tmp_path / "token"
    token.write_text("dG9rZW4=\n")
    ufm = sm.from_settings({"subnet_manager": "ufm", "ufm_url": "https://ufm/ufmRest", "ufm_token_file": str(token)},
                           tmp_path)
    assert isinstance(ufm, sm.Ufm) and ufm.token == "dG9rZW4="
    with pytest.raises(ConfigError, match="expected opensm or ufm"):
        sm.from_settings({"subnet_manager": "sm9000"}, tmp_path)
    with pytest.raises(ConfigError, match="ufm_url"):
        sm.from_settings({"subnet_manager": "ufm", "ufm_url": "file:///etc/passwd"}, tmp_path)
