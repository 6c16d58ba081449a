"""The NVML reader: the recorded backend on the real H100 capture, the live backend through a
pynvml stand-in and through the ctypes binding over a C library stand-in, both answering from the
same recording, and the faults (no library, one GPU raising,
a hung call) — the other GPUs are always still reported.

No GPU is available to the tests: every NVML answer here is one recorded on a real H100
(``tests/fixtures/hosts/h100-sxm5-vm/nvml.json``) or derived from it (``probe_replays.py`` says how).
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from typing import Any

import needs
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
        if "error" in entry and entry["error"].startswith("NVMLError_"):
            assert reading["errors"][name] == entry["error"]
            assert name not in reading["fields"] and name not in reading["unrecorded"]
        elif "error" in entry:  # the recorder's own exception: NVML was never asked
            assert reading["unrecorded"][name] == entry["error"]
            assert name not in reading["fields"] and name not in reading["errors"]
        else:
            assert reading["fields"][name] == entry["value"]
    assert reading["unrecorded"] == {"GpuFabricInfo": real["GpuFabricInfo"]["error"]}
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
    reader = nvml.LiveNvml(binding="pynvml")
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
    [reading] = nvml.LiveNvml(metrics=False, binding="pynvml").read()
    assert reading["status"] == "ok" and "Name" in reading["fields"]
    assert "nvmlDeviceGetTotalEnergyConsumption" not in called
    assert "nvmlDeviceGetUtilizationRates" not in called
    assert not set(reading["fields"]) & nvml.METRIC_FIELDS


def test_live_backend_isolates_a_raising_and_a_hung_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    data = multi_gpu(DGX_GPUS[:4])
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(data, hang=1, raise_on=2))
    start = time.monotonic()
    readings = nvml.LiveNvml(budget_s=1.0, binding="pynvml").read()
    assert time.monotonic() - start < 5
    assert [r["status"] for r in readings] == ["ok", "timeout", "ok", "ok"]
    assert [verdict(r, [])[0] for r in readings] == ["OK", "DEGRADED", "FAILED", "OK"]
    assert readings[3]["address"] == DGX_GPUS[3]


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _fake_library_source(device: dict[str, Any], driver: str) -> str:
    """C source of a ``libnvidia-ml.so.1`` stand-in answering each call with the recorded value or error."""
    from aifactory_core.probes.nvml_ctypes import ERROR_NAMES

    codes = {f"NVMLError_{name}": code for code, name in ERROR_NAMES.items()}
    messages = {entry["error"].split(": ", 1)[0]: entry["error"].split(": ", 1)[1]
                for entry in device.values() if isinstance(entry, dict) and "error" in entry}
    lines = ["#include <string.h>", "typedef unsigned long long ull;",
             "const char *nvmlErrorString(int c) { switch (c) {"]
    lines += [f"  case {codes[name]}: return {_c_string(text)};" for name, text in messages.items() if name in codes]
    lines += ["  default: return \"Unknown Error\"; } }",
              "int nvmlInit_v2(void) { return 0; }", "int nvmlShutdown(void) { return 0; }",
              "int nvmlSystemGetDriverVersion(char *b, unsigned n) "
              f"{{ strncpy(b, {_c_string(driver)}, n); return 0; }}",
              "int nvmlDeviceGetCount_v2(unsigned *c) { *c = 1; return 0; }",
              "int nvmlDeviceGetHandleByIndex_v2(unsigned i, void **h) { *h = (void *)0x1; return i ? 2 : 0; }",
              "struct pci { char legacy[16]; unsigned domain, bus, device, id, subsystem; char busid[32]; };",
              "struct mem { ull total, free, used; };", "struct util { unsigned gpu, memory; };"]

    def answer(name: str, body: str) -> str:
        entry = device[name]
        if "error" in entry:
            return f"return {codes.get(entry['error'].split(':')[0], 999)};"
        return body.format(v=entry["value"]) + " return 0;"

    for name in ("Name", "UUID", "Serial", "VbiosVersion"):
        function = {"Name": "nvmlDeviceGetName", "UUID": "nvmlDeviceGetUUID", "Serial": "nvmlDeviceGetSerial",
                    "VbiosVersion": "nvmlDeviceGetVbiosVersion"}[name]
        value = device[name].get("value", "")
        lines.append(f"int {function}(void *h, char *b, unsigned n) {{ "
                     + answer(name, f"strncpy(b, {_c_string(str(value))}, n);") + " }")
    pci = device["PciInfo"]["value"]
    lines.append("int nvmlDeviceGetPciInfo_v3(void *h, struct pci *p) { " + answer("PciInfo", (
        f"strcpy(p->legacy, {_c_string(pci['busIdLegacy'])}); p->domain = {pci['domain']}; p->bus = {pci['bus']};"
        f" p->device = {pci['device']}; p->id = {pci['pciDeviceId']}u; p->subsystem = {pci['pciSubSystemId']}u;"
        f" strcpy(p->busid, {_c_string(pci['busId'])});")) + " }")
    memory = device["MemoryInfo"]["value"]
    lines.append("int nvmlDeviceGetMemoryInfo(void *h, struct mem *m) { " + answer("MemoryInfo", (
        f"m->total = {memory['total']}ull; m->free = {memory['free']}ull; m->used = {memory['used']}ull;")) + " }")
    utilisation = device["UtilizationRates"]["value"]
    lines.append("int nvmlDeviceGetUtilizationRates(void *h, struct util *u) { " + answer("UtilizationRates", (
        f"u->gpu = {utilisation['gpu']}; u->memory = {utilisation['memory']};")) + " }")
    scalars = {"PowerUsage": ("nvmlDeviceGetPowerUsage", "unsigned"),
               "EnforcedPowerLimit": ("nvmlDeviceGetEnforcedPowerLimit", "unsigned"),
               "TotalEnergyConsumption": ("nvmlDeviceGetTotalEnergyConsumption", "ull"),
               "PerformanceState": ("nvmlDeviceGetPerformanceState", "int"),
               "NumaNodeId": ("nvmlDeviceGetNumaNodeId", "unsigned"),
               "CurrPcieLinkGeneration": ("nvmlDeviceGetCurrPcieLinkGeneration", "unsigned"),
               "CurrPcieLinkWidth": ("nvmlDeviceGetCurrPcieLinkWidth", "unsigned"),
               "MaxPcieLinkGeneration": ("nvmlDeviceGetMaxPcieLinkGeneration", "unsigned"),
               "MaxPcieLinkWidth": ("nvmlDeviceGetMaxPcieLinkWidth", "unsigned"),
               "PcieReplayCounter": ("nvmlDeviceGetPcieReplayCounter", "unsigned"),
               "RetiredPagesPendingStatus": ("nvmlDeviceGetRetiredPagesPendingStatus", "int"),
               "CurrentClocksThrottleReasons": ("nvmlDeviceGetCurrentClocksThrottleReasons", "ull")}
    for name, (function, kind) in scalars.items():
        lines.append(f"int {function}(void *h, {kind} *v) {{ " + answer(name, "*v = {v};") + " }")
    for name, function, kind, count in (("MigMode", "nvmlDeviceGetMigMode", "unsigned", 2),
                                        ("EccMode", "nvmlDeviceGetEccMode", "int", 2),
                                        ("RemappedRows", "nvmlDeviceGetRemappedRows", "unsigned", 4)):
        parameters = ", ".join(f"{kind} *v{index}" for index in range(count))
        values = device[name].get("value") or ["0"] * count
        body = " ".join(f"*v{index} = {int(values[index])};" for index in range(count))
        lines.append(f"int {function}(void *h, {parameters}) {{ " + answer(name, body) + " }")
    lines.append("int nvmlDeviceGetTemperature(void *h, int s, unsigned *v) { if (s != 0) return 2; "
                 + answer("Temperature", "*v = {v};") + " }")
    lines.append("int nvmlDeviceGetClockInfo(void *h, int t, unsigned *v) { "
                 + "if (t == 1) { " + answer("Clock_SM", "*v = {v};") + " } "
                 + "if (t == 2) { " + answer("Clock_MEM", "*v = {v};") + " } return 2; }")
    ecc = "int nvmlDeviceGetTotalEccErrors(void *h, int e, int c, ull *v) { "
    for name, (error_type, counter) in {"ECC_corr_vol": (0, 0), "ECC_corr_agg": (0, 1),
                                        "ECC_uncorr_vol": (1, 0), "ECC_uncorr_agg": (1, 1)}.items():
        ecc += f"if (e == {error_type} && c == {counter}) {{ " + answer(name, "*v = {v};") + " } "
    lines.append(ecc + "return 2; }")
    return "\n".join(lines) + "\n"


def test_ctypes_binding_against_a_library_built_from_the_recording(tmp_path: Path) -> None:
    """The ctypes binding reads every field exactly as the recording (made with pynvml) holds it.

    The library is a C stand-in compiled here whose every answer is the recorded value or error
    code of the real H100; the binding's structure layouts and signatures are those of nvml.h."""
    import subprocess

    compiler = needs.tool("cc", "gcc", hint="a C compiler builds the NVML stand-in")
    data = recording()
    device = data["devices"][0]
    source = tmp_path / "fake_nvml.c"
    source.write_text(_fake_library_source(device, data["driver"]["value"]))
    library = tmp_path / nvml.LIBRARY
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    reader = nvml.LiveNvml(library=str(library), binding="ctypes")
    [reading] = reader.read()
    assert reader.driver_version() == ("580.159.04", None)
    reader.close()
    assert reading["status"] == "ok" and reading["address"] == "0000:00:06.0"
    for name in nvml.LIVE_FIELDS:
        if "error" in device[name]:
            assert reading["errors"][name] == device[name]["error"], name
        else:
            assert reading["fields"][name] == device[name]["value"], name


