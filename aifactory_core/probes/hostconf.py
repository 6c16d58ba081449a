"""The few ``[host]`` settings the host/system probe needs, read without paying for TOML every run.

The probe offers oned the host's passthrough devices (:mod:`.pci_offer`) and must leave out the
functions ``[host] host_devices`` names and include the VFs of ``[host] vf_pools``. Importing
``tomllib`` costs ~15 ms (it pulls in ``re`` and ``typing``), more than the probe's whole start-up
budget, so the settings are kept in ``<state dir>/probes/host-config.tsv`` with the config file's
identity (device, inode, size, modification time): the file is parsed again only when it changed.
A config that cannot be read or parsed is reported as a problem and counts as empty (the probe
then offers the GPUs alone); the root helper refuses a host device whatever the probe said.
"""

import os

from aifactory_core.probes.sysfs import Root, is_pci_address, replace_quietly

DEFAULT_PATH = "/etc/one/aifactory.conf"
CACHE = "host-config.tsv"
KEYS = ("host_devices", "vf_pools")
MAX_BYTES = 1 << 20


def config_path() -> str:
    return os.environ.get("AIFACTORY_CONFIG") or DEFAULT_PATH


def _identity(path: str) -> str | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"


def _parse(path: str) -> dict[str, tuple[str, ...]]:
    """``[host]``'s address lists from the TOML file (each entry a PCI address, else refused)."""
    import tomllib

    with open(path, "rb") as handle:
        raw = handle.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise ValueError(f"{path} is larger than {MAX_BYTES} bytes")
    table = tomllib.loads(raw.decode("utf-8")).get("host", {})
    result: dict[str, tuple[str, ...]] = {}
    for key in KEYS:
        values = table.get(key, []) if isinstance(table, dict) else []
        if not isinstance(values, list) or not all(isinstance(v, str) and is_pci_address(v) for v in values):
            raise ValueError(f"{path}: [host] {key} must be a list of PCI addresses (dddd:bb:ss.f)")
        result[key] = tuple(values)
    return result


def host_settings(root: Root, problems: list[str]) -> dict[str, tuple[str, ...]]:
    """``{"host_devices": (...), "vf_pools": (...)}`` (empty tuples when there is no config)."""
    empty: dict[str, tuple[str, ...]] = dict.fromkeys(KEYS, ())
    path = config_path()
    identity = _identity(path)
    if identity is None:
        return empty
    cache = os.path.join(root.state_dir, "probes", CACHE)
    try:
        with open(cache, encoding="ascii") as handle:
            lines = handle.read().splitlines()
        if lines and lines[0] == f"{path}\t{identity}":
            cached = dict(empty)
            for line in lines[1:]:
                key, _, values = line.partition("\t")
                if key in cached:
                    cached[key] = tuple(value for value in values.split(",") if is_pci_address(value))
            return cached
    except (OSError, UnicodeDecodeError):
        pass
    try:
        settings = _parse(path)
    except Exception as error:  # unreadable or invalid: reported, and the GPUs are still offered
        problems.append(f"config: {type(error).__name__}: {' '.join(str(error).split())}"[:300])
        return empty
    replace_quietly(cache, f"{path}\t{identity}\n" + "".join(f"{key}\t{','.join(settings[key])}\n" for key in KEYS))
    return settings
