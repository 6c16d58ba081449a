"""The lean XML-RPC transport against pyone's, and against hostile HTTP servers.

Against a real oned: ``tests/oned/test_oned_lean_transport.py``. Here ``tests/onetestserver.py`` stands
in only because it records the parameters each transport delivered, and for the faults a real oned
will not produce on demand (an XML-RPC fault for a missing argument). The hostile servers are raw TCP
sockets on 127.0.0.1 that answer canned bytes (or nothing), to exercise the HTTP and XML guards.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from onetestserver import OneTestServer

from aifactory_core.one import xmlrpc
from aifactory_core.policy.oned import Oned, OnedError

SESSION = "oneadmin:secret"


@pytest.fixture
def both(one_server: OneTestServer) -> tuple[Oned, Oned]:
    one_server.add_vm(42, state=2)
    one_server.add_vm(43, state=3, lcm_state=3)
    return Oned(one_server.endpoint, SESSION), Oned(one_server.endpoint, SESSION, transport="pyone")


CALLS = [
    ("one.vm.info", 42, False),
    ("one.vmpool.infoextended", -2, -1, -1, -1),
    ("one.vm.update", 42, 'AIFACTORY_NOTE="a <b> & c"', 1),
    ("one.vm.action", "release", 42),
]


@pytest.mark.parametrize("call", CALLS, ids=[call[0] for call in CALLS])
def test_lean_and_pyone_identical(both: tuple[Oned, Oned], one_server: OneTestServer, call: tuple) -> None:
    lean, pyone = both
    lean_answer = lean.call(*call)
    lean_params = one_server.calls[-1]
    one_server.add_vm(42, state=2)  # the same starting state for the second call
    pyone_answer = pyone.call(*call)
    assert lean_answer == pyone_answer
    assert lean_params == one_server.calls[-1] == (call[0], call[1:])
    assert one_server.sessions[-2:] == [SESSION, SESSION]


def test_fault_is_one_line_error(both: tuple[Oned, Oned]) -> None:
    for oned in both:
        with pytest.raises(OnedError) as caught:
            oned.call("one.vm.action", "release")  # missing VM id: the server raises, XML-RPC answers a fault
        message = str(caught.value)
        assert message.startswith("one.vm.action: ") and "ault 1" in message  # pyone: "<Fault 1:", lean: "fault 1:"
        assert "missing 1 required positional argument" in message and "\n" not in message


def test_parameters_escaped_exactly(one_server: OneTestServer) -> None:
    one_server.add_vm(42)
    text = 'N="<&>]]> \u00e9\u4e2d\r\n\t"'
    Oned(one_server.endpoint, SESSION).call("one.vm.update", 42, text, 0)
    assert one_server.calls[-1] == ("one.vm.update", (42, text, 0))


def test_unsendable_parameters_refused() -> None:
    for params in ((2**31,), ("\x00",), ("a\ud800",), ("\ufffe",), (1.5,), (None,)):
        with pytest.raises(xmlrpc.XmlRpcError):
            xmlrpc.encode_call("one.vm.info", params)


# ---------------------------------------------------------------- hostile servers


class CannedServer:
    """Accepts connections on 127.0.0.1, reads the request, answers ``answer`` (None: never answers)."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/RPC2"

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            with connection:
                request = b""
                while b"</methodCall>" not in request:
                    data = connection.recv(65536)
                    if not data:
                        break
                    request += data
                if self.answer is None:
                    self.stop.wait(5)
                    continue
                try:
                    connection.sendall(self.answer)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def canned() -> Iterator[list[CannedServer]]:
    servers: list[CannedServer] = []
    yield servers
    for server in servers:
        server.close()


def _response(value_xml: str) -> bytes:
    return (f"<?xml version='1.0'?>\n<methodResponse><params><param><value>{value_xml}</value></param>"
            "</params></methodResponse>\n").encode()  # fmt: skip


OK_BODY = _response("<array><data><value><boolean>1</boolean></value><value><string>&lt;VM/&gt;</string></value>"
                    "<value><i4>0</i4></value></data></array>")  # fmt: skip


def _http(body: bytes, head: str = "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n") -> bytes:
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def _chunked(body: bytes, cut: int | None = None) -> bytes:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:40], body[40:]))
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    return data if cut is None else data[:cut]


