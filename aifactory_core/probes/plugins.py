"""Probe plugins: finding the modules of the ``aifactory.probes`` entry-point group cheaply, and
running them (:func:`aifactory_core.hookspecs.aifactory_probe_devices`).

``importlib.metadata`` costs more than the probe's whole start-up budget (it imports ``email``,
``zipfile``, ``csv``... and reads every distribution's metadata), so the probe finds its plugins
itself, in two steps:

1. **Cached answer.** ``<state dir>/probes/plugins-<euid>.tsv`` holds the key it was computed under
   — each ``sys.path`` directory with its modification time — and the ``NAME<TAB>MODULE`` lines
   found. Installing, upgrading or removing a distribution adds or removes a ``*.dist-info`` entry
   in its directory, which changes that directory's modification time, so an unchanged key means
   an unchanged answer: one ``stat`` per path entry. The file is used only when it is a regular
   file owned by the running user and writable by no one else (root never runs modules named by
   a file another user could write).
2. **Scan.** Otherwise every ``*.dist-info``/``*.egg-info`` directory on ``sys.path`` is listed and
   its ``entry_points.txt``, where there is one, read for the ``[aifactory.probes]`` section (the
   first distribution of a name on the path wins, as ``importlib.metadata`` has it), and the cache
   is replaced (temporary file, rename).

``benchmarks/bench_probes.py --discovery`` measures the three ways (metadata, scan, cache).
Module paths are checked against a strict dotted-name pattern before anything is imported. A
plugin that fails to import, declares a newer API or raises is reported as a problem of the probe
(``AIF_PROBE/PROBLEMS``); the other plugins and the probe's own sections are still reported.
"""

import os
import sys

from aifactory_core.probes.sysfs import replace_quietly

TYPE_CHECKING = False
if TYPE_CHECKING:
    from aifactory_core.probes.api import ProbeDevice
    from aifactory_core.probes.sysfs import Root

GROUP = "aifactory.probes"
ENTRY_POINT_SUFFIXES = (".dist-info", ".egg-info")
_NAME = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _identifier(text: str) -> bool:
    return bool(text) and not text[0].isdigit() and text.isascii() and _NAME.issuperset(text)


def valid_module(path: str) -> bool:
    """A dotted module path (``vendor_pkg.probe``), each part a Python identifier, at most 200 chars."""
    return 0 < len(path) <= 200 and all(_identifier(part) for part in path.split("."))


def valid_name(name: str) -> bool:
    """An entry-point name the probe accepts: ``[A-Za-z0-9_][A-Za-z0-9_.-]*``, at most 64 chars."""
    return 0 < len(name) <= 64 and name.isascii() and all(char in _NAME or char in ".-" for char in name)


def _path_dirs() -> list[str]:
    """The ``sys.path`` directories, without the running script's own (each probe executable has
    its own directory there, which holds no distribution: with it the two probes' keys would differ
    and each would replace the other's cache every run)."""
    script = os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] else None
    return [entry for entry in dict.fromkeys(sys.path)
            if entry and entry != script and os.path.isdir(entry)]


def cache_key(directories: list[str]) -> list[str]:
    """``K<TAB>directory<TAB>mtime_ns`` per ``sys.path`` directory (the cache's validity)."""
    lines = []
    for directory in directories:
        try:
            stamp = os.stat(directory).st_mtime_ns
        except OSError:
            stamp = -1
        lines.append(f"K\t{directory}\t{stamp}")
    return lines


def entry_points_section(text: str, group: str = GROUP) -> list[tuple[str, str]]:
    """``(name, module)`` of ``group`` in an ``entry_points.txt`` (INI: ``[group]``, ``name = value``,
    ``#``/``;`` comments); an entry with an ``:attribute`` or extras keeps only the module."""
    found: list[tuple[str, str]] = []
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
            continue
        if current != group:
            continue
        name, equals, value = line.partition("=")
        module = value.split("[")[0].split(":")[0].strip()
        if equals and valid_name(name.strip()) and valid_module(module):
            found.append((name.strip(), module))
    return found


