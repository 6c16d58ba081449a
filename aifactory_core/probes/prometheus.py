"""Prometheus text exposition format from the same snapshot, for node_exporter's textfile collector.

Names follow Prometheus' conventions: an ``aifactory_`` prefix, base units as the suffix (bytes,
watts, hertz, celsius, seconds, joules; a 0-1 ``_ratio`` for utilisation), ``_total`` on counters.
A state is never a label of the other series (a label that changes makes a new series): each GPU's
verdict is ``aifactory_gpu_health`` (0 OK, 1 DEGRADED, 2 FAILED) and, one series per verdict,
``aifactory_gpu_health_state{state=...}`` 1 for the current one and 0 for the others;
``aifactory_gpu_assigned`` is 1 while a VM holds the GPU (or it is on vfio-pci).

Every GPU sample carries ``bus_id``, ``uuid`` and ``model``, and while a VM holds the GPU (the
lifecycle engine's ownership records) also ``vm_id`` and ``tenant`` (the VM's OpenNebula group:
:mod:`aifactory_core.probes.owners`). Devices of probe plugins have ``aifactory_device_*`` families
labelled ``bus_id``, ``plugin``, ``kind``, ``model`` (and ``vm_id``/``tenant``), and their own
metrics as ``aifactory_<name>``. The file is written atomically (temporary file in the same
directory, then ``rename``) so the collector never reads half a file.
"""

from __future__ import annotations

from aifactory_core.probes.collect import SEVERITY  # the verdicts' order is the gauge's value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any

MIB = 1024 * 1024
VERDICTS = ("OK", "DEGRADED", "FAILED")
# (snapshot key in a GPU's NVML metrics, metric name, help, conversion to the base unit)
GAUGES: tuple[tuple[str, str, str, Callable[[int], float]], ...] = (
    ("GPU_UTILIZATION", "gpu_utilization_ratio", "GPU utilisation (0-1)", lambda value: value / 100),
    ("GPU_MEMORY_UTILIZATION", "gpu_memory_utilization_ratio", "memory controller utilisation (0-1)",
     lambda value: value / 100),
    ("GPU_MEMORY_USED_BYTES", "gpu_memory_used_bytes", "frame buffer used (bytes)", int),
    ("GPU_MEMORY_TOTAL_BYTES", "gpu_memory_total_bytes", "frame buffer total (bytes)", int),
    ("GPU_TEMPERATURE_C", "gpu_temperature_celsius", "GPU temperature (degrees Celsius)", int),
    ("GPU_POWER_MW", "gpu_power_watts", "power draw (watts)", lambda value: value / 1000),
    ("GPU_SM_CLOCK_MHZ", "gpu_sm_clock_hertz", "SM clock (hertz)", lambda value: value * 1_000_000),
    ("GPU_MEM_CLOCK_MHZ", "gpu_memory_clock_hertz", "memory clock (hertz)", lambda value: value * 1_000_000),
)
COUNTERS: tuple[tuple[str, str, str, Callable[[int], float]], ...] = (
    ("ECC_UNCORRECTED_VOLATILE", "gpu_ecc_uncorrected_volatile_total", "uncorrectable ECC errors since boot", int),
    ("ECC_CORRECTED_VOLATILE", "gpu_ecc_corrected_volatile_total", "correctable ECC errors since boot", int),
    ("PCIE_REPLAY_COUNTER", "gpu_pcie_replay_total", "PCIe replays", int),
    ("AER_CORRECTABLE", "gpu_pcie_aer_correctable_total", "PCIe AER correctable errors (host side)", int),
    ("AER_NONFATAL", "gpu_pcie_aer_nonfatal_total", "PCIe AER non-fatal errors (host side)", int),
    ("AER_FATAL", "gpu_pcie_aer_fatal_total", "PCIe AER fatal errors (host side)", int),
)
ENERGY = ("GPU_ENERGY_MJ", "gpu_energy_joules_total", "energy since the driver loaded (joules)")


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def _is_count(value: object) -> bool:
    return isinstance(value, int) or (isinstance(value, str) and value.isdigit())


def _holder(row: Mapping[str, Any], tenants: Mapping[int, str]) -> list[tuple[str, object]]:
    vm = row.get("VM_ID", "")
    if vm == "" or vm is None:
        return []
    return [("vm_id", vm), ("tenant", tenants.get(int(vm), ""))]


def _render(pairs: Sequence[tuple[str, object]]) -> str:
    return ",".join(f'{name}="{_label(value)}"' for name, value in pairs)


