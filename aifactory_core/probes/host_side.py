"""Health of a GPU the host driver cannot see (bound to vfio-pci, in a VM), from the host side only.

Never from numbers the tenant's guest reports: PCIe AER counters (``aer_dev_correctable``,
``aer_dev_nonfatal``, ``aer_dev_fatal`` — the ``TOTAL_*`` lines), link speed/width against the
maximum, config-space readability (all-ones means the device fell off the bus), and the lifecycle
engine's quarantine marker (``<state dir>/quarantine/<address>``, holding the failed reset's
reason), its reset history (``<state dir>/resets/<address>``, the newest outcome last) and holder
(``held_devices``).
"""

import os

from aifactory_core.probes.sysfs import Root, is_pci_address

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping


def aer_total(root: Root, address: str, kind: str) -> int | None:
    """The ``TOTAL_ERR_*`` line of ``aer_dev_<kind>`` (None when the kernel exposes no AER)."""
    text = root.text(f"/sys/bus/pci/devices/{address}/aer_dev_{kind}")
    if text is None:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("TOTAL_ERR") and value.strip().isdigit():
            return int(value)
    return sum(int(parts[1]) for parts in (line.split() for line in text.splitlines())
               if len(parts) == 2 and parts[1].isdigit())


def config_state(root: Root, address: str) -> str:
    """``READABLE``, ``ALL_ONES`` (fell off the bus) or ``UNREADABLE``."""
    try:
        with open(root.path(f"/sys/bus/pci/devices/{address}/config"), "rb") as handle:
            head = handle.read(64)
    except OSError:
        return "UNREADABLE"
    return "ALL_ONES" if len(head) == 64 and head == b"\xff" * 64 else "READABLE"


def link(root: Root, address: str) -> dict[str, object]:
    """Current and maximum link speed/width. Only a narrower width counts against health: GPUs
    lower their link speed when idle (power saving), so a slower speed alone is not a fault."""
    base = f"/sys/bus/pci/devices/{address}/"
    return {
        "LINK_SPEED": root.text(base + "current_link_speed") or "",
        "LINK_SPEED_MAX": root.text(base + "max_link_speed") or "",
        "LINK_WIDTH": root.number(base + "current_link_width") or 0,
        "LINK_WIDTH_MAX": root.number(base + "max_link_width") or 0,
    }


STATE_FILE_MAX_BYTES = 1 << 20


def _state_files(root: Root, subdirectory: str, *, encoding: str = "utf-8",
                 accept: "Callable[[str], bool]" = is_pci_address) -> "Iterator[tuple[str, str]]":
    """``(name, content)`` of each readable file under ``<state dir>/<subdirectory>`` whose name
    ``accept`` takes, in name order; nothing when the directory is missing. Only regular files, never
    through a link, at most :data:`STATE_FILE_MAX_BYTES` each: the directory is ``oneadmin``'s and
    an administrator may run the probe as root (a link to a secret, a FIFO, ``/dev/zero``)."""
    directory = os.path.join(root.state_dir, subdirectory)
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return
    for name in names:
        if not accept(name):
            continue
        try:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_mode & 0o170000 != 0o100000:
                continue
            data = os.read(fd, STATE_FILE_MAX_BYTES)
        except OSError:
            continue
        finally:
            os.close(fd)
        yield name, data.decode(encoding, "replace")


def quarantine_reasons(root: Root) -> dict[str, str]:
    """The lifecycle engine's quarantine markers: address -> reason."""
    return {name: " ".join(text.split())
            for name, text in _state_files(root, "quarantine", accept=lambda name: not name.startswith("."))}


def last_resets(root: Root) -> dict[str, tuple[str, str, str, str]]:
    """The newest recorded reset of each device: address -> (time, OK|FAILED, method, reason).

    Read-only view of :func:`aifactory_core.host.sanitize.record_reset`'s files (one line per reset,
    tab-separated, replaced atomically), without importing the lifecycle engine."""
    result: dict[str, tuple[str, str, str, str]] = {}
    for name, text in _state_files(root, "resets"):
        lines = text.splitlines()
        outcome = reset_record(lines[-1]) if lines else None
        if outcome is not None and outcome[1] in ("OK", "FAILED"):
            result[name] = outcome
    return result


