"""Small sysfs/procfs readers under a host-root prefix (the probes' only file access).

The host root is the same one :class:`aifactory_core.hostroot.HostRoot` maps (``--host-root``,
``AIFACTORY_HOST_ROOT``); the probes take it as a plain string so that their start-up does not
pay for the dataclass machinery. Every read returns None (never raises) when a file is missing or
unreadable.
"""

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from os import PathLike

_HEX = frozenset("0123456789abcdef")
DEFAULT_STATE_DIR = "/var/lib/one/aifactory"
NVIDIA = 0x10DE  # PCI vendor id


def link_name(path: "str | PathLike[str]") -> str | None:
    """The last component of a symlink's target (``driver`` -> ``nvidia``), or None. A target ending
    in ``/`` or ``..`` is resolved as the kernel would, not reported as ``''`` or ``'..'``. The one
    rule for the probes and the host model (:mod:`aifactory_core.host.sysfs` takes it from here, so
    the probes do not load that package)."""
    try:
        target = os.readlink(path)
    except OSError:  # absent or not a link
        return None
    name = os.path.basename(target.rstrip("/"))
    if name in ("", ".", ".."):
        name = os.path.basename(os.path.realpath(path))
    return name or None


class Root:
    """A host root (``/`` on the live machine) and the suite's state directory under it.

    One ``Root`` stands for one probe run: the PCI function list and each function's ``uevent``,
    ``numa_node`` and ``sriov_totalvfs`` are read at the first question and kept
    (:func:`pci_functions`, :func:`pci_ids`, :func:`pci_number`), so the probe's sections and its
    plugins share one reading; ``text``/``number``/``listdir`` always read anew."""

    __slots__ = ("prefix", "state_dir", "_uevents", "_functions", "_numbers")

    def __init__(self, root: str = "/", state_dir: str | None = None) -> None:
        self.prefix = os.path.abspath(root)
        self.state_dir = state_dir or self.path(DEFAULT_STATE_DIR)
        self._uevents: dict[str, dict[str, str]] = {}
        self._functions: list[str] | None = None
        self._numbers: dict[str, int | None] = {}

    @classmethod
    def from_environment(cls) -> "Root":
        return cls(os.environ.get("AIFACTORY_HOST_ROOT") or "/", os.environ.get("AIFACTORY_STATE_DIR") or None)

    @property
    def is_live(self) -> bool:
        return self.prefix == "/"

    def path(self, absolute: str) -> str:
        return self.prefix.rstrip("/") + absolute if self.prefix != "/" else absolute

    def text(self, absolute: str) -> str | None:
        """A small file's content, stripped (one ``read`` of at most 64 KiB; sysfs files are smaller)."""
        try:
            fd = os.open(self.path(absolute), os.O_RDONLY)
        except OSError:
            return None
        try:
            return os.read(fd, 65536).decode("utf-8", "replace").strip()
        except OSError:
            return None
        finally:
            os.close(fd)

    def uevent(self, address: str) -> dict[str, str]:
        """A PCI function's ``uevent`` (``DRIVER``, ``PCI_ID``, ``PCI_CLASS``...), read once per run."""
        cached = self._uevents.get(address)
        if cached is None:
            text = self.text(f"/sys/bus/pci/devices/{address}/uevent") or ""
            cached = dict(line.partition("=")[::2] for line in text.splitlines())
            self._uevents[address] = cached
        return cached

    def number(self, absolute: str, base: int = 10) -> int | None:
        text = self.text(absolute)
        try:
            return int(text, base) if text is not None else None
        except ValueError:
            return None

    def listdir(self, absolute: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(absolute)))
        except OSError:
            return []

    def link_name(self, absolute: str) -> str | None:
        """The last component of a symlink's target (a driver's or group's name)."""
        return link_name(self.path(absolute))

    def exists(self, absolute: str) -> bool:
        return os.path.exists(self.path(absolute))


def create_new(path: str, mode: int = 0o666) -> int:
    """A descriptor of ``path`` made anew for writing: whatever was there is unlinked first and the
    file is created ``O_EXCL | O_NOFOLLOW``, so a link planted at the name (the state directory is
    ``oneadmin``'s, a probe may run as root) is never written through; OSError when one is planted
    again in between."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def replace_quietly(path: str, text: str, mode: int | None = None) -> None:
    """Replace the probes' own state file ``path`` with ``text`` (a new temporary file, then rename;
    the directory made if missing; ``mode`` set on the temporary file). An unwritable state
    directory is ignored: it costs the probe its memory between runs, never its report."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(create_new(temporary), "w", encoding="utf-8") as handle:
            handle.write(text)
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
        os.replace(temporary, path)
    except OSError:
        pass


def is_pci_address(name: str) -> bool:
    """``dddd:bb:ss.f`` in lower-case hex, function 0-7 (what the kernel names a PCI function)."""
    return (len(name) == 12 and name[4] == ":" and name[7] == ":" and name[10] == "."
            and _HEX.issuperset(name[0:4] + name[5:7] + name[8:10]) and name[11] in "01234567")


def pci_functions(root: Root) -> list[str]:
    """Every PCI function address under ``/sys/bus/pci/devices`` (strictly validated), sorted.

    The directory is listed once per :class:`Root` (one probe run): the probe's own sections and
    every probe plugin get the same answer, each its own copy of the list."""
    if root._functions is None:
        root._functions = [name for name in root.listdir("/sys/bus/pci/devices") if is_pci_address(name)]
    return list(root._functions)


def pci_number(root: Root, address: str, name: str) -> int | None:
    """A decimal attribute file of a PCI function (``numa_node``, ``sriov_totalvfs``), read once per
    :class:`Root` (one probe run) however many sections ask; None when absent or unreadable."""
    key = f"{address}/{name}"
    if key not in root._numbers:
        root._numbers[key] = root.number(f"/sys/bus/pci/devices/{key}")
    return root._numbers[key]


def pci_ids(root: Root, address: str) -> tuple[int, int, int]:
    """(vendor, device, class) of a function from its ``uevent`` (one read, cached for the run),
    else from the ``vendor``/``device``/``class`` files; -1 where unreadable."""
    event = root.uevent(address)
    vendor, _, device = event.get("PCI_ID", "").partition(":")
    try:
        return int(vendor, 16), int(device, 16), int(event["PCI_CLASS"], 16)
    except (KeyError, ValueError):
        base = f"/sys/bus/pci/devices/{address}/"
        return (_or_unknown(root.number(base + "vendor", 16)), _or_unknown(root.number(base + "device", 16)),
                _or_unknown(root.number(base + "class", 16)))


def _or_unknown(value: int | None) -> int:
    return -1 if value is None else value


def pci_driver(root: Root, address: str) -> str:
    """The bound driver's name ('' when none), from ``uevent`` or the ``driver`` link."""
    event = root.uevent(address)
    if "PCI_ID" in event:
        return event.get("DRIVER", "")
    return root.link_name(f"/sys/bus/pci/devices/{address}/driver") or ""


def one_address(address: str) -> str:
    """OpenNebula's PCI ``ADDRESS`` spelling: ``0000:17:00:0`` (``:`` before the function)."""
    return address[:-2] + ":" + address[-1]
