"""The NVML reader: the recorded backend on the real H100 capture, the live backend through a
pynvml stand-in that answers from the same recording, and the faults (no library, one GPU raising,
a hung call) — the other GPUs are always still reported.

No GPU is available to the tests: every NVML answer here is one recorded on a real H100
(``tests/fixtures/hosts/h100-pcie-vm/nvml.json``) or derived from it (``probe_replays.py`` says how).
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
from probe_replays import DGX_GPUS, H100_NVML, multi_gpu, recording, write

from aifactory_core.probes import nvml
from aifactory_core.probes.gpu import verdict


def test_replay_reads_every_recorded_value_and_error() -> None:
    real = recording()["devices"][0]
    [reading] = nvml.ReplayNvml(str(H100_NVML)).read()
    assert reading["status"] == "ok"
    assert reading["address"] == "0000:00:06.0"
    for name, entry in real.items():
        if name == "nvlink":
            continue
        if "error" in entry:
            assert reading["errors"][name] == entry["error"]
            assert name not in reading["fields"]
        else:
            assert reading["fields"][name] == entry["value"]
    assert nvml.ReplayNvml(str(H100_NVML)).driver_version() == ("580.159.04", None)


def test_bus_id_spellings() -> None:
    assert nvml.bus_id("00000000:00:06.0") == "0000:00:06.0"
    assert nvml.bus_id("00000000:1B:00.0") == "0000:1b:00.0"
    assert nvml.bus_id("0000:00:06.0") == "0000:00:06.0"
    assert nvml.bus_id("garbage") is None
    assert nvml.bus_id(None) is None


def test_one_gpu_without_handle_others_still_read(tmp_path: Path) -> None:
    data = multi_gpu(DGX_GPUS[:4])
    data["devices"][1] = {"error": "NVMLError_Unknown: Unknown Error"}
    readings = nvml.ReplayNvml(str(write(data, tmp_path / "n.json"))).read()
    assert [r["status"] for r in readings] == ["ok", "error", "ok", "ok"]
    assert "Unknown Error" in readings[1]["problem"]
    assert [r["address"] for r in readings] == [DGX_GPUS[0], None, DGX_GPUS[2], DGX_GPUS[3]]


def test_gpu_lost_on_one_field_fails_that_gpu_only(tmp_path: Path) -> None:
    data = multi_gpu(DGX_GPUS[:3])
    data["devices"][2]["Temperature"] = {"error": "NVMLError_GpuIsLost: GPU is lost", "us": 10.0}
    readings = nvml.ReplayNvml(str(write(data, tmp_path / "n.json"))).read()
    assert [verdict(r, [])[0] for r in readings] == ["OK", "OK", "FAILED"]
    assert "fallen off the bus" in verdict(readings[2], [])[1]


def test_hung_call_costs_the_budget_not_more(tmp_path: Path) -> None:
    data = multi_gpu(DGX_GPUS[:3])
    data["devices"][1]["PowerUsage"]["us"] = 120e6  # a two-minute call: NVML hung
    reader = nvml.ReplayNvml(str(write(data, tmp_path / "n.json")), budget_s=1.5, honour_latency=True)
    start = time.monotonic()
    readings = reader.read()
    elapsed = time.monotonic() - start
    assert elapsed < 5
    assert [r["status"] for r in readings] == ["ok", "timeout", "ok"]
    assert readings[0]["fields"]["Name"] == "NVIDIA H100 80GB HBM3"
    assert readings[1]["fields"]["Name"] == "NVIDIA H100 80GB HBM3"  # read before the hang
    assert verdict(readings[1], [])[0] == "DEGRADED"


def test_library_missing_is_detected_without_subprocess(tmp_path: Path) -> None:
    assert nvml.library_path(str(tmp_path)) is None
    library = tmp_path / "usr/lib/x86_64-linux-gnu" / nvml.LIBRARY
    library.parent.mkdir(parents=True)
    library.write_bytes(b"")
    assert nvml.library_path(str(tmp_path)) == str(library)


class _Struct:
    """A ctypes-structure look-alike: ``_fields_`` and attributes, as pynvml returns."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._fields_ = [(name, None) for name in values]
        for name, value in values.items():
            setattr(self, name, value)


