"""The frontend hook executables: ``admission`` (API hooks) and ``accounting`` (state hooks).

``python -m aifactory_core.policy.hookmain admission|accounting`` reads the hook payload from
stdin (``ARGUMENTS_STDIN = "YES"``), prints one line for the hook log and exits 0 when the event
was handled, 2 when the payload is malformed or hostile (nothing was changed), 1 when oned or
the ledger failed. Only the stdlib, the hardened XML parser and the policy modules load on the
way to a decision; pyone is imported only when oned must be called.

Configuration: ``[plugin.policy]`` in ``/etc/one/aifactory.conf`` — ``file`` (the policy,
default ``/etc/one/aifactory-policy.toml``), ``on_refusal`` (``hold`` or ``terminate``),
``accounting_dir`` (the ledger; ``AIFACTORY_ACCOUNTING_DIR`` overrides it), ``lock_dir`` (the
per-group admission locks, default the accounting directory), ``lock_timeout`` (seconds an
admission waits for its group's lock, default 60). ``AIFACTORY_POLICY`` overrides ``file``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aifactory_core.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, AifactoryError

# one input limit and one way to answer, with or without the server
from aifactory_core.policy.hookclient import MAX_PAYLOAD as MAX_STDIN
from aifactory_core.policy.hookclient import report

DEFAULT_POLICY = "/etc/one/aifactory-policy.toml"


def config_path() -> str:
    """``$AIFACTORY_CONFIG``, else the frontend's: ``/etc/one/aifactory.conf``, or for a self-contained
    OpenNebula (whose hook manager runs the hooks with ``$ONE_LOCATION`` set) ``$ONE_LOCATION/etc``'s."""
    explicit = os.environ.get("AIFACTORY_CONFIG")
    if explicit:
        return explicit
    location = os.environ.get("ONE_LOCATION", "").rstrip("/")
    return f"{location}/etc/aifactory.conf" if location.startswith("/") else "/etc/one/aifactory.conf"


def _settings() -> dict[str, Any]:
    path = config_path()
    if not os.path.exists(path):
        return {}
    from aifactory_core.config import load_config

    return dict(load_config(path).plugin("policy"))


def _checked(data: bytes) -> bytes:
    if len(data) > MAX_STDIN:
        from aifactory_core.errors import DocumentError

        raise DocumentError(f"hook input is larger than {MAX_STDIN} bytes")
    return data


def admission(argv: Sequence[str], data: bytes) -> str:
    from aifactory_core.policy.admission import DEFAULT_LOCK_TIMEOUT, admit_event, read_event

    event = read_event(_checked(data), argv[0] if argv else None)
    if not event.call.success:
        return f"{event.method} failed in oned; nothing to admit"
    from aifactory_core.policy.schema import load_policy

    settings = _settings()
    policy = load_policy(_policy_file(settings))
    on_refusal = settings.get("on_refusal", "hold")
    if on_refusal not in ("hold", "terminate"):
        from aifactory_core.errors import ConfigError

        raise ConfigError(f"[plugin.policy] on_refusal = {on_refusal!r}: expected hold or terminate")
    lock_timeout = settings.get("lock_timeout", DEFAULT_LOCK_TIMEOUT)
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or not 0 < lock_timeout <= 3600:
        from aifactory_core.errors import ConfigError

        raise ConfigError(f"[plugin.policy] lock_timeout = {lock_timeout!r}: expected seconds in (0, 3600]")
    lock_dir = settings.get("lock_dir")
    return admit_event(
        event, policy, on_refusal=on_refusal, lock_timeout=float(lock_timeout),
        lock_directory=Path(str(lock_dir)) if lock_dir else _accounting_directory(settings),
    ).summary()  # fmt: skip


def _policy_file(settings: dict[str, Any]) -> str:
    return os.environ.get("AIFACTORY_POLICY") or str(settings.get("file") or DEFAULT_POLICY)


def _accounting_directory(settings: dict[str, Any]) -> Path:
    from aifactory_core.policy.accounting import default_directory

    directory = os.environ.get("AIFACTORY_ACCOUNTING_DIR") or settings.get("accounting_dir")
    return Path(str(directory)) if directory else default_directory()


def accounting(argv: Sequence[str], data: bytes) -> str:
    """Record the VM in the ledger, then write its totals into its USER_TEMPLATE; the ledger is
    the source of truth: a failed write-back is reported in the line, the exit stays 0."""
    from aifactory_core.one.payload import load_document, vm_element_of
    from aifactory_core.policy.accounting import Ledger, vm_usage_from_element

    words = _checked(data).split()
    if not words:
        from aifactory_core.errors import DocumentError

        raise DocumentError("hook input is empty: expected $TEMPLATE on stdin (ARGUMENTS_STDIN = \"YES\")")
    element, _ = vm_element_of(load_document(words[0], "$TEMPLATE payload", encoding="base64"))
    usage = vm_usage_from_element(element)
    settings = _settings()
    entry = Ledger(_accounting_directory(settings)).record(usage)
    line = f"VM {usage.vm_id}: {usage.gpus} GPUs, {len(usage.intervals)} running intervals recorded"
    return f"{line}; {_write_showback(usage.vm_id, entry, settings)}"


def _write_showback(vm_id: int, entry: dict[str, Any], settings: dict[str, Any]) -> str:
    from aifactory_core.policy.accounting import showback_of
    from aifactory_core.policy.schema import Policy, load_policy

    policy: Policy | None = None
    try:
        policy = load_policy(_policy_file(settings))
    except AifactoryError:
        pass  # no readable policy: GPU time without a price
    showback = showback_of(vm_id, entry, policy)
    if showback is None:
        return "no GPUs, USER_TEMPLATE left as it is"
    template = showback.template()
    try:
        from aifactory_core.policy.oned import Oned

        Oned(None, None).call("one.vm.update", vm_id, template, 1)
    except AifactoryError as error:
        return f"USER_TEMPLATE not updated ({error.message})"
    return f"USER_TEMPLATE {template.replace(chr(10), ' ')}"


HANDLERS = {"admission": admission, "accounting": accounting}
USAGE = "usage: hookmain admission|accounting [METHOD] < payload"


def handle(args: Sequence[str], data: bytes) -> tuple[int, str, str]:
    """One hook event: (exit status, the line for stdout, the line for stderr). The same for a
    hook process and for the resident hook server (:mod:`aifactory_core.policy.hookserver`)."""
    if not args or args[0] not in HANDLERS:
        return EXIT_USAGE, "", USAGE
    try:
        return EXIT_OK, HANDLERS[args[0]](args[1:], data), ""
    except AifactoryError as error:
        status = error.exit_status if error.exit_status in (EXIT_USAGE, EXIT_CHECK_FAILED) else EXIT_CHECK_FAILED
        return status, "", f"aifactory-{args[0]}: {error.message}"
    except Exception as error:  # a defect, not bad input: one line (as the CLI says it), never a traceback
        detail = " ".join(str(error).split())[:300]
        return EXIT_CHECK_FAILED, "", f"aifactory-{args[0]}: internal error: {type(error).__name__}: {detail}"


def main(argv: Sequence[str] | None = None, data: bytes | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in HANDLERS:
        return report(EXIT_USAGE, "", USAGE)
    return report(*handle(args, sys.stdin.buffer.read(MAX_STDIN + 1) if data is None else data))


if __name__ == "__main__":
    sys.exit(main())
