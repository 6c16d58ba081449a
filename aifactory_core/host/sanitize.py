"""The gate between tenants: reset a function before the host (or the next VM) gets it back, check
it came back healthy, and quarantine it when it did not.

Reset goes through the kernel's ``reset`` attribute, which tries the device's ``reset_method``s in
order (FLR, PM, bus...). FLR alone does not always clear a GPU; when the reset fails and the
topology allows a secondary bus reset, ``bus`` is tried explicitly. Afterwards the config space must
read back (not all-ones: the device fell off the bus) and the link must train at its maximum width.

A quarantined device is refused to new VMs (``ownership.claim``) and reported by the probes until
an administrator clears it (``aifactory device clear ADDR``).

Every outcome, good or bad, is appended to ``<state dir>/resets/<address>`` (one line per reset:
``TIME<TAB>OK|FAILED<TAB>METHOD<TAB>REASON``, the newest last, at most :data:`RESET_HISTORY` lines),
rewritten atomically; the probes report the newest line as ``LAST_RESET``. A history that cannot
be written (no space left) does not keep a healthy device from its driver; a quarantine that cannot
be written keeps the device on vfio-pci (HostError), so nothing unchecked goes back.
"""

from __future__ import annotations

import time
from pathlib import Path

from aifactory_core.errors import HostError
from aifactory_core.host.pcibind import RecordingWriter, SysfsWriter, Writer
from aifactory_core.host.sysfs import read_int, read_str
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle.atomic import names, read_text, remove, write_atomic
from aifactory_core.validate import pci_address


def _quarantine_dir(host: HostRoot) -> str:
    return str(host.state_dir / "quarantine")


def quarantined(host: HostRoot) -> dict[str, str]:
    """Quarantined devices: PCI address -> reason."""
    result = {}
    for name in names(host.state_dir / "quarantine"):
        reason = None if name.startswith(".") else read_text(host.state_dir / "quarantine" / name)
        if reason is not None:
            result[name] = reason
    return result


def quarantine(host: HostRoot, address: str, reason: str) -> None:
    write_atomic(host.state_dir / "quarantine" / pci_address(address), f"{reason}\n".encode())


def clear_quarantine(host: HostRoot, address: str) -> bool:
    return remove(host.state_dir / "quarantine" / pci_address(address))


RESET_HISTORY = 16
NO_RESET = "none"


def _first_method(host: HostRoot, address: str) -> str:
    """The method the kernel's ``reset`` tries first: the head of ``reset_method`` (the kernel
    lists only the methods the device supports, and stops at the first one that applies);
    :data:`NO_RESET` for a device without a ``reset`` file."""
    if not (host.pci_devices / address / "reset").exists():
        return NO_RESET
    methods = (read_str(host.pci_devices / address / "reset_method") or "").split()
    return methods[0] if methods else "default"


def _reset(host: HostRoot, address: str, writer: Writer) -> str:
    """Reset ``address``; the method used (``flr``, ``bus``..., ``none`` when it has no reset)."""
    device = host.pci_devices / address
    method = _first_method(host, address)
    if method == NO_RESET:
        return method  # nothing the kernel can do; the health checks still run
    try:
        writer.write(device / "reset", "1", f"reset {address} before it changes hands")
        return method
    except HostError:
        methods = (read_str(device / "reset_method") or "").split()
        if "bus" not in methods or not (device / "reset_method").exists():
            raise
        writer.write(device / "reset_method", "bus", f"FLR failed on {address}: try a secondary bus reset")
        try:
            writer.write(device / "reset", "1", f"bus reset of {address}")
        finally:
            writer.write(device / "reset_method", " ".join(methods), f"restore the reset methods of {address}")
        return "bus"


def health_problem(host: HostRoot, address: str, width_before: int | None = None) -> str | None:
    """Why the function is not fit to hand over, or None.

    The link must train as wide as before the reset (``width_before``) and, when it trained at
    full width then, still at full width; functions without a link of their own (VFs, root-complex
    integrated endpoints reading width 0) are judged on their config space alone.
    """
    device = host.pci_devices / address
    try:
        with open(device / "config", "rb") as handle:
            head = handle.read(64)
    except OSError as error:
        return f"config space unreadable ({error.strerror})"
    # All-ones across the whole header: nothing answers. (A VF's vendor/device ids alone read
    # all-ones by the SR-IOV specification, so the first dword is not enough.)
    if len(head) == 64 and head == b"\xff" * 64:
        return "config space reads all-ones: the device fell off the bus"
    if (device / "physfn").exists():
        return None  # a VF has no link of its own: the PF's link is checked with the PF
    current, maximum = read_int(device / "current_link_width"), read_int(device / "max_link_width")
    if current is None or not maximum:
        return None
    if width_before is not None and width_before > 0 and current == 0:
        return "link down after reset"
    if width_before is not None and current < width_before:
        return f"link trained at x{current} after reset, x{width_before} before"
    if width_before is None and 0 < current < maximum:
        return f"link trained at x{current} of x{maximum}"
    return None