def reset_record(line: str) -> tuple[str, str, str, str] | None:
    """One line of a reset history as (time, result, method, reason), or None when it has fewer
    than three fields (the one reader of the format, shared with ``sanitize.reset_history``)."""
    fields = line.split("\t", 3) + [""]  # an empty reason may have lost its trailing tab
    return (fields[0], fields[1], fields[2], fields[3]) if len(fields) >= 4 else None


def last_reset_text(outcome: tuple[str, str, str, str]) -> str:
    """``OK flr 2026-11-26T21:00:00Z`` or ``FAILED bus 2026-11-26T21:00:00Z: <reason>``."""
    stamp, result, method, reason = outcome
    return f"{result} {method} {stamp}" + (f": {reason}" if result != "OK" and reason else "")


def holders(root: Root) -> dict[str, int]:
    """Which VM holds which device: a read-only view of the lifecycle engine's owner files.

    Same answer as :func:`aifactory_core.lifecycle.ownership.held_devices` (the tests compare the two
    on the same state directory), read without importing the engine, which costs ~25 ms of start-up:
    ``<state dir>/owners/<PCI address>`` holds the VM id. No lock is taken: a probe only reports, and
    an owner file is replaced atomically by the engine.
    """
    held: dict[str, int] = {}
    for name, text in _state_files(root, "owners", encoding="ascii"):
        if text.strip().isdigit():
            held[name] = int(text.strip())
    return held


def attributes(root: Root, address: str, quarantined: "Mapping[str, str]") -> dict[str, object]:
    """The host-side part of one ``AIF_GPU`` vector, with its verdict."""
    values = link(root, address)
    config = config_state(root, address)
    aer = {kind: aer_total(root, address, kind) for kind in ("correctable", "nonfatal", "fatal")}
    reason = quarantined.get(address, "")
    if config != "READABLE":
        health, why = "FAILED", f"config space {config.lower().replace('_', '-')}"
    elif reason:
        health, why = "FAILED", f"quarantined: {reason}"
    elif aer["fatal"]:
        health, why = "FAILED", f"{aer['fatal']} fatal PCIe AER errors"
    elif aer["nonfatal"]:
        health, why = "DEGRADED", f"{aer['nonfatal']} non-fatal PCIe AER errors"
    elif 0 < int(str(values["LINK_WIDTH"])) < int(str(values["LINK_WIDTH_MAX"])):
        health, why = "DEGRADED", f"PCIe link trained at x{values['LINK_WIDTH']} of x{values['LINK_WIDTH_MAX']}"
    else:
        health, why = "OK", ""
    return {
        **values,
        "AER_CORRECTABLE": "" if aer["correctable"] is None else aer["correctable"],
        "AER_NONFATAL": "" if aer["nonfatal"] is None else aer["nonfatal"],
        "AER_FATAL": "" if aer["fatal"] is None else aer["fatal"],
        "CONFIG_SPACE": config,
        "QUARANTINED": "YES" if reason else "NO",
        "LAST_RESET": f"FAILED: {reason}" if reason else "",
        "HEALTH": health,
        "HEALTH_REASON": why,
        "HEALTH_SOURCE": "HOST_SIDE",
    }


SET_ASIDE_MARKER = ".json.damaged-"
"""How the repair renames a damaged journal (:func:`aifactory_core.lifecycle.journal.set_aside`)."""


def set_aside_journals(root: Root) -> list[str]:
    """The damaged journals the repair set aside (``vms/`` and ``vnm/vms/`` of the state directory),
    as paths relative to it: each VM's devices stay held until an administrator removes its file."""
    found = []
    for directory in ("vms", os.path.join("vnm", "vms")):
        try:
            entries = sorted(os.listdir(os.path.join(root.state_dir, directory)))
        except OSError:
            continue
        found += [os.path.join(directory, name) for name in entries if SET_ASIDE_MARKER in name]
    return found