def exposition(snapshot: dict[str, Any], tenants: Mapping[int, str] | None = None) -> str:
    """The text format of ``snapshot``; ``tenants`` maps a holding VM to its group (the ``tenant``
    label; empty when not given)."""
    tenants = tenants or {}
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: Sequence[tuple[str, float | None]]) -> None:
        if not samples:
            return
        lines.append(f"# HELP aifactory_{name} {help_text}")
        lines.append(f"# TYPE aifactory_{name} {kind}")
        lines.extend(f"aifactory_{name}{{{labels}}} {_number(value)}" if labels else
                     f"aifactory_{name} {_number(value)}" for labels, value in samples if value is not None)

    gpus = snapshot["gpus"]
    gpu_labels = {str(row["BUS_ID"]): [("bus_id", row.get("BUS_ID", "")), ("uuid", row.get("UUID", "")),
                                        ("model", row.get("MODEL", "")), *_holder(row, tenants)] for row in gpus}

    def labels(row: Mapping[str, Any], *extra: tuple[str, object]) -> str:
        return _render([*gpu_labels[str(row["BUS_ID"])], *extra])

    family("gpu_health", "gauge", "GPU verdict: 0 OK, 1 DEGRADED, 2 FAILED",
           [(labels(row), SEVERITY.get(str(row["HEALTH"]), 1)) for row in gpus])
    family("gpu_health_state", "gauge", "1 for the GPU's current verdict, 0 for the others",
           [(labels(row, ("state", verdict)), int(row["HEALTH"] == verdict)) for row in gpus for verdict in VERDICTS])
    family("gpu_assigned", "gauge", "1 while a VM holds the GPU or it is on vfio-pci, else 0",
           [(labels(row), int(row["STATE"] == "ASSIGNED")) for row in gpus])
    for key, name, help_text, convert in GAUGES:
        family(name, "gauge", help_text,
               [(labels(row), convert(row["_metrics"][key])) for row in gpus if key in row["_metrics"]])
    family(ENERGY[1], "counter", ENERGY[2],
           [(labels(row), row["_metrics"][ENERGY[0]] / 1000) for row in gpus if ENERGY[0] in row["_metrics"]])
    for key, name, help_text, convert in COUNTERS:
        family(name, "counter", help_text,
               [(labels(row), convert(int(row.get(key, "")))) for row in gpus if _is_count(row.get(key, ""))])
    resets = [(row, row["_reset"]) for row in gpus if row.get("_reset")]
    family("gpu_last_reset_timestamp_seconds", "gauge", "when the device was last reset and checked (Unix time)",
           [(labels(row, ("method", outcome[2])), _epoch(outcome[0])) for row, outcome in resets
            if _epoch(outcome[0]) is not None])
    family("gpu_last_reset_ok", "gauge", "outcome of the last reset and health check: 1 OK, 0 FAILED",
           [(labels(row, ("method", outcome[2])), 1 if outcome[1] == "OK" else 0) for row, outcome in resets])
    _devices(snapshot.get("devices", []), tenants, family)
    family("hugepages_free", "gauge", "free huge pages per NUMA node and page size",
           [(_render([("node", row["NODE_ID"]), ("page_size_bytes", int(row["SIZE"]) * 1024)]), int(row["FREE"]))
            for row in snapshot["hugepages"] if _is_count(row["SIZE"]) and _is_count(row["FREE"])])
    family("readiness_check", "gauge", "readiness check: 0 PASS, 1 WARN, 2 FAIL",
           [(_render([("check", row["NAME"])]), {"PASS": 0, "WARN": 1}.get(str(row["STATUS"]), 2))
            for row in snapshot["checks"]])
    family("probe_problems", "gauge", "sections of the probe that failed", [("", len(snapshot["problems"]))])
    return "\n".join(lines) + "\n"


def _devices(rows: Sequence[dict[str, Any]], tenants: Mapping[int, str],
             family: Callable[[str, str, str, Sequence[tuple[str, float | None]]], None]) -> None:
    """The probe plugins' devices: verdict, state, assignment and each plugin metric."""
    def device_labels(row: Mapping[str, Any]) -> list[tuple[str, object]]:
        return [("bus_id", row["BUS_ID"]), ("plugin", row["PLUGIN"]), ("kind", row["KIND"]),
                ("model", row["MODEL"]), *_holder(row, tenants)]

    family("device_health", "gauge", "plugin device verdict: 0 OK, 1 DEGRADED, 2 FAILED",
           [(_render(device_labels(row)), SEVERITY.get(str(row["HEALTH"]), 1)) for row in rows])
    family("device_health_state", "gauge", "1 for the device's current verdict, 0 for the others",
           [(_render([*device_labels(row), ("state", verdict)]), int(row["HEALTH"] == verdict))
            for row in rows for verdict in VERDICTS])
    family("device_assigned", "gauge", "1 while a VM holds the device or it is on vfio-pci, else 0",
           [(_render(device_labels(row)), int(row["STATE"] == "ASSIGNED")) for row in rows])
    by_name: dict[str, tuple[str, str, list[tuple[str, float | None]]]] = {}
    for row in rows:
        for metric in row["_metrics"]:
            kind, help_text, samples = by_name.setdefault(metric.name, (metric.kind, metric.help, []))
            if kind == metric.kind:  # a name is one family: a second kind for it is dropped
                samples.append((_render([*device_labels(row), *sorted(metric.labels.items())]), metric.value))
    for name, (kind, help_text, samples) in sorted(by_name.items()):
        family(name, kind, help_text or f"{name} (probe plugin)", samples)


def _epoch(stamp: str) -> int | None:
    """``2026-11-26T21:00:00Z`` as Unix time."""
    import calendar
    import time

    try:
        return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return None


def write_textfile(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (the suite's temp + fsync + rename helper), readable
    by a node_exporter that runs as another user."""
    from pathlib import Path

    from aifactory_core.lifecycle.atomic import write_atomic

    write_atomic(Path(path), text.encode("utf-8"), mode=0o644)
