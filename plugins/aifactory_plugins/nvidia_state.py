"""What NVML says about a GPU before it leaves the host's driver: MIG, persistence, processes.

Read only on the deploy path (never on a probe's hot path), through pynvml with a deadline, or from
a recording (``AIFACTORY_NVML_REPLAY``, the ``nvml.json`` format of the host captures) in tests.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from aifactory_core.hostroot import HostRoot

ENV_REPLAY = "AIFACTORY_NVML_REPLAY"
DEADLINE_S = 5.0


@dataclass(frozen=True)
class GpuNvmlState:
    address: str
    mig_enabled: bool | None
    persistence: bool | None
    process_pids: tuple[int, ...]
    problem: str | None = None


def _pids(value: Any) -> tuple[int, ...]:
    pids = []
    for item in value or ():
        pid = item.get("pid") if isinstance(item, dict) else getattr(item, "pid", None)
        if isinstance(pid, int) or (isinstance(pid, str) and pid.isdigit()):
            pids.append(int(pid))
    return tuple(sorted(set(pids)))


def _mig(value: Any) -> bool | None:
    if isinstance(value, list | tuple) and value:
        return str(value[0]) == "1"
    return None


def _from_replay(path: str, address: str) -> GpuNvmlState | None:
    from aifactory_core.errors import ConfigError
    from aifactory_core.probes.nvml import bus_id, load_recording

    try:
        devices = load_recording(path).get("devices", [])
    except (OSError, ValueError) as error:
        raise ConfigError(f"{ENV_REPLAY}={path}: {' '.join(str(error).split())}") from None
    for device in devices:
        pci = (device.get("PciInfo") or {}).get("value") or {}
        if bus_id(pci.get("busId") or pci.get("busIdLegacy")) != address:
            continue
        value = {name: (entry or {}).get("value") for name, entry in device.items() if isinstance(entry, dict)}
        persistence = value.get("PersistenceMode")
        return GpuNvmlState(address, _mig(value.get("MigMode")),
                            None if persistence is None else bool(persistence),
                            _pids(value.get("ComputeRunningProcesses")) + _pids(value.get("GraphicsRunningProcesses")))
    return None


def _from_library(address: str) -> GpuNvmlState:
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByPciBusId(address.encode())

        def attempt(call: str, *args: Any) -> Any:
            try:
                return getattr(pynvml, call)(handle, *args)
            except pynvml.NVMLError:
                return None

        mig = attempt("nvmlDeviceGetMigMode")
        persistence = attempt("nvmlDeviceGetPersistenceMode")
        processes = list(attempt("nvmlDeviceGetComputeRunningProcesses") or [])
        processes += list(attempt("nvmlDeviceGetGraphicsRunningProcesses") or [])
        return GpuNvmlState(address, _mig(list(mig) if mig is not None else None),
                            None if persistence is None else bool(persistence), _pids(processes))
    finally:
        pynvml.nvmlShutdown()


def gpu_state(host: HostRoot, address: str) -> GpuNvmlState | None:
    """NVML's view of one GPU; ``None`` when NVML is not on this host (the sysfs checks still run)."""
    replay = os.environ.get(ENV_REPLAY)
    if replay:
        return _from_replay(replay, address)
    from aifactory_core.probes.nvml import library_path

    if library_path(str(host.root)) is None:
        return None
    result: list[GpuNvmlState] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            result.append(_from_library(address))
        except Exception as error:  # NVML down or the GPU lost: reported, not fatal here
            errors.append(error)

    worker = threading.Thread(target=read, daemon=True, name=f"nvml {address}")
    worker.start()
    worker.join(DEADLINE_S)
    if result:
        return result[0]
    problem = f"NVML did not answer within {DEADLINE_S:.0f}s" if worker.is_alive() else f"NVML: {errors[0]}"
    return GpuNvmlState(address, None, None, (), problem)