def _oned_error(canned: list[CannedServer], answer: bytes | None, timeout: float = 5.0) -> str:
    server = CannedServer(answer)
    canned.append(server)
    with pytest.raises(OnedError) as caught:
        Oned(server.endpoint, SESSION, timeout=timeout).call("one.vm.info", 42, False)
    message = str(caught.value)
    assert message.startswith("one.vm.info: ") and "\n" not in message
    return message


def test_canned_content_length_and_chunked_accepted(canned: list[CannedServer]) -> None:
    for answer in (_http(OK_BODY), _chunked(OK_BODY)):
        server = CannedServer(answer)
        canned.append(server)
        assert Oned(server.endpoint, SESSION).call("one.vm.info", 42, False) == "<VM/>"


def test_doctype_entity_refused(canned: list[CannedServer]) -> None:
    hostile = (b"<?xml version='1.0'?>\n<!DOCTYPE methodResponse [<!ENTITY x SYSTEM 'file:///etc/passwd'>]>\n"
               b"<methodResponse><params><param><value><array><data><value><boolean>1</boolean></value>"
               b"<value><string>&x;</string></value></data></array></value></param></params>"
               b"</methodResponse>")  # fmt: skip
    assert "DOCTYPE with entity declarations" in _oned_error(canned, _http(hostile))


def test_oversize_body_refused(canned: list[CannedServer]) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\n"
    assert "larger than the" in _oned_error(canned, head + OK_BODY)
    server = CannedServer(b"HTTP/1.1 200 OK\r\n\r\n" + OK_BODY + b" " * 100_000)  # no length: read to close
    canned.append(server)
    with pytest.raises(xmlrpc.XmlRpcError, match="larger than the size limit"):
        xmlrpc.call(server.endpoint, "one.vm.info", (SESSION, 42), timeout=5, max_bytes=50_000)


@pytest.mark.parametrize("status", [b"HTTP/1.1 200\xff OK", b"ICY 200 OK", b"HTTP/1.1 20 OK", b"HTTP/2 200 OK"])
def test_malformed_status_line(canned: list[CannedServer], status: bytes) -> None:
    answer = status + b"\r\nContent-Length: %d\r\n\r\n" % len(OK_BODY) + OK_BODY
    assert "malformed HTTP status line" in _oned_error(canned, answer)


def test_http_error_status_and_bad_headers(canned: list[CannedServer]) -> None:
    assert _oned_error(canned, _http(b"no", "HTTP/1.1 500 Internal Server Error\r\n")).endswith(
        "HTTP 500 Internal Server Error"
    )
    assert "malformed HTTP header line" in _oned_error(canned, _http(OK_BODY, "HTTP/1.1 200 OK\r\n folded\r\n"))
    both_lengths = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
    assert "both Transfer-Encoding and Content-Length" in _oned_error(canned, both_lengths)


def test_truncated_bodies(canned: list[CannedServer]) -> None:
    full = _chunked(OK_BODY)
    assert "connection closed inside the chunked body" in _oned_error(canned, full[: len(full) - 30])
    assert "connection closed inside the chunk size line" in _oned_error(canned, full[:-5])
    assert "connection closed inside the body" in _oned_error(canned, _http(OK_BODY)[:-10])
    bad_size = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    assert "malformed chunk size line" in _oned_error(canned, bad_size)


def test_server_that_never_answers_times_out(canned: list[CannedServer]) -> None:
    assert "timed out waiting for the answer" in _oned_error(canned, None, timeout=0.5)


def test_not_xml_rpc_and_unreachable(canned: list[CannedServer]) -> None:
    assert "root element 'html'" in _oned_error(canned, _http(b"<html/>"))
    assert "not well-formed" in _oned_error(canned, _http(b"<methodResponse>"))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(OnedError, match="cannot connect to 127.0.0.1:"):
        Oned(f"http://127.0.0.1:{port}/RPC2", SESSION).call("one.vm.info", 42, False)
    with pytest.raises(OnedError, match="unsupported XML-RPC endpoint"):
        Oned("ftp://oned/RPC2", SESSION).call("one.vm.info", 42, False)


def test_hook_path_does_not_import_pyone_or_http_client(one_server: OneTestServer) -> None:
    import subprocess
    import sys

    one_server.add_vm(42)
    statement = ("import sys; from aifactory_core.policy.oned import Oned; "
                 f"Oned({one_server.endpoint!r}, {SESSION!r}).document('one.vm.info', 42, False); "
                 "print(sorted(m for m in ('pyone', 'requests', 'http.client', 'xmlrpc.client', 'ssl') "
                 "if m in sys.modules))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
