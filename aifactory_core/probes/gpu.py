"""GPU inventory and health verdict from NVML readings (GPUs the host driver owns).

Verdicts: ``OK``, ``DEGRADED`` (usable, but the scheduler should prefer others; an administrator
should look), ``FAILED`` (do not place work on it). The reason names the first signal that decided
it. Signals follow the NVIDIA field guidance summarised in the project's research notes:
uncorrectable ECC, row-remap pending/failure, retired pages pending, hardware slowdown throttle
reasons, PCIe link downtraining, XIDs that are not application faults.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# XIDs the NVIDIA device plugin treats as application errors (not a device problem).
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})
# XIDs after which the GPU must not take new work until reset or replaced.
FATAL_XIDS = frozenset({48, 64, 79, 95, 140})
# clocks_event_reasons bits (nvml.h) and whether they mean hardware trouble.
THROTTLE_REASONS = (
    (0x1, "GPU_IDLE", False), (0x2, "APPLICATIONS_CLOCKS_SETTING", False), (0x4, "SW_POWER_CAP", False),
    (0x8, "HW_SLOWDOWN", True), (0x10, "SYNC_BOOST", False), (0x20, "SW_THERMAL_SLOWDOWN", False),
    (0x40, "HW_THERMAL_SLOWDOWN", True), (0x80, "HW_POWER_BRAKE_SLOWDOWN", True),
    (0x100, "DISPLAY_CLOCK_SETTING", False),
)


def as_int(value: object, default: int = 0) -> int:
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        return default


def throttle_names(mask: int) -> list[str]:
    return [name for bit, name, _ in THROTTLE_REASONS if mask & bit]


def _hardware_throttle(mask: int) -> list[str]:
    return [name for bit, name, hardware in THROTTLE_REASONS if hardware and mask & bit]


def remapped_rows(fields: dict[str, Any]) -> tuple[int, int, int, int]:
    """(correctable, uncorrectable, pending, failure) from NVML's four-value answer."""
    values = fields.get("RemappedRows")
    if not isinstance(values, list) or len(values) < 4:
        return (0, 0, 0, 0)
    return (as_int(values[0]), as_int(values[1]), as_int(values[2]), as_int(values[3]))


def verdict(reading: dict[str, Any], xids: list[int]) -> tuple[str, str]:
    """(``OK``/``DEGRADED``/``FAILED``, reason) for a GPU NVML can see."""
    errors: dict[str, str] = reading.get("errors", {})
    if any("GpuIsLost" in text for text in errors.values()) or "GpuIsLost" in reading.get("problem", ""):
        return "FAILED", "GPU has fallen off the bus (NVML: GPU is lost)"
    fatal = [xid for xid in xids if xid in FATAL_XIDS]
    if fatal:
        return "FAILED", f"XID {fatal[0]} since the last run"
    if reading.get("status") == "timeout":
        return "DEGRADED", reading.get("problem") or "NVML timed out"
    if reading.get("status") == "error":
        return "DEGRADED", f"NVML: {reading.get('problem', '')}"
    fields: dict[str, Any] = reading.get("fields", {})
    _correctable, _uncorrectable, pending, failure = remapped_rows(fields)
    if failure:
        return "FAILED", "row remapping failed: replace the GPU"
    if pending:
        return "DEGRADED", "row remapping pending: reset the GPU"
    if fields.get("RetiredPagesPendingStatus") not in (None, 0, "0", False):
        return "DEGRADED", "page retirement pending: reset the GPU"
    uncorrected = as_int(fields.get("ECC_uncorr_vol"))
    if uncorrected:
        return "DEGRADED", f"{uncorrected} uncorrectable ECC errors since the driver loaded"
    other = [xid for xid in xids if xid not in APPLICATION_XIDS]
    if other:
        return "DEGRADED", f"XID {other[0]} since the last run"
    fabric = _fabric_problem(fields)
    if fabric is not None:
        return fabric
    hardware = _hardware_throttle(as_int(fields.get("CurrentClocksThrottleReasons")))
    if hardware:
        return "DEGRADED", f"clocks limited by {hardware[0]}"
    width, max_width = as_int(fields.get("CurrPcieLinkWidth")), as_int(fields.get("MaxPcieLinkWidth"))
    if width and max_width and width < max_width:
        return "DEGRADED", f"PCIe link trained at x{width} of x{max_width}"
    return "OK", ""


