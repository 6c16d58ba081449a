"""The resident hook server and the hook client, as real processes.

``aifactory hook-server`` listens on a Unix socket; the hook executable
(``python -m aifactory_core.policy.hookclient``) hands it each event. The oned they talk to is the
XML-RPC test server of ``tests/onetestserver.py`` (real HTTP; every answer validated against
OpenNebula 7.0.2's XSDs). To show which process decided, the server and the client are given
different policy files: only the server's grants the sample VM's devices.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_admission_concurrency import CAP, VMS, environment, instantiate_payload
from tests.test_admission_hook import PYTHON

CLIENT = [str(PYTHON), "-m", "aifactory_core.policy.hookclient", "admission"]


@pytest.fixture
def hook_server(one_server, tmp_path: Path):  # noqa: ANN201
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    path = directory / "hooks.sock"
    env = environment(one_server, tmp_path, CAP)
    process = subprocess.Popen([sys.executable, "-m", "aifactory_core.cli", "hook-server", "--socket", str(path)],
                               env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not path.is_socket():
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "hook server did not start"
        time.sleep(0.05)
    yield path
    process.terminate()
    process.wait(timeout=10)
    assert not path.exists()  # the server removes its socket on SIGTERM


def client_env(one_server, tmp_path: Path, socket_path: Path) -> dict[str, str]:
    env = environment(one_server, tmp_path, CAP)
    env["AIFACTORY_POLICY"] = str(tmp_path / "client-has-no-policy.toml")  # only the server can decide
    env["AIFACTORY_HOOK_SOCKET"] = str(socket_path)
    return env


def test_the_server_decides_and_its_socket_is_private(one_server, hook_server: Path, tmp_path: Path) -> None:
    one_server.add_vm(400, state=2)
    result = subprocess.run(CLIENT, input=instantiate_payload(400), capture_output=True,
                            env=client_env(one_server, tmp_path, hook_server), timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith("VM 400: admitted") and result.stderr == b""
    assert one_server.vms[400].findtext("STATE") == "1"
    assert stat.S_IMODE(hook_server.stat().st_mode) == 0o600


def test_without_a_server_the_hook_decides_itself(one_server, tmp_path: Path) -> None:
    one_server.add_vm(401, state=2)
    env = environment(one_server, tmp_path, CAP)
    env["AIFACTORY_HOOK_SOCKET"] = str(tmp_path / "nobody-listens.sock")
    result = subprocess.run(CLIENT, input=instantiate_payload(401), capture_output=True, env=env, timeout=60,
                            check=False)
    assert result.returncode == 0 and result.stdout.decode().startswith("VM 401: admitted"), result.stderr
    assert one_server.vms[401].findtext("STATE") == "1"


def test_hostile_input_through_the_server_is_refused_in_one_line(one_server, hook_server: Path,
                                                                tmp_path: Path) -> None:
    import base64

    xxe = base64.b64encode(b'<?xml version="1.0"?><!DOCTYPE c [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                           b"<CALL_INFO><RESULT>1</RESULT></CALL_INFO>") + b" one.vm.allocate"
    result = subprocess.run(CLIENT, input=xxe, capture_output=True, env=client_env(one_server, tmp_path, hook_server),
                            timeout=60, check=False)
    assert result.returncode == 2 and result.stdout == b""
    err = result.stderr.decode()
    assert err.startswith("aifactory-admission: ") and err.count("\n") == 1 and "passwd" not in err.split(":", 1)[0]
    assert one_server.writes() == []


def test_a_malformed_request_is_answered_not_obeyed(hook_server: Path) -> None:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(str(hook_server))
    connection.sendall(b"shutdown now\n")
    connection.shutdown(socket.SHUT_WR)
    answer = connection.recv(4096).decode()
    connection.close()
    status, out, err = answer.split("\n")
    assert (status, out) == ("2", "") and "malformed request" in err


def test_the_server_takes_only_what_the_client_may_send() -> None:
    """One rule (hookclient.is_request) for the client's header and the server's: a METHOD the
    client would never send is a malformed request to the server too."""
    from aifactory_core.policy.hookclient import _header
    from aifactory_core.policy.hookserver import parse_header

    for args in (["admission"], ["accounting"], ["admission", "one.vm.allocate"]):
        header = _header(args)
        assert header is not None and parse_header(header.rstrip(b"\n")) == args
    for args in (["admission", "one.vm.allocate;id"], ["admission", "x" * 65], ["shutdown"], [],
                 ["admission", "one.vm.allocate", "extra"]):
        assert _header(args) is None
        assert parse_header(" ".join(args).encode()) is None


def test_concurrent_events_through_the_server_keep_the_gpu_cap(one_server, hook_server: Path,
                                                               tmp_path: Path) -> None:
    vm_ids = list(range(500, 500 + VMS))
    for vm_id in vm_ids:
        one_server.add_vm(vm_id, state=2)
    env = client_env(one_server, tmp_path, hook_server)
    processes = [(vm_id, subprocess.Popen(CLIENT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, env=env)) for vm_id in vm_ids]
    for vm_id, process in processes:
        _out, err = process.communicate(instantiate_payload(vm_id), timeout=120)
        assert process.returncode == 0, err
    released = [vm_id for vm_id in vm_ids if one_server.vms[vm_id].findtext("STATE") == "1"]
    assert len(released) == CAP


def test_a_second_server_on_a_live_socket_is_refused(hook_server: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "aifactory_core.cli", "hook-server", "--socket", str(hook_server)],
                            capture_output=True, timeout=60, check=False, env=dict(os.environ))
    assert result.returncode == 2 and b"another server is listening" in result.stderr


def test_a_defect_while_deciding_is_answered_in_one_line(monkeypatch) -> None:
    """An exception that is no AifactoryError (a bug) still gives the hook its one line and exit 1,
    from a hook process and from the server alike, instead of a traceback or a dropped connection."""
    from aifactory_core.policy import hookmain, hookserver

    def broken(_argv: list[str], _data: bytes) -> str:
        raise KeyError("GID")

    monkeypatch.setitem(hookmain.HANDLERS, "accounting", broken)
    assert hookmain.handle(["accounting"], b"x") == (1, "", "aifactory-accounting: internal error: KeyError: 'GID'")
    assert hookserver.answer(["accounting"], b"x") == b"1\n\naifactory-accounting: internal error: KeyError: 'GID'"


def test_a_socket_path_that_cannot_be_bound_is_refused_in_one_line(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    path = directory / ("a" * 120 + ".sock")  # longer than AF_UNIX allows
    result = subprocess.run([sys.executable, "-m", "aifactory_core.cli", "hook-server", "--socket", str(path)],
                            capture_output=True, text=True, timeout=60, check=False, env=dict(os.environ))
    assert result.returncode == 2
    assert result.stderr == f"aifactory: hook server: cannot listen on {path}: AF_UNIX path too long\n"


def test_the_hook_client_starts_with_nothing_but_itself() -> None:
    """The hook executable is a process per event: what it loads before handing the event to the
    server is itself and ``socket`` -- not the XML parser, the policy, the errors or oned's client
    (those load only when no server answers, in hookmain)."""
    import sys

    statement = ("import sys; from aifactory_core.policy import hookclient; "
                 "hookclient._exchange('/nonexistent/hooks.sock', b'admission\\n', b''); "
                 "print(' '.join(sorted(m for m in sys.modules if m.startswith(('aifactory', 'lxml', 'pyone', "
                 "'tomllib', 'xmlrpc', 'http', 'json', 'email')))))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["aifactory_core", "aifactory_core.policy", "aifactory_core.policy.hookclient"]


def test_the_client_knows_the_kinds_hookmain_handles() -> None:
    """hookclient keeps its own KINDS (importing hookmain would load what the client avoids):
    the two lists must name the same hooks, or one kind would never reach the server."""
    from aifactory_core.policy.hookclient import KINDS
    from aifactory_core.policy.hookmain import HANDLERS

    assert sorted(KINDS) == sorted(HANDLERS)
