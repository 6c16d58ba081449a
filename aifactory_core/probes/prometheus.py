"""Prometheus text exposition format from the same snapshot, for node_exporter's textfile collector.

Metric names follow DCGM-exporter's meaning with an ``aifactory_`` prefix; every GPU sample is
labelled with ``bus_id``, ``uuid``, ``model`` and ``state``. The file is written atomically
(temporary file in the same directory, then ``rename``) so the collector never reads half a file.
"""

from __future__ import annotations

from aifactory_core.probes.collect import SEVERITY  # the verdicts' order is the gauge's value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

GAUGES = (
    ("GPU_UTILIZATION", "gpu_utilization_percent", "GPU utilisation (%)"),
    ("GPU_MEMORY_UTILIZATION", "gpu_memory_utilization_percent", "memory controller utilisation (%)"),
    ("GPU_MEMORY_USED_MIB", "gpu_memory_used_mebibytes", "frame buffer used (MiB)"),
    ("GPU_MEMORY_TOTAL_MIB", "gpu_memory_total_mebibytes", "frame buffer total (MiB)"),
    ("GPU_TEMPERATURE_C", "gpu_temperature_celsius", "GPU temperature (C)"),
    ("GPU_POWER_MW", "gpu_power_milliwatts", "power draw (mW)"),
    ("GPU_SM_CLOCK_MHZ", "gpu_sm_clock_megahertz", "SM clock (MHz)"),
    ("GPU_MEM_CLOCK_MHZ", "gpu_memory_clock_megahertz", "memory clock (MHz)"),
)
COUNTERS = (
    ("GPU_ENERGY_MJ", "gpu_energy_millijoules_total", "energy since the driver loaded (mJ)", "_metrics"),
    ("ECC_UNCORRECTED_VOLATILE", "gpu_ecc_uncorrected_volatile_total", "uncorrectable ECC errors since boot", ""),
    ("ECC_CORRECTED_VOLATILE", "gpu_ecc_corrected_volatile_total", "correctable ECC errors since boot", ""),
    ("PCIE_REPLAY_COUNTER", "gpu_pcie_replay_total", "PCIe replays", ""),
    ("AER_CORRECTABLE", "gpu_pcie_aer_correctable_total", "PCIe AER correctable errors (host side)", ""),
    ("AER_NONFATAL", "gpu_pcie_aer_nonfatal_total", "PCIe AER non-fatal errors (host side)", ""),
    ("AER_FATAL", "gpu_pcie_aer_fatal_total", "PCIe AER fatal errors (host side)", ""),
)


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(row: dict[str, Any]) -> str:
    return ",".join(f'{name}="{_label(row.get(key, ""))}"' for name, key in
                    (("bus_id", "BUS_ID"), ("uuid", "UUID"), ("model", "MODEL"), ("state", "STATE")))


def _epoch(stamp: str) -> int | None:
    """``2026-11-26T21:00:00Z`` as Unix time."""
    import calendar
    import time

    try:
        return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return None


def exposition(snapshot: dict[str, Any]) -> str:
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: Sequence[tuple[str, object]]) -> None:
        if not samples:
            return
        lines.append(f"# HELP aifactory_{name} {help_text}")
        lines.append(f"# TYPE aifactory_{name} {kind}")
        lines.extend(f"aifactory_{name}{{{labels}}} {value}" for labels, value in samples)

    gpus = snapshot["gpus"]
    family("gpu_health", "gauge", "GPU verdict: 0 OK, 1 DEGRADED, 2 FAILED",
           [(_labels(row), SEVERITY.get(str(row["HEALTH"]), 1)) for row in gpus])
    for key, name, help_text in GAUGES:
        family(name, "gauge", help_text,
               [(_labels(row), row["_metrics"][key]) for row in gpus if key in row["_metrics"]])
    for key, name, help_text, where in COUNTERS:
        samples = []
        for row in gpus:
            source = row["_metrics"] if where else row
            value = source.get(key, "")
            if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
                samples.append((_labels(row), value))
        family(name, "counter", help_text, samples)
    resets = [(row, row["_reset"]) for row in gpus if row.get("_reset")]
    family("gpu_last_reset_timestamp_seconds", "gauge", "when the device was last reset and checked (Unix time)",
           [(f'{_labels(row)},method="{_label(outcome[2])}"', _epoch(outcome[0])) for row, outcome in resets
            if _epoch(outcome[0]) is not None])
    family("gpu_last_reset_ok", "gauge", "outcome of the last reset and health check: 1 OK, 0 FAILED",
           [(f'{_labels(row)},method="{_label(outcome[2])}"', 1 if outcome[1] == "OK" else 0)
            for row, outcome in resets])
    family("hugepages_free", "gauge", "free huge pages per NUMA node and size",
           [(f'node="{row["NODE_ID"]}",size_kib="{row["SIZE"]}"', row["FREE"]) for row in snapshot["hugepages"]])
    family("readiness_check", "gauge", "readiness check: 0 PASS, 1 WARN, 2 FAIL",
           [(f'check="{_label(row["NAME"])}"', {"PASS": 0, "WARN": 1}.get(str(row["STATUS"]), 2))
            for row in snapshot["checks"]])
    family("probe_problems", "gauge", "sections of the probe that failed", [("", len(snapshot["problems"]))])
    return "\n".join(lines) + "\n"


def write_textfile(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (the suite's temp + fsync + rename helper), readable
    by a node_exporter that runs as another user."""
    from pathlib import Path

    from aifactory_core.lifecycle.atomic import write_atomic

    write_atomic(Path(path), text.encode("utf-8"), mode=0o644)
