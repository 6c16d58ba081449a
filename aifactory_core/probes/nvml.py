"""A small NVML reader: per-GPU readings as plain dicts, from the library or from a recording.

A reading is ``{"address": "0000:17:00.0", "fields": {NAME: value}, "errors": {NAME: text},
"unrecorded": {NAME: text}, "status": "ok" | "error" | "timeout", "problem": text}``. Field names
are those of the recorded ``nvml.json`` format (``Name``, ``UUID``, ``MemoryInfo``, ``ECC_uncorr_vol``...).

Two backends share the same deadline machinery: every GPU is read in its own daemon worker
thread and the caller waits at most ``budget_s`` in all, so a hung NVML call costs the probe its
budget, never more, and the other GPUs are still reported. An exception on one GPU (or one
field) is kept as that GPU's (field's) error.

* :class:`LiveNvml` loads the library through a small ctypes binding (or pynvml, imported lazily),
  and only when ``libnvidia-ml.so.1`` exists on the host
  (checked with a few ``stat`` calls — ``ctypes.util.find_library`` would spawn ``ldconfig``).
* GPU fabric info (NVSwitch/NVLink fabric registration: state, status, clique id, cluster UUID)
  is read with :func:`read_gpu_fabric_info` into the field ``GpuFabricInfo``.
* :class:`ReplayNvml` reads the recorded format: ``{"driver": {"value"|"error", "us"}, "nvml",
  "cuda", "count", "devices": [{FIELD: {"value": V} | {"error": "E"}, "us": latency}]}``. A
  device entry ``{"error": "E"}`` stands for a GPU whose handle cannot be obtained. With
  ``honour_latency`` the recorded latency (``us``) of each call is slept, so a recording with a
  very long call stands for a hung one. A recorded error that is not NVML's (``NVMLError_*``) is
  the recording program's own exception (the H100 capture's ``GpuFabricInfo`` is a ``TypeError``:
  its recorder called the function without the structure argument): the GPU was never asked, so
  the field goes to ``unrecorded``, not to ``errors``.
"""

from __future__ import annotations

import os
import time

from aifactory_core.probes.render import error_text

TYPE_CHECKING = False  # typing is not loaded at interpreter start-up; mypy reads the name
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Reading = dict[str, Any]

LIBRARY_DIRS = (
    "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
    "/lib/x86_64-linux-gnu", "/lib64", "/usr/local/nvidia/lib64",
)
LIBRARY = "libnvidia-ml.so.1"
DEFAULT_BUDGET_S = 5.0
ERROR_TEXT_LIMIT = 200  # per GPU and per field: a reading holds many
NVML_ERROR_PREFIX = "NVMLError"  # pynvml's exception classes (and the ctypes binding's) are NVMLError_<name>

