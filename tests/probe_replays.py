"""NVML recordings for the probe tests, all derived from the real H100 capture.

``tests/fixtures/hosts/h100-sxm5-vm/nvml.json`` is one H100 SXM5's NVML answers recorded on a real
host (value or error and latency of each call). The multi-GPU recordings below are *derived* from
it: the real device entry copied once per GPU of the DGX-shaped synthetic host, with that GPU's
PCI bus id and a distinct UUID/serial, and the fault under test written into one copy in the
recording's own format (an error string where a value was, a very long recorded latency).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

H100_NVML = Path(__file__).resolve().parent / "fixtures" / "hosts" / "h100-sxm5-vm" / "nvml.json"
DGX_GPUS = ["0000:1b:00.0", "0000:43:00.0", "0000:52:00.0", "0000:61:00.0",
            "0000:9d:00.0", "0000:c3:00.0", "0000:d1:00.0", "0000:df:00.0"]


def recording() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(H100_NVML.read_text())
    return data


def multi_gpu(addresses: list[str]) -> dict[str, Any]:
    """The real H100 entry once per address (bus id, UUID and serial made distinct)."""
    data = recording()
    real = data["devices"][0]
    devices = []
    for index, address in enumerate(addresses):
        device = copy.deepcopy(real)
        domain, bus, rest = address.split(":")
        device["PciInfo"]["value"]["busId"] = f"0000{domain}:{bus}:{rest}".upper()
        device["PciInfo"]["value"]["busIdLegacy"] = address.upper()
        device["PciInfo"]["value"]["bus"] = int(bus, 16)
        device["UUID"]["value"] = real["UUID"]["value"][:-2] + f"{index:02x}"
        device["Serial"]["value"] = str(int(real["Serial"]["value"]) + index)
        device["Index"]["value"] = index
        devices.append(device)
    data["devices"] = devices
    data["count"] = len(devices)
    return data


def write(data: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(data))
    return path


# NVSwitch fabric registration as nvmlDeviceGetGpuFabricInfoV reports it on an HGX/DGX H100 whose
# fabric manager has registered every GPU. SYNTHETIC: no such recording exists in the project (the
# real H100 capture is an SXM5 GPU passed alone into a VM, with no NVSwitch in sight, and its
# recorder called this function wrongly, so it holds a TypeError, not an answer).
# Field names and meanings are nvml.h's nvmlGpuFabricInfo_v2_t.
SYNTHETIC_CLUSTER_UUID = "5c0a7e3b-2f1d-4e6a-9b8c-1d2e3f405162"
SYNTHETIC_NOTE = ("SYNTHETIC: GpuFabricInfo entries are made up in nvml.h's nvmlGpuFabricInfo_v2_t layout; "
                  "every other entry is the real H100 SXM5 capture, copied per GPU")


def with_fabric_info(data: dict[str, Any], state: int = 3, status: int = 0, clique: int = 7) -> dict[str, Any]:
    """``data`` with a synthetic ``GpuFabricInfo`` answer on every GPU, labelled as synthetic."""
    data = copy.deepcopy(data)
    data["synthetic"] = SYNTHETIC_NOTE
    for device in data["devices"]:
        device["GpuFabricInfo"] = {"value": {"clusterUuid": SYNTHETIC_CLUSTER_UUID, "status": status,
                                             "cliqueId": clique, "state": state, "healthMask": 0}, "us": 20.0}
    return data