FABRIC_C = """
struct fabric_v1 { unsigned char uuid[16]; int status; unsigned clique; unsigned state; };
struct fabric_v2 { unsigned version; unsigned char uuid[16]; int status; unsigned clique; unsigned state;
                   unsigned health; };
static const unsigned char UUID[16] = {%(uuid)s};
int nvmlInitWithFlags(unsigned flags) { return 0; }
"""
FABRIC_V2_C = """
int nvmlDeviceGetGpuFabricInfoV(void *h, struct fabric_v2 *f) {
  if (f->version != 0x02000024u) return 25; /* NVML_ERROR_ARGUMENT_VERSION_MISMATCH */
  memcpy(f->uuid, UUID, 16); f->status = %(status)d; f->clique = %(clique)d; f->state = %(state)d;
  f->health = %(health)d; return 0; }
"""
FABRIC_V1_C = """
int nvmlDeviceGetGpuFabricInfo(void *h, struct fabric_v1 *f) {
  memcpy(f->uuid, UUID, 16); f->status = %(status)d; f->clique = %(clique)d; f->state = %(state)d; return 0; }
"""
FABRIC_NOT_SUPPORTED_C = """
int nvmlDeviceGetGpuFabricInfoV(void *h, struct fabric_v2 *f) { return 3; }
"""