# Recorded field name -> (pynvml function, extra arguments after the handle). The live backend
# reads exactly these; values are normalised to what the recording holds (lists of strings for
# tuples, dicts for structures).
LIVE_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Name": ("nvmlDeviceGetName", ()),
    "UUID": ("nvmlDeviceGetUUID", ()),
    "Serial": ("nvmlDeviceGetSerial", ()),
    "PciInfo": ("nvmlDeviceGetPciInfo", ()),
    "MemoryInfo": ("nvmlDeviceGetMemoryInfo", ()),
    "UtilizationRates": ("nvmlDeviceGetUtilizationRates", ()),
    "PowerUsage": ("nvmlDeviceGetPowerUsage", ()),
    "EnforcedPowerLimit": ("nvmlDeviceGetEnforcedPowerLimit", ()),
    "TotalEnergyConsumption": ("nvmlDeviceGetTotalEnergyConsumption", ()),
    "PerformanceState": ("nvmlDeviceGetPerformanceState", ()),
    "VbiosVersion": ("nvmlDeviceGetVbiosVersion", ()),
    "NumaNodeId": ("nvmlDeviceGetNumaNodeId", ()),
    "MigMode": ("nvmlDeviceGetMigMode", ()),
    "EccMode": ("nvmlDeviceGetEccMode", ()),
    "CurrPcieLinkGeneration": ("nvmlDeviceGetCurrPcieLinkGeneration", ()),
    "CurrPcieLinkWidth": ("nvmlDeviceGetCurrPcieLinkWidth", ()),
    "MaxPcieLinkGeneration": ("nvmlDeviceGetMaxPcieLinkGeneration", ()),
    "MaxPcieLinkWidth": ("nvmlDeviceGetMaxPcieLinkWidth", ()),
    "PcieReplayCounter": ("nvmlDeviceGetPcieReplayCounter", ()),
    "RetiredPagesPendingStatus": ("nvmlDeviceGetRetiredPagesPendingStatus", ()),
    "RemappedRows": ("nvmlDeviceGetRemappedRows", ()),
    "CurrentClocksThrottleReasons": ("nvmlDeviceGetCurrentClocksThrottleReasons", ()),
    "Temperature": ("nvmlDeviceGetTemperature", ("NVML_TEMPERATURE_GPU",)),
    "Clock_SM": ("nvmlDeviceGetClockInfo", ("NVML_CLOCK_SM",)),
    "Clock_MEM": ("nvmlDeviceGetClockInfo", ("NVML_CLOCK_MEM",)),
    "ECC_corr_vol": ("nvmlDeviceGetTotalEccErrors",
                     ("NVML_MEMORY_ERROR_TYPE_CORRECTED", "NVML_VOLATILE_ECC")),
    "ECC_corr_agg": ("nvmlDeviceGetTotalEccErrors",
                     ("NVML_MEMORY_ERROR_TYPE_CORRECTED", "NVML_AGGREGATE_ECC")),
    "ECC_uncorr_vol": ("nvmlDeviceGetTotalEccErrors",
                       ("NVML_MEMORY_ERROR_TYPE_UNCORRECTED", "NVML_VOLATILE_ECC")),
    "ECC_uncorr_agg": ("nvmlDeviceGetTotalEccErrors",
                       ("NVML_MEMORY_ERROR_TYPE_UNCORRECTED", "NVML_AGGREGATE_ECC")),
}


def _uuid_text(raw: object) -> str:
    """NVML's 16-byte cluster UUID as ``8-4-4-4-12`` hex ('' when all zero: no cluster)."""
    data = bytes(int(byte) & 0xFF for byte in raw)  # type: ignore[attr-defined]
    if not any(data):
        return ""
    text = data.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def read_gpu_fabric_info(nvml: Any, handle: Any) -> dict[str, object]:
    """``nvmlDeviceGetGpuFabricInfoV`` (v2, with ``healthMask``), or ``nvmlDeviceGetGpuFabricInfo``
    where the library predates it, through either binding (both take ``byref`` of the structure).

    The answer in the recorded format: ``{"clusterUuid": "8-4-4-4-12" | "", "status": nvmlReturn_t
    of the GPU's fabric registration, "cliqueId": int, "state": nvmlGpuFabricState_t,
    "healthMask": int}`` (no ``healthMask`` from the unversioned call)."""
    import ctypes

    try:
        info = nvml.c_nvmlGpuFabricInfoV_t()
        nvml.nvmlDeviceGetGpuFabricInfoV(handle, ctypes.byref(info))
    except Exception as error:  # AttributeError (symbol missing) or pynvml's NVMLError_FunctionNotFound
        if not isinstance(error, AttributeError) and "FunctionNotFound" not in type(error).__name__:
            raise
        info = nvml.c_nvmlGpuFabricInfo_t()
        nvml.nvmlDeviceGetGpuFabricInfo(handle, ctypes.byref(info))
    answer: dict[str, object] = {"clusterUuid": _uuid_text(info.clusterUuid), "status": int(info.status),
                                 "cliqueId": int(info.cliqueId), "state": int(info.state)}
    if hasattr(info, "healthMask"):
        answer["healthMask"] = int(info.healthMask)
    return answer


