"""The resident hook server on the frontend: decides hook events handed over by
:mod:`aifactory_core.policy.hookclient`, with the hardened XML parser, the policy modules and the
oned client loaded once instead of once per event.

``aifactory hook-server [--socket PATH]`` (the ``aifactory-hook-server.service`` unit, as
oneadmin) listens on a Unix socket created 0600 in a directory only its user may enter; each
connection carries one event and is decided on its own thread by
:func:`aifactory_core.policy.hookmain.handle` — the same code a hook process runs, so the
per-group admission lock, the configuration (re-read per event) and the answers are the same.
A request is bounded (header 256 bytes, payload 24 MiB, 30 s to arrive); a malformed one is
answered like malformed hook input (exit 2, one line) and changes nothing.
"""

from __future__ import annotations

import os
import socket
import socketserver
from collections.abc import Callable
from pathlib import Path

from aifactory_core.errors import EXIT_USAGE, UsageError
from aifactory_core.policy.hookclient import DEFAULT_SOCKET, MAX_PAYLOAD, is_request

MAX_HEADER = 256
REQUEST_TIMEOUT_S = 30.0


def parse_header(line: bytes) -> list[str] | None:
    """``kind [METHOD]`` as the client sends it (:func:`~aifactory_core.policy.hookclient.is_request`);
    None for anything else."""
    try:
        words = line.decode("ascii").split()
    except UnicodeDecodeError:
        return None
    return words if is_request(words) else None


def read_request(connection: socket.socket) -> tuple[list[str] | None, bytes]:
    """The header's words (None when malformed) and the payload, up to the client's half-close."""
    buffer = b""
    while b"\n" not in buffer and len(buffer) <= MAX_HEADER:
        chunk = connection.recv(4096)
        if not chunk:
            break
        buffer += chunk
    line, newline, rest = buffer.partition(b"\n")
    if not newline or len(line) > MAX_HEADER:
        return None, b""
    chunks, size = [rest], len(rest)
    while size <= MAX_PAYLOAD:
        chunk = connection.recv(1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return parse_header(line), b"".join(chunks)


def answer(words: list[str] | None, data: bytes) -> bytes:
    from aifactory_core.policy import hookmain

    if words is None:
        status, out, err = EXIT_USAGE, "", "aifactory-hook-server: malformed request (expected 'kind [METHOD]')"
    else:
        status, out, err = hookmain.handle(words, data)
    return f"{status}\n{' '.join(out.split())}\n{' '.join(err.split())}".encode()


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        connection: socket.socket = self.request
        connection.settimeout(REQUEST_TIMEOUT_S)
        try:
            words, data = read_request(connection)
            connection.sendall(answer(words, data))
        except OSError:
            pass  # the client went away: it reports the failure itself


class HookServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def warm_up() -> None:
    """Load what every event needs, once."""
    import aifactory_core.one.xmlrpc  # noqa: F401
    import aifactory_core.one.xmlsafe  # noqa: F401
    import aifactory_core.policy.accounting  # noqa: F401
    import aifactory_core.policy.admission  # noqa: F401
    import aifactory_core.policy.decide  # noqa: F401
    import aifactory_core.policy.hookmain  # noqa: F401
    import aifactory_core.policy.oned  # noqa: F401
    import aifactory_core.policy.schema  # noqa: F401


def open_server(path: str = DEFAULT_SOCKET) -> HookServer:
    """Bind the socket (0600; its directory must not be open to others); replaces a stale one."""
    socket_path = Path(path)
    directory = socket_path.parent
    if not directory.is_dir():
        raise UsageError(f"hook server: directory {directory} does not exist")
    if directory.stat().st_mode & 0o022:
        raise UsageError(f"hook server: {directory} is writable by others: a socket there could be replaced")
    if socket_path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            socket_path.unlink()  # left by a server that is gone
        else:
            raise UsageError(f"hook server: another server is listening on {path}")
        finally:
            probe.close()
    elif socket_path.exists():
        raise UsageError(f"hook server: {path} exists and is not a socket")
    previous = os.umask(0o177)
    try:
        server = HookServer(path, _Handler)
    except OSError as error:  # a path too long for AF_UNIX, a directory it may not write
        raise UsageError(f"hook server: cannot listen on {path}: {error.strerror or error}") from None
    finally:
        os.umask(previous)
    return server


def serve(path: str = DEFAULT_SOCKET, listening: Callable[[], object] | None = None) -> None:
    """Serve until interrupted; ``listening`` is called once the socket is bound
    (``threading.Event().set`` for a thread, a log line for the service)."""
    warm_up()
    server = open_server(path)
    try:
        if listening is not None:
            listening()
        server.serve_forever()
    finally:
        server.server_close()
        Path(path).unlink(missing_ok=True)
