"""The hook executable OpenNebula spawns per event: hand the event to the resident hook server,
or decide it in this process when no server is listening.

``python -m aifactory_core.policy.hookclient admission|accounting [METHOD]`` reads the payload
from stdin like :mod:`aifactory_core.policy.hookmain` and answers the same way (one line, the same
exit status). Its own start-up is the interpreter and ``socket``: the hardened XML parser, the
policy and the oned client stay loaded in the server (:mod:`aifactory_core.policy.hookserver`),
so an event costs a connect instead of their imports. Without a server (not installed, not
running, socket refused) the event is decided here, by the same code: the server is a speed-up,
never a dependency.

Wire format (a Unix socket, one event per connection): the request is ``kind [METHOD]\\n``
followed by the payload, the client's half-close ending it; the answer is
``<exit status>\\n<stdout line>\\n<stderr line>``.
"""

from __future__ import annotations

import os
import sys

DEFAULT_SOCKET = "/run/aifactory/hooks.sock"
ENV_SOCKET = "AIFACTORY_HOOK_SOCKET"
MAX_PAYLOAD = 24 * 1024 * 1024
MAX_ANSWER = 64 * 1024
ANSWER_TIMEOUT_S = 110.0  # below the hook templates' TIMEOUT = 120
KINDS = ("admission", "accounting")


def is_request(words: list[str]) -> bool:
    """``kind [METHOD]``, METHOD an XML-RPC method name: the one rule for what the client sends
    and what the server (:func:`aifactory_core.policy.hookserver.parse_header`) accepts."""
    if not words or words[0] not in KINDS or len(words) > 2:
        return False
    method = words[1] if len(words) == 2 else "x"
    return method.isascii() and method.replace(".", "").replace("_", "").isalnum() and len(method) <= 64


def _header(args: list[str]) -> bytes | None:
    """``kind [METHOD]\\n``; None when the arguments are not a hook's (decided locally, refused there)."""
    return (" ".join(args) + "\n").encode("ascii") if is_request(args) else None


def _exchange(path: str, header: bytes, data: bytes) -> tuple[int, str, str] | None:
    """The server's answer; None when no server accepted the connection (nothing was sent)."""
    import socket

    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.settimeout(2.0)
        try:
            client.connect(path)
        except OSError:
            return None
        client.settimeout(ANSWER_TIMEOUT_S)
        client.sendall(header + data)
        client.shutdown(socket.SHUT_WR)
        chunks, size = [], 0
        while size <= MAX_ANSWER:
            chunk = client.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as error:
        return 1, "", f"aifactory-{header.split()[0].decode()}: hook server at {path}: {error}"
    finally:
        client.close()
    status, _, rest = b"".join(chunks)[:MAX_ANSWER].decode("utf-8", "replace").partition("\n")
    out, _, err = rest.partition("\n")
    if not status.isdigit():
        return 1, "", f"aifactory-{header.split()[0].decode()}: hook server at {path} gave no answer"
    return int(status), out.strip(), err.strip()


def report(status: int, out: str, err: str) -> int:
    """Write a hook's answer as OpenNebula's hook log takes it (the server's or this process's)."""
    if out:
        print(out)
    if err:
        print(err, file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    data = sys.stdin.buffer.read(MAX_PAYLOAD + 1)
    header = _header(args)
    answer = None
    if header is not None and len(data) <= MAX_PAYLOAD:
        answer = _exchange(os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET, header, data)
    if answer is None:
        from aifactory_core.policy import hookmain

        return hookmain.main(args, data)
    return report(*answer)


if __name__ == "__main__":
    sys.exit(main())