# Calls only the metrics need (some are slow: the H100 recording shows TotalEnergyConsumption at
# 15.9 ms and UtilizationRates at 3.8 ms); the host/system probe leaves them out.
METRIC_FIELDS = frozenset({"UtilizationRates", "PowerUsage", "TotalEnergyConsumption", "Clock_SM", "Clock_MEM"})


def bus_id(value: object) -> str | None:
    """NVML's ``00000000:17:00.0`` (or legacy ``0000:17:00.0``) as sysfs's ``0000:17:00.0``."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    parts = text.split(":")
    if len(parts) != 3:
        return None
    return f"{int(parts[0], 16):04x}:{parts[1]}:{parts[2]}" if parts[0] else None


def library_path(root: str = "/") -> str | None:
    """Where ``libnvidia-ml.so.1`` is on the host, or None (a few stats, no subprocess)."""
    for directory in LIBRARY_DIRS:
        candidate = os.path.join(root, directory.lstrip("/"), LIBRARY)
        if os.path.exists(candidate):
            return candidate
    return None


def _normalise(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, (str, int, float)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [str(_normalise(item)) for item in value]
    fields = getattr(value, "_fields_", None)
    if fields:
        return {name: _normalise(getattr(value, name)) for name, *_ in fields}
    return str(value)


class _Collector:
    """Runs one reader function per GPU in daemon threads under one shared deadline."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s

    def collect(self, jobs: list[tuple[str, Callable[[Reading], None]]]) -> list[Reading]:
        import threading

        readings: list[Reading] = []
        threads = []
        for label, job in jobs:
            reading: Reading = {"address": None, "label": label, "fields": {}, "errors": {},
                                "unrecorded": {}, "status": "ok", "problem": ""}
            readings.append(reading)

            def run(job: Callable[[Reading], None] = job, reading: Reading = reading) -> None:
                try:
                    job(reading)
                except Exception as error:  # one GPU's failure stays that GPU's
                    reading["status"] = "error"
                    reading["problem"] = error_text(error, limit=ERROR_TEXT_LIMIT)
                reading["done"] = True

            thread = threading.Thread(target=run, name=f"nvml-{label}", daemon=True)
            thread.start()
            threads.append(thread)
        deadline = time.monotonic() + self.budget_s
        for thread, reading in zip(threads, readings, strict=True):
            thread.join(max(0.0, deadline - time.monotonic()))
            if not reading.get("done"):
                reading["status"] = "timeout"
                reading["problem"] = f"NVML did not answer within {self.budget_s:g} s"
        # A timed-out thread keeps writing into its own dict: hand back copies.
        return [{**reading, "fields": dict(reading["fields"]), "errors": dict(reading["errors"]),
                 "unrecorded": dict(reading["unrecorded"])} for reading in readings]


def load_recording(path: str) -> dict[str, Any]:
    """A recorded ``nvml.json``: an object whose ``devices`` (absent: none) is a list of objects.
    Raises OSError, or ValueError (a JSON error, or the wrong shape) for anything else."""
    import json

    with open(path, encoding="utf-8") as handle:
        recording: dict[str, Any] = json.load(handle)
    devices = recording.get("devices", []) if isinstance(recording, dict) else None
    if not isinstance(devices, list) or not all(isinstance(device, dict) for device in devices):
        raise ValueError("not an nvml.json recording (an object with a list of devices)")
    return recording


