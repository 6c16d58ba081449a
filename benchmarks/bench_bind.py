"""Bind + release of N PCI functions: aifactory's transaction vs Debian's driverctl, same boot.

    .venv/bin/python benchmarks/bench_bind.py            # boots the real-kernel test host (QEMU/TCG)

In the guest: the e1000e and the NVMe controller (QEMU's NVMe VFs are left out: without the
PF's secondary-controller setup the nvme driver's asynchronous probe of a VF fails at random, which
would time the emulator, not the tools). Each round moves every device to
vfio-pci and back; three ways, interleaved round by round:
- ``aifactory (library)``: one process, ``executor.prepare`` + ``executor.release`` (journaled,
  fsynced, ownership locks, group closure) — the cost of the transaction itself;
- ``aifactory (process per event)``: ``python -m aifactory_core.cli device bind ...`` then
  ``device release`` — what a deploy/cancel pair costs, Python start-up included;
- ``driverctl``: ``driverctl --nosave set-override DEV vfio-pci`` then ``unset-override`` per device.
Prints medians and the ratios against driverctl. Times under TCG are far slower than on hardware;
only the ratios carry over.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUNDS = 5
REPO = Path(__file__).resolve().parent.parent


def _wait(check: object, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def _in_guest() -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from testhost.guest import PCI, driver_of, find_pci, modprobe, wait_for

    from aifactory_core.hostroot import HostRoot
    from aifactory_core.lifecycle import executor
    from aifactory_core.model import Action

    modprobe("vfio-pci", "nvme")
    nic = find_pci("0x8086", "0x10d3")[0]
    pf = next(b for b in find_pci("0x1b36", class_prefix="0x0108") if (PCI / b / "sriov_totalvfs").exists())
    wait_for(lambda: driver_of(pf) == "nvme", "nvme")
    devices = [nic, pf]
    original = {device: driver_of(device) for device in devices}
    state = Path(tempfile.mkdtemp())
    host = HostRoot(Path("/"), state)
    env = {**os.environ, "AIFACTORY_STATE_DIR": str(state), "AIFACTORY_CONFIG": os.devnull}
    cli = [sys.executable, "-m", "aifactory_core.cli"]

    def library() -> None:
        actions = [Action("pci_driver", d, "vfio-pci", original[d] or "", "bench") for d in devices]
        executor.prepare(host, 1, actions)
        executor.release(host, 1)

    def per_process() -> None:
        subprocess.run([*cli, "device", "bind", *devices, "--vm", "2"], env=env, check=True, capture_output=True)
        subprocess.run([*cli, "device", "release", devices[0]], env=env, check=True, capture_output=True)

    def driverctl() -> None:
        for device in devices:
            subprocess.run(["driverctl", "--nosave", "set-override", device, "vfio-pci"], check=True)
        for device in devices:
            subprocess.run(["driverctl", "--nosave", "unset-override", device], check=True)

    ways = {"aifactory (library)": library, "aifactory (process per event)": per_process, "driverctl": driverctl}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _round in range(ROUNDS):
        for name, way in ways.items():
            start = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - start)
            # nvme binds asynchronously: let every device settle (untimed) before the next way
            settled = all(_wait(lambda d=d: driver_of(d) == original[d]) for d in devices)
            now = {d: driver_of(d) for d in devices}
            from aifactory_core.host.sanitize import quarantined

            assert settled, f"{name} did not restore the drivers: {now} != {original}; {quarantined(host)}"
    base = statistics.median(times["driverctl"])
    print(f"bind+release of {len(devices)} devices, {ROUNDS} rounds, medians (QEMU/TCG guest):")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:32s} {median:7.3f} s   ratio vs driverctl {median / base:5.2f}x")
    return 0


def main() -> int:
    if os.environ.get("AIFACTORY_IN_TESTHOST") == "1":
        return _in_guest()
    sys.path.insert(0, str(REPO / "tests"))
    from testhost.config import DEFAULT_GUEST
    from testhost.runner import GuestJob, run

    job = GuestJob(argv=(sys.executable, str(Path(__file__).resolve())), cwd=REPO,
                   env=(("AIFACTORY_IN_TESTHOST", "1"), ("PYTHONPATH", str(REPO))), timeout_s=900)
    result = run(DEFAULT_GUEST, job)
    lines = result.console.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("bind+release")), None)
    print("\n".join(lines[start:start + 4]) if start is not None else result.console_tail())
    return 0 if result.rc == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