def _fake_pynvml(data: dict[str, Any], hang: int | None = None, raise_on: int | None = None) -> types.ModuleType:
    """A pynvml stand-in answering each call from the recording (errors raised as NVMLError_*)."""
    module = types.ModuleType("pynvml")
    constants = {"NVML_TEMPERATURE_GPU", "NVML_CLOCK_SM", "NVML_CLOCK_MEM", "NVML_MEMORY_ERROR_TYPE_CORRECTED",
                 "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", "NVML_VOLATILE_ECC", "NVML_AGGREGATE_ECC"}
    for constant in constants:
        setattr(module, constant, constant)
    by_call = {(function, args): name for name, (function, args) in nvml.LIVE_FIELDS.items()}
    errors: dict[str, type[Exception]] = {}

    def error_class(text: str) -> Exception:
        name, _, message = text.partition(": ")
        if name not in errors:
            errors[name] = type(name, (Exception,), {})
        return errors[name](message)

    def make(function: str) -> Any:
        def call(handle: int, *args: str) -> Any:
            if handle == hang and function == "nvmlDeviceGetPowerUsage":
                time.sleep(120)
            if handle == raise_on:
                raise error_class("NVMLError_GpuIsLost: GPU is lost")
            entry = data["devices"][handle][by_call[(function, tuple(args))]]
            if "error" in entry:
                raise error_class(entry["error"])
            value = entry["value"]
            if isinstance(value, dict):
                return _Struct(value)
            if isinstance(value, list):
                return tuple(int(item) for item in value)
            return value.encode() if isinstance(value, str) and function != "nvmlDeviceGetName" else value
        return call

    for function, _args in by_call:
        setattr(module, function, make(function))
    module.nvmlInit = lambda: None  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    module.nvmlSystemGetDriverVersion = lambda: data["driver"]["value"]  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(data["devices"])  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda index: index  # type: ignore[attr-defined]
    return module


def test_live_backend_normalises_like_the_recording(monkeypatch: pytest.MonkeyPatch) -> None:
    data = recording()
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(data))
    reader = nvml.LiveNvml()
    [reading] = reader.read()
    reader.close()
    assert reading["address"] == "0000:00:06.0"
    for name in nvml.LIVE_FIELDS:
        entry = data["devices"][0][name]
        if "error" in entry:
            assert reading["errors"][name].startswith(entry["error"].split(":")[0])
        else:
            assert reading["fields"][name] == entry["value"], name
    assert reader.driver_version() == ("580.159.04", None)


def test_live_backend_for_host_system_skips_the_slow_metric_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []
    fake = _fake_pynvml(recording())
    for function in {call[0] for call in nvml.LIVE_FIELDS.values()}:
        original = getattr(fake, function)

        def spy(*args: Any, _original: Any = original, _name: str = function) -> Any:
            called.append(_name)
            return _original(*args)
        setattr(fake, function, spy)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    [reading] = nvml.LiveNvml(metrics=False).read()
    assert reading["status"] == "ok" and "Name" in reading["fields"]
    assert "nvmlDeviceGetTotalEnergyConsumption" not in called
    assert "nvmlDeviceGetUtilizationRates" not in called
    assert not set(reading["fields"]) & nvml.METRIC_FIELDS


def test_live_backend_isolates_a_raising_and_a_hung_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    data = multi_gpu(DGX_GPUS[:4])
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(data, hang=1, raise_on=2))
    start = time.monotonic()
    readings = nvml.LiveNvml(budget_s=1.0).read()
    assert time.monotonic() - start < 5
    assert [r["status"] for r in readings] == ["ok", "timeout", "ok", "ok"]
    assert [verdict(r, [])[0] for r in readings] == ["OK", "DEGRADED", "FAILED", "OK"]
    assert readings[3]["address"] == DGX_GPUS[3]
