#!/bin/sh
# Read-only GPU check for the passthrough path, for a machine with a real NVIDIA GPU.
# Reads, for every NVIDIA GPU: what NVML says (MIG, persistence, running processes), which
# processes hold /dev/nvidiaN, its reset method and the sysfs writes a bind would make (dry run).
# It never unbinds, resets or reconfigures anything.
#   sh benchmarks/h100_vfio_check.sh
set -eu
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/plugins${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY'
import os
from pathlib import Path

from aifactory_core.hostroot import HostRoot
from aifactory_core.host.pcibind import RecordingWriter, PciBinder
from aifactory_plugins.nvidia_state import gpu_state

host = HostRoot(Path("/"))
for device in sorted(os.listdir("/sys/bus/pci/devices")):
    base = Path("/sys/bus/pci/devices", device)
    if (base / "vendor").read_text().strip() != "0x10de" or not (base / "class").read_text().startswith("0x03"):
        continue
    state = gpu_state(host, device)
    reset = (base / "reset_method").read_text().strip() if (base / "reset_method").exists() else "-"
    driver = os.path.basename(os.readlink(base / "driver")) if (base / "driver").exists() else "-"
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/nvidia") for fd in os.listdir(f"/proc/{pid}/fd")):
                holders.append(f"{Path('/proc', pid, 'comm').read_text().strip()}[{pid}]")
        except OSError:
            continue
    print(f"{device}: driver={driver} reset_method={reset} nvml={state}")
    print(f"  /dev/nvidia* holders: {' '.join(holders) or 'none'}")
    recorder = RecordingWriter()
    PciBinder(host, recorder).set_driver(device, "vfio-pci")
    for write in recorder.writes:
        print(f"  would write {write.value.strip()!r} to {write.path} ({write.why})")
PY