def _distribution(entry: str) -> str:
    """A metadata directory's distribution name, normalised (``Foo_Bar-1.0.dist-info`` -> ``foo-bar``)."""
    stem = entry.rsplit(".", 1)[0].split("-")[0]
    return stem.lower().replace("_", "-").replace(".", "-")


def scan(directories: list[str]) -> list[tuple[str, str]]:
    """The ``aifactory.probes`` entry points of every distribution on the path, sorted by name."""
    seen: set[str] = set()
    found: dict[str, str] = {}
    for directory in directories:
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            continue
        for entry in entries:
            if not entry.endswith(ENTRY_POINT_SUFFIXES):
                continue
            distribution = _distribution(entry)
            if distribution in seen:
                continue
            seen.add(distribution)
            try:
                with open(os.path.join(directory, entry, "entry_points.txt"), encoding="utf-8") as handle:
                    text = handle.read(65536)
            except (OSError, ValueError):
                continue
            for name, module in entry_points_section(text):
                found.setdefault(name, module)
    return sorted(found.items())


def _cache_path(root: "Root") -> str:
    return os.path.join(root.state_dir, "probes", f"plugins-{os.geteuid()}.tsv")


def _read_trusted(path: str) -> str | None:
    """The file's text when it is a regular file of the running user that no one else may write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        status = os.fstat(fd)
        if (status.st_uid != os.geteuid() or status.st_mode & 0o022 or (status.st_mode & 0o170000) != 0o100000):
            return None
        return os.read(fd, 1 << 16).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def discover(root: "Root") -> list[tuple[str, str]]:
    """``(name, module)`` of every installed probe plugin, from the cache when it is still valid."""
    directories = _path_dirs()
    key = cache_key(directories)
    path = _cache_path(root)
    text = _read_trusted(path)
    if text is not None:
        lines = text.splitlines()
        if lines[:len(key)] == key and all(line.startswith("P\t") for line in lines[len(key):]):
            cached = [tuple(line.split("\t")[1:3]) for line in lines[len(key):]]
            if all(len(entry) == 2 and valid_name(entry[0]) and valid_module(entry[1]) for entry in cached):
                return [(entry[0], entry[1]) for entry in cached]
    found = scan(directories)
    replace_quietly(path, "".join(f"{line}\n" for line in key + [f"P\t{name}\t{module}" for name, module in found]),
                    mode=0o644)
    return found


def _load(module: str) -> object:
    __import__(module)
    return sys.modules[module]


def run(root: "Root", problems: list[str]) -> "tuple[list[tuple[str, ProbeDevice]], list[str]]":
    """Every probe plugin's devices as ``(plugin name, device)``, and the names of the plugins that
    answered; what went wrong is appended to ``problems``, one line per plugin."""
    devices: list[tuple[str, ProbeDevice]] = []
    answered: list[str] = []
    found = discover(root)
    if not found:
        return devices, answered
    from aifactory_core.probes import api
    from aifactory_core.probes.render import error_text

    claimed: set[str] = set()
    for name, module_path in found:
        try:
            module = _load(module_path)
            declared = getattr(module, "AIFACTORY_PROBE_API", None)
            if not isinstance(declared, int) or not 1 <= declared <= api.API_VERSION:
                problems.append(f"plugin {name}: AIFACTORY_PROBE_API {declared!r} is not one this core "
                                f"provides (1..{api.API_VERSION})")
                continue
            function = getattr(module, "aifactory_probe_devices", None)
            if not callable(function):
                problems.append(f"plugin {name}: {module_path} has no aifactory_probe_devices(root)")
                continue
            result = list(function(root) or ())
        except Exception as error:  # a plugin's failure never hides the probe's own report
            problems.append(error_text(error, prefix=f"plugin {name}: "))
            continue
        answered.append(name)
        for device in result:
            if not isinstance(device, api.ProbeDevice):
                problems.append(f"plugin {name}: {type(device).__name__} is not a ProbeDevice")
            elif device.address in claimed:
                problems.append(f"plugin {name}: {device.address} is already reported by another plugin")
            else:
                claimed.add(device.address)
                devices.append((name, device))
    return devices, answered