def fabric_state(fields: dict[str, Any]) -> str:
    """NVLink summary: ``NONE`` (no links), ``UP n/m`` from the per-link states."""
    links = fields.get("nvlink") or []
    states = [link.get("state", {}) for link in links if isinstance(link, dict)]
    readable = [state for state in states if isinstance(state, dict) and "value" in state]
    if not readable:
        return "NONE"
    up = sum(1 for state in readable if as_int(state.get("value")) == 1)
    return f"UP {up}/{len(readable)}"


FABRIC_STATES = {0: "NOT_SUPPORTED", 1: "NOT_STARTED", 2: "IN_PROGRESS", 3: "COMPLETED"}


def _return_name(code: int) -> str:
    if code == 0:
        return "SUCCESS"
    from aifactory_core.probes.nvml_ctypes import ERROR_NAMES  # only on a failed registration

    return ERROR_NAMES.get(code, f"ERROR_{code}")


def fabric_info(reading: dict[str, Any]) -> dict[str, object]:
    """NVSwitch fabric registration from ``nvmlDeviceGetGpuFabricInfo[V]``: ``FABRIC_INFO_STATE``
    (``NOT_SUPPORTED`` on GPUs without an NVSwitch fabric, ``NOT_STARTED``, ``IN_PROGRESS``,
    ``COMPLETED``), ``FABRIC_INFO_STATUS`` (the registration's NVML result, the call's error, or
    ``NOT_RECORDED`` when a replayed recording holds no answer to the call), ``FABRIC_CLIQUE_ID``,
    ``FABRIC_CLUSTER_UUID``; all empty when the call was not made."""
    info = reading.get("fields", {}).get("GpuFabricInfo")
    result: dict[str, object] = {"FABRIC_INFO_STATE": "", "FABRIC_INFO_STATUS": "", "FABRIC_CLIQUE_ID": "",
                                 "FABRIC_CLUSTER_UUID": ""}
    if isinstance(info, dict):
        state = as_int(info.get("state"), -1)
        result["FABRIC_INFO_STATE"] = FABRIC_STATES.get(state, f"UNKNOWN_{state}")
        result["FABRIC_INFO_STATUS"] = _return_name(as_int(info.get("status")))
        result["FABRIC_CLIQUE_ID"] = as_int(info.get("cliqueId"))
        result["FABRIC_CLUSTER_UUID"] = str(info.get("clusterUuid") or "")
        return result
    error = reading.get("errors", {}).get("GpuFabricInfo")
    if error:
        # NVML answers NOT_SUPPORTED for the call itself on GPUs that predate fabric info.
        result["FABRIC_INFO_STATE"] = "NOT_SUPPORTED" if "NotSupported" in error else ""
        result["FABRIC_INFO_STATUS"] = f"error: {error}"
    elif "GpuFabricInfo" in reading.get("unrecorded", {}):
        result["FABRIC_INFO_STATUS"] = "NOT_RECORDED"  # no fault of the GPU's: nothing is known
    return result


def _fabric_problem(fields: dict[str, Any]) -> tuple[str, str] | None:
    """A GPU on an NVSwitch fabric runs no CUDA work until its registration completes."""
    info = fields.get("GpuFabricInfo")
    if not isinstance(info, dict):
        return None
    state, status = as_int(info.get("state"), -1), as_int(info.get("status"))
    if state == 3 and status != 0:
        return "FAILED", f"NVSwitch fabric registration failed ({_return_name(status)})"
    if state in (1, 2):
        return "DEGRADED", f"NVSwitch fabric registration {FABRIC_STATES[state].lower().replace('_', ' ')}"
    return None


