"""One pass over the host: GPUs (NVML or host side), SR-IOV PFs, IB ports, hugepages, readiness,
and the devices probe plugins report.

:func:`collect` returns a plain snapshot that the host/system, vm/monitor and Prometheus writers
all render, so the three outputs always agree. Each section is isolated: an exception in one is
recorded in ``snapshot["problems"]`` and the others are still reported. Nothing here raises.
"""

import os

from aifactory_core.probes import host_side
from aifactory_core.probes.render import error_text
from aifactory_core.probes.sysfs import (
    NVIDIA,
    Root,
    one_address,
    pci_driver,
    pci_functions,
    pci_ids,
    pci_number,
    replace_quietly,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Snapshot = dict[str, Any]

SEVERITY = {"OK": 0, "DEGRADED": 1, "FAILED": 2}
INVENTORY_CACHE = "gpu-inventory.tsv"
LEGACY_INVENTORY_CACHE = "gpu-inventory.json"
CACHED_KEYS = ("MODEL", "UUID", "SERIAL", "MEMORY_MIB", "VBIOS")
# Every AIF_GPU vector carries all of these (empty when unknown), whatever its driver.
GPU_KEYS = (
    "ADDRESS", "SHORT_ADDRESS", "BUS_ID", "VENDOR", "DEVICE", "CLASS", "NUMA_NODE", "IOMMU_GROUP",
    "DRIVER", "STATE", "VM_ID", "MODEL", "UUID", "SERIAL", "MEMORY_MIB", "VBIOS", "INVENTORY_SOURCE",
    "MIG_MODE", "ECC_MODE", "ECC_CORRECTED_VOLATILE", "ECC_CORRECTED_AGGREGATE", "ECC_UNCORRECTED_VOLATILE",
    "ECC_UNCORRECTED_AGGREGATE", "REMAPPED_ROWS_CORRECTABLE", "REMAPPED_ROWS_UNCORRECTABLE",
    "REMAPPED_ROWS_PENDING", "REMAPPED_ROWS_FAILURE", "RETIRED_PAGES_PENDING", "PCIE_REPLAY_COUNTER",
    "PCIE_LINK_GEN", "PCIE_LINK_WIDTH", "PCIE_LINK_GEN_MAX", "PCIE_LINK_WIDTH_MAX", "LINK_SPEED",
    "LINK_SPEED_MAX", "LINK_WIDTH", "LINK_WIDTH_MAX", "AER_CORRECTABLE", "AER_NONFATAL", "AER_FATAL",
    "CONFIG_SPACE", "QUARANTINED", "LAST_RESET", "THROTTLE_REASONS", "XID_SINCE_LAST", "FABRIC_STATE",
    "FABRIC_INFO_STATE", "FABRIC_INFO_STATUS", "FABRIC_CLIQUE_ID", "FABRIC_CLUSTER_UUID", "NVML_STATUS",
    "NVML_PROBLEM", "HEALTH", "HEALTH_REASON", "HEALTH_SOURCE",
)
# What the host side adds to a GPU NVML reads (NVML gives the rest, and the verdict).
HOST_SIDE_WITH_NVML = ("LINK_SPEED", "LINK_SPEED_MAX", "LINK_WIDTH", "LINK_WIDTH_MAX", "AER_CORRECTABLE",
                       "AER_NONFATAL", "AER_FATAL", "CONFIG_SPACE")


def _problem(snapshot: "Snapshot", section: str, error: BaseException) -> None:
    snapshot["problems"].append(error_text(error, prefix=f"{section}: "))


def quarantine(root: Root, snapshot: "Snapshot") -> dict[str, str]:
    """The lifecycle engine's quarantine markers (:func:`host_side.quarantine_reasons`), listed once
    per snapshot: the GPU rows, the plugin devices and the PCI list share them."""
    cached = snapshot.get("_quarantined")
    if cached is None:
        cached = snapshot["_quarantined"] = host_side.quarantine_reasons(root)
    return cached


def gpu_functions(root: Root, functions: list[str]) -> list[str]:
    """NVIDIA display-class functions (3D controller, VGA)."""
    found = []
    for address in functions:
        vendor, _device, klass = pci_ids(root, address)
        if vendor == NVIDIA and klass >> 16 == 0x03:
            found.append(address)
    return found


def _nvml_source(root: Root, gpus: list[str], drivers: dict[str, str], replay: str | None,
                 budget_s: float, mode: str) -> "tuple[Any, str]":
    if mode == "off":
        return None, "unused: host-side readings only"
    if not replay and not any(drivers.get(address) == "nvidia" for address in gpus):
        return None, "unused: no GPU on the nvidia driver"
    from aifactory_core.probes import nvml

    if replay:
        return nvml.ReplayNvml(replay, budget_s), "replay"
    library = nvml.library_path(root.prefix)
    if library is None:
        return None, f"unavailable: {nvml.LIBRARY} not found"
    if not root.is_live:
        return None, "unavailable: NVML reads only the live host"
    binding = "pynvml" if os.environ.get("AIFACTORY_NVML_BINDING") == "pynvml" else "ctypes"
    return nvml.LiveNvml(budget_s, metrics=mode == "metrics", library=library, binding=binding), "live"


def _cache_path(root: Root, name: str = INVENTORY_CACHE) -> str:
    return os.path.join(root.state_dir, "probes", name)


def _read_cache(root: Root) -> dict[str, dict[str, object]]:
    """The remembered inventory: one line per GPU, ``ADDRESS`` then :data:`CACHED_KEYS`, tab-separated
    (plain text: ``json`` pulls in ``re``, the largest part of the probe's start-up)."""
    try:
        with open(_cache_path(root), encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return _read_legacy_cache(root)
    except OSError:
        return {}
    cache: dict[str, dict[str, object]] = {}
    for line in lines:
        fields = line.split("\t")
        if len(fields) == len(CACHED_KEYS) + 1:
            entry: dict[str, object] = dict(zip(CACHED_KEYS, fields[1:], strict=True))
            memory = str(entry["MEMORY_MIB"])
            entry["MEMORY_MIB"] = int(memory) if memory.isdigit() else memory
            cache[fields[0]] = entry
    return cache


def _read_legacy_cache(root: Root) -> dict[str, dict[str, object]]:
    """The JSON cache earlier versions wrote (read once, until the next write replaces it). ``json``
    is imported only when there is one: a host whose GPUs NVML has not seen yet (none, or all on
    vfio-pci since boot) has no cache of either kind, and every run comes here."""
    try:
        handle = open(_cache_path(root, LEGACY_INVENTORY_CACHE), encoding="utf-8")
    except OSError:
        return {}
    import json

    try:
        with handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    cache = {str(address): entry for address, entry in data.items() if isinstance(entry, dict)}
    _write_cache(root, cache)  # migrated: later runs read the plain-text file
    return cache


def _cache_text(value: object) -> str:
    return " ".join(str(value).split())  # no tab or newline can split a record


def _cache_entry(entry: dict[str, object] | None) -> list[str] | None:
    """An entry as the cache file holds it (so a value read back compares equal to a fresh one)."""
    return None if entry is None else [_cache_text(entry.get(key, "")) for key in CACHED_KEYS]


def _write_cache(root: Root, cache: dict[str, dict[str, object]]) -> None:
    lines = ["\t".join([address, *(_cache_text(entry.get(key, "")) for key in CACHED_KEYS)])
             for address, entry in sorted(cache.items())]
    replace_quietly(_cache_path(root), "".join(f"{line}\n" for line in lines))


def _read_nvml(root: Root, snapshot: "Snapshot", gpus: list[str], drivers: dict[str, str], replay: str | None,
               budget_s: float, mode: str) -> "dict[str, dict[str, Any]]":
    """NVML's readings by PCI address; sets ``snapshot["nvml"]`` and records a GPU NVML reports
    without an address as a problem."""
    snapshot["nvml"] = {"STATUS": "unused: no NVIDIA GPU", "DRIVER_VERSION": ""}
    readings: dict[str, dict[str, Any]] = {}
    if not gpus and not replay:
        return readings
    try:
        source, status = _nvml_source(root, gpus, drivers, replay, budget_s, mode)
    except Exception as error:  # an unreadable recording
        source, status = None, error_text(error, prefix="error: ", limit=200)
    snapshot["nvml"]["STATUS"] = status
    if source is None:
        return readings
    try:
        version, _error = source.driver_version()
        snapshot["nvml"]["DRIVER_VERSION"] = version or ""
        for reading in source.read():
            if reading.get("address"):
                readings[reading["address"]] = reading
            else:
                snapshot["problems"].append(
                    f"nvml: GPU index {reading.get('label')}: {reading.get('problem') or 'no PCI address'}")
        snapshot["nvml"]["STATUS"] = "ok" if status == "live" else status
    except Exception as error:  # NVML init failure, unreadable recording
        snapshot["nvml"]["STATUS"] = error_text(error, prefix="error: ", limit=200)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
    return readings


def _collect_gpus(root: Root, snapshot: "Snapshot", functions: list[str], replay: str | None,
                  budget_s: float, mode: str) -> None:
    gpus = gpu_functions(root, functions)
    drivers = {address: pci_driver(root, address) for address in gpus}
    readings = _read_nvml(root, snapshot, gpus, drivers, replay, budget_s, mode)
    xids: dict[str, list[int]] = {}
    if gpus and (root.is_live or root.exists("/dev/kmsg")):
        from aifactory_core.probes.xid import read_new_xids

        xids, snapshot["xid_source"] = read_new_xids(root)
    quarantined = quarantine(root, snapshot)
    resets = host_side.last_resets(root)
    held = snapshot["held"]
    cache: dict[str, dict[str, object]] | None = None  # read at most once, only when needed
    cache_changed = False
    rows: list[dict[str, object]] = []
    for address in sorted(set(gpus) | set(readings)):
        vendor, device, klass = pci_ids(root, address)
        numa = pci_number(root, address, "numa_node")
        row: dict[str, object] = dict.fromkeys(GPU_KEYS, "")
        row.update({
            "ADDRESS": one_address(address), "SHORT_ADDRESS": address[5:], "BUS_ID": address,
            "VENDOR": f"{vendor:04x}" if vendor >= 0 else "", "DEVICE": f"{device:04x}" if device >= 0 else "",
            "CLASS": f"{klass >> 8:04x}" if klass >= 0 else "",
            "NUMA_NODE": "-" if numa is None or numa < 0 else numa,
            "IOMMU_GROUP": root.link_name(f"/sys/bus/pci/devices/{address}/iommu_group") or "",
            "DRIVER": drivers.get(address, ""),
            "STATE": "ASSIGNED" if address in held or drivers.get(address) == "vfio-pci" else "HOST",
            "VM_ID": held.get(address, ""),
        })
        side = host_side.attributes(root, address, quarantined)  # link, AER, config space, host-side verdict
        bus_xids = xids.get(address[:-2], [])
        reading = readings.get(address)
        if reading is not None:
            from aifactory_core.probes import gpu as gpu_health  # NVML's readings: a GPU the host driver owns

            row.update({key: side[key] for key in HOST_SIDE_WITH_NVML})
            row.update(gpu_health.nvml_attributes(reading, bus_xids))
            row["INVENTORY_SOURCE"] = "NVML"
            if reading.get("status") == "ok" and row["UUID"]:
                fresh = {key: row[key] for key in CACHED_KEYS}
                cache = _read_cache(root) if cache is None else cache
                if _cache_entry(cache.get(address)) != _cache_entry(fresh):
                    cache[address] = fresh
                    cache_changed = True
            row["_metrics"] = gpu_health.metrics(reading)
        else:
            row.update(side)
            cache = _read_cache(root) if cache is None else cache
            remembered = cache.get(address)
            if remembered:
                row.update({key: remembered.get(key, "") for key in CACHED_KEYS})
                row["INVENTORY_SOURCE"] = "CACHED"
            fatal = _fatal_xids(bus_xids)
            row["XID_SINCE_LAST"] = ",".join(str(xid) for xid in bus_xids)
            if fatal and row["HEALTH"] != "FAILED":
                row["HEALTH"], row["HEALTH_REASON"] = "FAILED", f"XID {fatal[0]} since the last run"
            if drivers.get(address) == "nvidia":
                row["NVML_STATUS"] = "not seen"
                row["NVML_PROBLEM"] = snapshot["nvml"]["STATUS"]
            row["_metrics"] = {}
        if address in quarantined:
            row["QUARANTINED"], row["LAST_RESET"] = "YES", f"FAILED: {quarantined[address]}"
            if row["HEALTH"] != "FAILED":
                row["HEALTH"], row["HEALTH_REASON"] = "FAILED", f"quarantined: {quarantined[address]}"
        elif not row["QUARANTINED"]:
            row["QUARANTINED"] = "NO"
        outcome = resets.get(address)
        if outcome is not None:  # the recorded outcome says more than the quarantine marker
            row["LAST_RESET"] = host_side.last_reset_text(outcome)
            row["_reset"] = outcome
        rows.append(row)
    if cache_changed and cache is not None:
        _write_cache(root, cache)
    snapshot["gpus"] = rows


def _fatal_xids(xids: list[int]) -> list[int]:
    """The XIDs among ``xids`` after which a GPU must not take new work (none read: nothing imported)."""
    if not xids:
        return []
    from aifactory_core.probes.gpu import FATAL_XIDS

    return [xid for xid in xids if xid in FATAL_XIDS]


def _collect_sriov(root: Root, snapshot: "Snapshot", functions: list[str]) -> None:
    rows = []
    held = snapshot["held"]
    for address in functions:
        base = f"/sys/bus/pci/devices/{address}/"
        total = pci_number(root, address, "sriov_totalvfs")
        if not total:
            continue
        vfs = []
        for name in root.listdir(base.rstrip("/")):
            if name.startswith("virtfn") and name[6:].isdigit():
                target = root.link_name(base + name)
                if target:
                    vfs.append(target)
        used = [vf for vf in vfs if vf in held or pci_driver(root, vf) == "vfio-pci"]
        interfaces = root.listdir(base + "net")
        modes = _uplink_modes(root, interfaces)
        mode = next((word for word in ("switchdev", "legacy", "unknown") if word in modes), "")
        vendor, device, _klass = pci_ids(root, address)
        rows.append({
            "ADDRESS": one_address(address), "SHORT_ADDRESS": address[5:], "BUS_ID": address,
            "VENDOR": f"{vendor:04x}", "DEVICE": f"{device:04x}", "IFNAME": ",".join(interfaces),
            "TOTAL_VFS": total, "NUM_VFS": root.number(base + "sriov_numvfs") or 0, "USED_VFS": len(used),
            "ESWITCH_MODE": mode.upper(),
        })
    snapshot["sriov"] = rows


def _uplink_modes(root: Root, interfaces: list[str]) -> list[str]:
    """Each uplink netdev's eswitch mode (:mod:`aifactory_core.host.eswitch`, loaded only for a PF
    with VFs and a netdev)."""
    if not interfaces:
        return []
    from aifactory_core.host.eswitch import uplink_mode

    return [uplink_mode(root.text, root.listdir, interface) for interface in interfaces]


def _collect_plugin_devices(root: Root, snapshot: "Snapshot") -> None:
    """The devices probe plugins report (:mod:`aifactory_core.probes.plugins`), with what sysfs and
    the lifecycle engine say of them: one ``AIF_DEVICE`` row each."""
    from aifactory_core.probes import plugins

    found, snapshot["probe_plugins"] = plugins.run(root, snapshot["problems"])
    held = snapshot["held"]
    quarantined = quarantine(root, snapshot) if found else {}
    rows: list[dict[str, object]] = []
    for name, device in found:
        address = device.address
        vendor, ident, klass = pci_ids(root, address)
        numa = pci_number(root, address, "numa_node")
        driver = pci_driver(root, address)
        row: dict[str, object] = {
            "PLUGIN": name, "KIND": device.kind, "ADDRESS": one_address(address), "SHORT_ADDRESS": address[5:],
            "BUS_ID": address, "VENDOR": f"{vendor:04x}" if vendor >= 0 else "",
            "DEVICE": f"{ident:04x}" if ident >= 0 else "", "CLASS": f"{klass >> 8:04x}" if klass >= 0 else "",
            "NUMA_NODE": "-" if numa is None or numa < 0 else numa,
            "IOMMU_GROUP": root.link_name(f"/sys/bus/pci/devices/{address}/iommu_group") or "",
            "DRIVER": driver, "STATE": "ASSIGNED" if address in held or driver == "vfio-pci" else "HOST",
            "VM_ID": held.get(address, ""), "MODEL": device.model,
            "HEALTH": device.health, "HEALTH_REASON": device.health_reason,
        }
        if address in quarantined and device.health != "FAILED":
            row["HEALTH"], row["HEALTH_REASON"] = "FAILED", f"quarantined: {quarantined[address]}"
        row.update(device.attributes)
        row["_metrics"] = device.metrics
        rows.append(row)
    snapshot["devices"] = rows


def _collect_ib(root: Root, snapshot: "Snapshot") -> None:
    rows = []
    for device in root.listdir("/sys/class/infiniband"):
        base = f"/sys/class/infiniband/{device}"
        address = root.link_name(f"{base}/device") or ""
        for port in root.listdir(f"{base}/ports"):
            pbase = f"{base}/ports/{port}"
            state = (root.text(f"{pbase}/state") or "").partition(":")
            physical = (root.text(f"{pbase}/phys_state") or "").partition(":")
            rows.append({
                "DEVICE_NAME": device, "PORT": port, "BUS_ID": address,
                "STATE": state[2].strip() or state[0], "PHYS_STATE": physical[2].strip() or physical[0],
                "RATE": root.text(f"{pbase}/rate") or "", "LID": root.text(f"{pbase}/lid") or "",
                "LINK_LAYER": root.text(f"{pbase}/link_layer") or "",
                "NODE_GUID": root.text(f"{base}/node_guid") or "",
                "PORT_GID": root.text(f"{pbase}/gids/0") or "",
            })
    snapshot["ib"] = rows


def collect(root: Root, replay: str | None = None, budget_s: float = 5.0, nvml_mode: str = "health",
            plugins: bool = True, host_wide: bool = True) -> "Snapshot":
    """Read everything the probes report; never raises.

    ``plugins``: also run the probe plugins (``snapshot["devices"]``, ``snapshot["probe_plugins"]``).

    ``host_wide``: also the sections about the host as a whole: SR-IOV PFs, InfiniBand ports,
    hugepages and the readiness checks (otherwise ``snapshot["sriov"]``, ``["ib"]``,
    ``["hugepages"]`` and ``["checks"]`` stay empty: the vm/monitor probe reports only what each VM
    holds, and skips their reads and imports).

    ``nvml_mode``: ``health`` (inventory and health calls), ``metrics`` (also utilisation, power,
    clocks, energy), ``off`` (host-side readings only: the vm/monitor probe, every 30 s, needs no
    NVML because a GPU a VM holds is invisible to it anyway)."""
    snapshot: Snapshot = {"problems": [], "gpus": [], "sriov": [], "ib": [], "hugepages": [], "checks": [],
                          "nvml": {"STATUS": "", "DRIVER_VERSION": ""}, "held": {},
                          "xid_source": "unused", "devices": [], "probe_plugins": []}
    functions = pci_functions(root)
    try:
        snapshot["held"] = host_side.holders(root)
        snapshot["problems"] += [f"journal {name} was damaged and set aside by the repair: its VM's devices stay "
                                 "held until it is removed" for name in host_side.set_aside_journals(root)]
    except Exception as error:
        _problem(snapshot, "holders", error)
    sections: list[tuple[str, Callable[[], None]]] = [
        ("gpu", lambda: _collect_gpus(root, snapshot, functions, replay, budget_s, nvml_mode))]
    if host_wide:
        sections += [("sriov", lambda: _collect_sriov(root, snapshot, functions)),
                     ("infiniband", lambda: _collect_ib(root, snapshot))]
    if plugins:
        sections.append(("plugins", lambda: _collect_plugin_devices(root, snapshot)))
    if host_wide:
        from aifactory_core.probes import readiness

        sections += [("hugepages", lambda: snapshot.__setitem__("hugepages", readiness.hugepages(root))),
                     ("readiness", lambda: snapshot.__setitem__("checks", readiness.checks(root, functions)))]
    for name, section in sections:
        try:
            section()
        except Exception as error:  # one section's failure never hides the others
            _problem(snapshot, name, error)
    return snapshot


def worst(verdicts: list[str]) -> str:
    return max(verdicts, key=lambda verdict: SEVERITY.get(verdict, 1)) if verdicts else "OK"