class ReplayNvml:
    """NVML readings from a recorded ``nvml.json`` (tests, ``--nvml-replay FILE``)."""

    def __init__(self, path: str, budget_s: float = DEFAULT_BUDGET_S, honour_latency: bool = False) -> None:
        self.recording: dict[str, Any] = load_recording(path)
        self.path = path
        self.budget_s = budget_s
        self.honour_latency = honour_latency

    def _entry(self, name: str) -> tuple[object, str | None]:
        entry = self.recording.get(name) or {}
        return entry.get("value"), entry.get("error")

    def driver_version(self) -> tuple[str | None, str | None]:
        value, error = self._entry("driver")
        return (str(value) if value is not None else None), error

    def _reader(self, device: dict[str, Any]) -> Callable[[Reading], None]:
        def read(reading: Reading) -> None:
            if "error" in device and "Name" not in device:
                raise RuntimeError(str(device["error"]))
            for name, entry in device.items():
                if not isinstance(entry, dict) or name == "nvlink":
                    continue
                if self.honour_latency:
                    time.sleep(float(entry.get("us", 0)) / 1e6)
                if "error" in entry:
                    text = str(entry["error"])
                    if text.startswith(NVML_ERROR_PREFIX):
                        reading["errors"][name] = text
                    else:  # the recorder's own exception: NVML never answered this call
                        reading["unrecorded"][name] = text
                else:
                    reading["fields"][name] = entry.get("value")
            reading["fields"]["nvlink"] = device.get("nvlink") or []
            pci = reading["fields"].get("PciInfo")
            if isinstance(pci, dict):
                reading["address"] = bus_id(pci.get("busId") or pci.get("busIdLegacy"))
        return read

    def read(self) -> list[Reading]:
        devices = self.recording.get("devices") or []
        jobs = [(str(index), self._reader(device)) for index, device in enumerate(devices)]
        return _Collector(self.budget_s).collect(jobs)


class LiveNvml:
    """NVML readings from the library: through :mod:`nvml_ctypes` (default) or pynvml (imported on
    first use); both expose pynvml's names for the calls in :data:`LIVE_FIELDS`."""

    def __init__(self, budget_s: float = DEFAULT_BUDGET_S, metrics: bool = True, library: str | None = None,
                 binding: str = "ctypes") -> None:
        self.budget_s = budget_s
        self.library = library
        self.binding = binding
        self.fields = {name: call for name, call in LIVE_FIELDS.items() if metrics or name not in METRIC_FIELDS}
        self._nvml: Any = None

    def _init(self) -> Any:
        if self._nvml is None:
            if self.binding == "pynvml":
                import pynvml as binding
            else:  # ~3 ms instead of pynvml's ~74 ms import
                from aifactory_core.probes import nvml_ctypes

                binding = nvml_ctypes.Nvml(self.library or library_path() or LIBRARY)
            binding.nvmlInit()
            self._nvml = binding
        return self._nvml

    def driver_version(self) -> tuple[str | None, str | None]:
        try:
            return str(_normalise(self._init().nvmlSystemGetDriverVersion())), None
        except Exception as error:
            return None, error_text(error, limit=ERROR_TEXT_LIMIT)

    def _reader(self, index: int) -> Callable[[Reading], None]:
        def read(reading: Reading) -> None:
            nvml = self._nvml
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            for name, (function, constants) in self.fields.items():
                try:
                    arguments = [getattr(nvml, constant) for constant in constants]
                    reading["fields"][name] = _normalise(getattr(nvml, function)(handle, *arguments))
                except Exception as error:
                    reading["errors"][name] = error_text(error, limit=ERROR_TEXT_LIMIT)
                    if "GpuIsLost" in type(error).__name__:
                        break  # fallen off the bus: every further call fails the same way
            else:
                try:  # after the others, so its failure (kept in ``errors``) spoils none of them
                    reading["fields"]["GpuFabricInfo"] = read_gpu_fabric_info(nvml, handle)
                except Exception as error:
                    reading["errors"]["GpuFabricInfo"] = error_text(error, limit=ERROR_TEXT_LIMIT)
            pci = reading["fields"].get("PciInfo")
            if isinstance(pci, dict):
                reading["address"] = bus_id(pci.get("busId") or pci.get("busIdLegacy"))
        return read

    def read(self) -> list[Reading]:
        """Init and count run under the same deadline as the reads (a hung init is a time-out)."""
        counted = _Collector(self.budget_s).collect([("init", self._count)])[0]
        if counted["status"] != "ok":
            raise RuntimeError(counted["problem"] or "NVML init failed")
        count = int(counted["fields"]["count"])
        return _Collector(self.budget_s).collect([(str(index), self._reader(index)) for index in range(count)])

    def _count(self, reading: Reading) -> None:
        reading["fields"]["count"] = self._init().nvmlDeviceGetCount()

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down a broken library must not fail the probe
                pass