def _library_with_fabric(tmp_path: Path, *fabric_sources: str) -> tuple[Path, dict[str, Any]]:
    """The recording's C stand-in plus GPU fabric calls answering the SYNTHETIC DGX fabric values
    (``probe_replays.with_fabric_info``) in nvml.h's ``nvmlGpuFabricInfo[_v2]_t`` layouts."""
    import subprocess

    from probe_replays import with_fabric_info

    compiler = needs.tool("cc", "gcc", hint="a C compiler builds the NVML stand-in")
    data = recording()
    expected = with_fabric_info(data, state=3, status=0, clique=7)["devices"][0]["GpuFabricInfo"]["value"]
    expected["healthMask"] = 0x40
    values = {"uuid": ", ".join(str(byte) for byte in bytes.fromhex(expected["clusterUuid"].replace("-", ""))),
              "status": expected["status"], "clique": expected["cliqueId"], "state": expected["state"],
              "health": expected["healthMask"]}
    source = tmp_path / "fake_nvml.c"
    source.write_text(_fake_library_source(data["devices"][0], data["driver"]["value"])
                      + "".join(part % values for part in (FABRIC_C, *fabric_sources)))
    (tmp_path / "lib").mkdir()
    library = tmp_path / "lib" / nvml.LIBRARY
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library, expected