def nvml_attributes(reading: dict[str, Any], xids: list[int]) -> dict[str, object]:
    """The NVML part of one ``AIF_GPU`` vector (every key present; unknown values empty)."""
    fields: dict[str, Any] = reading.get("fields", {})
    memory = fields.get("MemoryInfo") if isinstance(fields.get("MemoryInfo"), dict) else {}
    mig = fields.get("MigMode")
    ecc = fields.get("EccMode")
    correctable, uncorrectable, pending, failure = remapped_rows(fields)
    throttle = as_int(fields.get("CurrentClocksThrottleReasons"))
    health, reason = verdict(reading, xids)
    return {
        "MODEL": fields.get("Name") or "",
        "UUID": fields.get("UUID") or "",
        "SERIAL": fields.get("Serial") or "",
        "MEMORY_MIB": as_int(memory.get("total")) // (1024 * 1024) if memory else "",
        "VBIOS": fields.get("VbiosVersion") or "",
        "MIG_MODE": ("ENABLED" if str(mig[0]) == "1" else "DISABLED") if isinstance(mig, list) and mig else "",
        "ECC_MODE": ("ENABLED" if str(ecc[0]) == "1" else "DISABLED") if isinstance(ecc, list) and ecc else "",
        "ECC_CORRECTED_VOLATILE": as_int(fields.get("ECC_corr_vol")),
        "ECC_CORRECTED_AGGREGATE": as_int(fields.get("ECC_corr_agg")),
        "ECC_UNCORRECTED_VOLATILE": as_int(fields.get("ECC_uncorr_vol")),
        "ECC_UNCORRECTED_AGGREGATE": as_int(fields.get("ECC_uncorr_agg")),
        "REMAPPED_ROWS_CORRECTABLE": correctable,
        "REMAPPED_ROWS_UNCORRECTABLE": uncorrectable,
        "REMAPPED_ROWS_PENDING": pending,
        "REMAPPED_ROWS_FAILURE": failure,
        "RETIRED_PAGES_PENDING": ("" if "RetiredPagesPendingStatus" not in fields
                                  else as_int(fields.get("RetiredPagesPendingStatus"))),
        "PCIE_REPLAY_COUNTER": as_int(fields.get("PcieReplayCounter")),
        "PCIE_LINK_GEN": as_int(fields.get("CurrPcieLinkGeneration")),
        "PCIE_LINK_WIDTH": as_int(fields.get("CurrPcieLinkWidth")),
        "PCIE_LINK_GEN_MAX": as_int(fields.get("MaxPcieLinkGeneration")),
        "PCIE_LINK_WIDTH_MAX": as_int(fields.get("MaxPcieLinkWidth")),
        "THROTTLE_REASONS": ",".join(throttle_names(throttle)),
        "XID_SINCE_LAST": ",".join(str(xid) for xid in xids),
        "FABRIC_STATE": fabric_state(fields),
        **fabric_info(reading),
        "NVML_STATUS": reading.get("status", ""),
        "NVML_PROBLEM": reading.get("problem", ""),
        "HEALTH": health,
        "HEALTH_REASON": reason,
        "HEALTH_SOURCE": "NVML",
    }


def metrics(reading: dict[str, Any]) -> dict[str, int]:
    """The per-GPU metrics (utilisation %, memory bytes, °C, mW, MHz, mJ) NVML answered."""
    fields: dict[str, Any] = reading.get("fields", {})
    result: dict[str, int] = {}
    utilisation = fields.get("UtilizationRates")
    if isinstance(utilisation, dict):
        result["GPU_UTILIZATION"] = as_int(utilisation.get("gpu"))
        result["GPU_MEMORY_UTILIZATION"] = as_int(utilisation.get("memory"))
    memory = fields.get("MemoryInfo")
    if isinstance(memory, dict):
        result["GPU_MEMORY_USED_BYTES"] = as_int(memory.get("used"))
        result["GPU_MEMORY_TOTAL_BYTES"] = as_int(memory.get("total"))
    for name, key in (("Temperature", "GPU_TEMPERATURE_C"), ("PowerUsage", "GPU_POWER_MW"),
                      ("Clock_SM", "GPU_SM_CLOCK_MHZ"), ("Clock_MEM", "GPU_MEM_CLOCK_MHZ"),
                      ("TotalEnergyConsumption", "GPU_ENERGY_MJ")):
        if name in fields:
            result[key] = as_int(fields.get(name))
    return result
