"""A minimal NVML binding over ctypes: the calls :data:`nvml.LIVE_FIELDS` names, nothing else.

pynvml is a 330 kB module whose import took 74 ms on the project's H100 host (``timings.json``),
more than twice ``nvidia-smi --query-gpu`` in all; ``ctypes`` takes ~3 ms. This module offers the
same function names and constants as pynvml for those calls (so :class:`nvml.LiveNvml` drives
either), returns the same Python shapes (str, int, tuples, ctypes structures with ``_fields_``)
and raises ``NVMLError_<Name>`` exceptions whose text matches pynvml's.

Signatures are those of ``nvml.h`` (NVML API v12/v13): every call returns ``nvmlReturn_t`` and
writes its answer through pointers.
"""

from __future__ import annotations

import ctypes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1

ERROR_NAMES = {
    1: "Uninitialized", 2: "InvalidArgument", 3: "NotSupported", 4: "NoPermission", 5: "AlreadyInitialized",
    6: "NotFound", 7: "InsufficientSize", 8: "InsufficientPower", 9: "DriverNotLoaded", 10: "Timeout",
    11: "IrqIssue", 12: "LibraryNotFound", 13: "FunctionNotFound", 14: "CorruptedInforom", 15: "GpuIsLost",
    16: "ResetRequired", 17: "OperatingSystem", 18: "LibRmVersionMismatch", 19: "InUse", 20: "Memory",
    21: "NoData", 22: "VgpuEccNotSupported", 23: "InsufficientResources", 999: "Unknown",
}
_ERRORS: dict[int, type[Exception]] = {}
_BUFFER = 96


class PciInfo(ctypes.Structure):
    _fields_ = [("busIdLegacy", ctypes.c_char * 16), ("domain", ctypes.c_uint), ("bus", ctypes.c_uint),
                ("device", ctypes.c_uint), ("pciDeviceId", ctypes.c_uint), ("pciSubSystemId", ctypes.c_uint),
                ("busId", ctypes.c_char * 32)]


class Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class Utilization(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


NVML_GPU_FABRIC_UUID_LEN = 16
NVML_GPU_FABRIC_INFO_V2 = 0x02000024  # nvmlGpuFabricInfo_v2: version 2, 36 bytes


class GpuFabricInfo(ctypes.Structure):
    """``nvmlGpuFabricInfo_t`` (``nvmlDeviceGetGpuFabricInfo``, NVML 12.0+)."""

    _fields_ = [("clusterUuid", ctypes.c_uint8 * NVML_GPU_FABRIC_UUID_LEN), ("status", ctypes.c_int),
                ("cliqueId", ctypes.c_uint32), ("state", ctypes.c_uint)]


class GpuFabricInfoV2(ctypes.Structure):
    """``nvmlGpuFabricInfo_v2_t`` (``nvmlDeviceGetGpuFabricInfoV``): versioned, adds ``healthMask``."""

    _fields_ = [("version", ctypes.c_uint), ("clusterUuid", ctypes.c_uint8 * NVML_GPU_FABRIC_UUID_LEN),
                ("status", ctypes.c_int), ("cliqueId", ctypes.c_uint32), ("state", ctypes.c_uint),
                ("healthMask", ctypes.c_uint32)]

    def __init__(self) -> None:
        super().__init__(version=NVML_GPU_FABRIC_INFO_V2)


# function -> (C symbol, output kind)
_TEXT = {"nvmlDeviceGetName": "nvmlDeviceGetName", "nvmlDeviceGetUUID": "nvmlDeviceGetUUID",
         "nvmlDeviceGetSerial": "nvmlDeviceGetSerial", "nvmlDeviceGetVbiosVersion": "nvmlDeviceGetVbiosVersion"}
_STRUCTS = {"nvmlDeviceGetPciInfo": ("nvmlDeviceGetPciInfo_v3", PciInfo),
            "nvmlDeviceGetMemoryInfo": ("nvmlDeviceGetMemoryInfo", Memory),
            "nvmlDeviceGetUtilizationRates": ("nvmlDeviceGetUtilizationRates", Utilization)}
_SCALARS = {  # function -> (C type of the single output, number of outputs)
    "nvmlDeviceGetPowerUsage": (ctypes.c_uint, 1), "nvmlDeviceGetEnforcedPowerLimit": (ctypes.c_uint, 1),
    "nvmlDeviceGetTotalEnergyConsumption": (ctypes.c_ulonglong, 1),
    "nvmlDeviceGetPerformanceState": (ctypes.c_int, 1), "nvmlDeviceGetNumaNodeId": (ctypes.c_uint, 1),
    "nvmlDeviceGetMigMode": (ctypes.c_uint, 2), "nvmlDeviceGetEccMode": (ctypes.c_int, 2),
    "nvmlDeviceGetCurrPcieLinkGeneration": (ctypes.c_uint, 1), "nvmlDeviceGetCurrPcieLinkWidth": (ctypes.c_uint, 1),
    "nvmlDeviceGetMaxPcieLinkGeneration": (ctypes.c_uint, 1), "nvmlDeviceGetMaxPcieLinkWidth": (ctypes.c_uint, 1),
    "nvmlDeviceGetPcieReplayCounter": (ctypes.c_uint, 1),
    "nvmlDeviceGetRetiredPagesPendingStatus": (ctypes.c_int, 1),
    "nvmlDeviceGetRemappedRows": (ctypes.c_uint, 4),
    "nvmlDeviceGetCurrentClocksThrottleReasons": (ctypes.c_ulonglong, 1),
    "nvmlDeviceGetTemperature": (ctypes.c_uint, 1), "nvmlDeviceGetClockInfo": (ctypes.c_uint, 1),
    "nvmlDeviceGetTotalEccErrors": (ctypes.c_ulonglong, 1),
}


class Nvml:
    """``libnvidia-ml.so.1`` loaded from ``path``, with pynvml's names for the calls the probes use."""

    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = NVML_CLOCK_SM
    NVML_CLOCK_MEM = NVML_CLOCK_MEM
    NVML_MEMORY_ERROR_TYPE_CORRECTED = NVML_MEMORY_ERROR_TYPE_CORRECTED
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = NVML_VOLATILE_ECC
    NVML_AGGREGATE_ECC = NVML_AGGREGATE_ECC

    c_nvmlGpuFabricInfo_t = GpuFabricInfo
    c_nvmlGpuFabricInfoV_t = GpuFabricInfoV2

    def __init__(self, path: str) -> None:
        self._library = ctypes.CDLL(path)
        self._library.nvmlErrorString.restype = ctypes.c_char_p

    def _check(self, code: int) -> None:
        if code == 0:
            return
        name = ERROR_NAMES.get(code, "Unknown")
        if code not in _ERRORS:
            _ERRORS[code] = type(f"NVMLError_{name}", (Exception,), {})
        text = self._library.nvmlErrorString(code)
        raise _ERRORS[code](text.decode(errors="replace") if text else name)

    def nvmlInit(self) -> None:
        self._check(self._library.nvmlInit_v2())

    def nvmlShutdown(self) -> None:
        self._check(self._library.nvmlShutdown())

    def nvmlSystemGetDriverVersion(self) -> str:
        buffer = ctypes.create_string_buffer(_BUFFER)
        self._check(self._library.nvmlSystemGetDriverVersion(buffer, ctypes.c_uint(_BUFFER)))
        return buffer.value.decode(errors="replace")

    def nvmlDeviceGetCount(self) -> int:
        count = ctypes.c_uint()
        self._check(self._library.nvmlDeviceGetCount_v2(ctypes.byref(count)))
        return count.value

    def nvmlDeviceGetHandleByIndex(self, index: int) -> ctypes.c_void_p:
        handle = ctypes.c_void_p()
        self._check(self._library.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)))
        return handle

    def nvmlDeviceGetGpuFabricInfo(self, handle: ctypes.c_void_p, info: Any) -> int:
        """As pynvml: ``info`` is ``byref`` of a :class:`GpuFabricInfo` the call fills in."""
        self._check(self._library.nvmlDeviceGetGpuFabricInfo(handle, info))
        return 0

    def nvmlDeviceGetGpuFabricInfoV(self, handle: ctypes.c_void_p, info: Any) -> int:
        """As pynvml: ``info`` is ``byref`` of a :class:`GpuFabricInfoV2` (its version set)."""
        self._check(self._library.nvmlDeviceGetGpuFabricInfoV(handle, info))
        return 0

    def __getattr__(self, function: str) -> Any:
        if function in _TEXT:
            symbol = getattr(self._library, _TEXT[function])

            def text(handle: ctypes.c_void_p) -> str:
                buffer = ctypes.create_string_buffer(_BUFFER)
                self._check(symbol(handle, buffer, ctypes.c_uint(_BUFFER)))
                return buffer.value.decode(errors="replace")
            return text
        if function in _STRUCTS:
            name, structure = _STRUCTS[function]
            struct_symbol = getattr(self._library, name)

            def read_struct(handle: ctypes.c_void_p) -> ctypes.Structure:
                value = structure()
                self._check(struct_symbol(handle, ctypes.byref(value)))
                return value
            return read_struct
        if function in _SCALARS:
            kind, outputs = _SCALARS[function]
            scalar_symbol = getattr(self._library, function)

            def scalar(handle: ctypes.c_void_p, *constants: int) -> Any:
                values = [kind() for _ in range(outputs)]
                arguments = [ctypes.c_int(constant) for constant in constants]
                self._check(scalar_symbol(handle, *arguments, *(ctypes.byref(value) for value in values)))
                answers = [value.value for value in values]
                return answers[0] if outputs == 1 else tuple(answers)
            return scalar
        raise AttributeError(function)