def _read_one(library: Path) -> dict[str, Any]:
    reader = nvml.LiveNvml(library=str(library), binding="ctypes")
    [reading] = reader.read()
    reader.close()
    return reading


def _other_fields_intact(reading: dict[str, Any]) -> None:
    device = recording()["devices"][0]
    for name in nvml.LIVE_FIELDS:
        if "error" in device[name]:
            assert reading["errors"][name] == device[name]["error"], name
        else:
            assert reading["fields"][name] == device[name]["value"], name


def test_ctypes_reads_versioned_gpu_fabric_info(tmp_path: Path) -> None:
    library, expected = _library_with_fabric(tmp_path, FABRIC_V2_C, FABRIC_V1_C)
    reading = _read_one(library)
    assert reading["fields"]["GpuFabricInfo"] == expected  # v2: version accepted, healthMask read
    _other_fields_intact(reading)


def test_ctypes_falls_back_to_unversioned_gpu_fabric_info(tmp_path: Path) -> None:
    library, expected = _library_with_fabric(tmp_path, FABRIC_V1_C)
    reading = _read_one(library)
    del expected["healthMask"]
    assert reading["fields"]["GpuFabricInfo"] == expected


def test_fabric_info_not_supported_spoils_nothing_else(tmp_path: Path) -> None:
    """A PCIe H100 without NVSwitch: the call answers NVML_ERROR_NOT_SUPPORTED (the stand-in's code
    3; the project's H100 capture holds no real answer to this call)."""
    from aifactory_core.probes.gpu import fabric_info

    library, _expected = _library_with_fabric(tmp_path, FABRIC_NOT_SUPPORTED_C)
    reading = _read_one(library)
    assert reading["errors"]["GpuFabricInfo"].startswith("NVMLError_NotSupported")
    assert "GpuFabricInfo" not in reading["fields"] and reading["status"] == "ok"
    _other_fields_intact(reading)
    assert fabric_info(reading)["FABRIC_INFO_STATE"] == "NOT_SUPPORTED"
    assert verdict(reading, [])[0] == "OK"


def test_real_pynvml_reads_gpu_fabric_info_through_the_same_code(tmp_path: Path) -> None:
    """The installed pynvml (its own ``c_nvmlGpuFabricInfoV_t``) over the same C stand-in, loaded
    by name through ``LD_LIBRARY_PATH`` in a child process, as pynvml loads the real library."""
    import json
    import os
    import subprocess

    pytest.importorskip("pynvml")
    library, expected = _library_with_fabric(tmp_path, FABRIC_V2_C)
    script = ("import json; from aifactory_core.probes import nvml; "
              "r = nvml.LiveNvml(binding='pynvml'); [x] = r.read(); r.close(); "
              "print(json.dumps([x['fields'].get('GpuFabricInfo'), x['errors'].get('GpuFabricInfo'), x['status']]))")
    env = {**os.environ, "LD_LIBRARY_PATH": str(library.parent)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    fields, error, status = json.loads(result.stdout)
    assert (fields, error, status) == (expected, None, "ok")


@pytest.mark.parametrize("content", ["[1, 2]", '{"devices": ["0000:00:06.0"]}', '{"devices": 3}'])
def test_a_recording_of_the_wrong_shape_is_refused_on_load(tmp_path: Path, content: str) -> None:
    """The probes' replay and the nvidia plugin share one loader: the wrong shape is one clear
    ValueError when the recording is opened, not an AttributeError half-way through a read."""
    path = tmp_path / "nvml.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="^not an nvml.json recording"):
        nvml.ReplayNvml(str(path))