def reset_check_method(host: HostRoot, address: str, writer: Writer | None = None) -> tuple[str, str | None]:
    """Reset ``address``: (the method used, why it is unfit to hand over or None) (needs root)."""
    address = pci_address(address)
    writer = writer if writer is not None else SysfsWriter()
    width_before = read_int(host.pci_devices / address / "current_link_width")
    try:
        method = _reset(host, address, writer)
    except HostError as error:
        return _first_method(host, address), f"reset failed: {error.message}"
    if isinstance(writer, RecordingWriter):
        return method, None
    return method, health_problem(host, address, width_before)


def reset_and_check(host: HostRoot, address: str, writer: Writer | None = None) -> str | None:
    """Reset ``address`` and return why it is unfit to hand over, or None (needs root)."""
    return reset_check_method(host, address, writer)[1]


def _history_path(host: HostRoot, address: str) -> Path:
    return host.state_dir / "resets" / pci_address(address)


def record_reset(host: HostRoot, address: str, method: str, problem: str | None,
                 when: float | None = None) -> None:
    """Append one reset outcome to the device's history (the newest :data:`RESET_HISTORY` kept)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if when is None else when))
    reason = " ".join((problem or "").split())
    line = "\t".join((stamp, "OK" if problem is None else "FAILED", " ".join(method.split()) or "default", reason))
    path = _history_path(host, address)
    lines = (read_text(path) or "").splitlines()[-(RESET_HISTORY - 1):]
    write_atomic(path, ("\n".join([*lines, line]) + "\n").encode())


def reset_history(host: HostRoot, address: str) -> list[tuple[str, str, str, str]]:
    """The recorded outcomes of ``address``, oldest first: (time, OK|FAILED, method, reason)."""
    from aifactory_core.probes.host_side import reset_record  # the probes read the same lines

    lines = (read_text(_history_path(host, address)) or "").splitlines()
    return [outcome for outcome in map(reset_record, lines) if outcome is not None]


def parse_helper_reset(output: str, expected_method: str) -> tuple[str, str | None]:
    """The root helper's ``reset`` answer: (method, problem or None). A method that is not a plain
    word is not trusted into the record (``expected_method`` stands in)."""
    first, _, rest = output.partition("\n")
    method = first.strip()
    if not method.isascii() or not method.replace("_", "").isalnum() or len(method) > 16:
        method = expected_method
    return method, rest.strip() or None


def sanitize(host: HostRoot, address: str, writer: Writer | None = None) -> str | None:
    """Reset and check ``address``; record the outcome; quarantine it and return the reason when
    it is not healthy.

    Unprivileged on the live host, the reset runs through the root helper (``reset ADDR``), which
    answers the method it used on its first line and the problem, if any, on the second."""
    address = pci_address(address)
    from aifactory_core.roothelper import needed

    if needed(host) and not isinstance(writer, RecordingWriter):
        from aifactory_core.roothelper import run_privileged

        method = _first_method(host, address)
        try:
            output = run_privileged("reset", address)
        except HostError as error:
            _record_if_possible(host, address, method, f"reset failed: {error.message}")
            raise
        method, problem = parse_helper_reset(output, method)
    else:
        method, problem = reset_check_method(host, address, writer)
    if isinstance(writer, RecordingWriter):
        return problem  # a dry run changes nothing, so records nothing
    if problem is not None:
        try:
            quarantine(host, address, problem)
        except OSError as error:
            raise HostError(f"{address} failed its check ({problem}) and could not be quarantined "
                            f"({error.strerror or error}): it stays on vfio-pci") from None
    _record_if_possible(host, address, method, problem)
    return problem


def _record_if_possible(host: HostRoot, address: str, method: str, problem: str | None) -> None:
    """:func:`record_reset`, logged instead when the history cannot be written (a full disk)."""
    import logging

    try:
        record_reset(host, address, method, problem)
    except OSError as error:
        logging.getLogger(__name__).warning("%s: reset history not written (%s)", address, error.strerror or error)
