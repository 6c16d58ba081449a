"""Configuring every VF netdevsim allows (64): aifactory's path vs an ``ip link set`` loop, same boot.

    .venv/bin/python benchmarks/bench_vf_config.py       # boots the real-kernel test host (QEMU/TCG)

In the guest, one netdevsim PF with 64 VFs; each VF gets MAC, VLAN + QoS, spoof-check, trust,
max TX rate and link state, then is scrubbed back to the clean state. Three ways, interleaved
round by round:
- ``aifactory (transaction)``: ``executor.prepare`` of 64 journaled ``vf_config`` actions (owner
  token, one RTM_SETLINK, read back over netlink per VF) + ``executor.release`` (scrub + verify);
- ``aifactory (netlink only)``: ``netlink_vf.apply`` + ``verify`` and ``scrub`` per VF, no journal;
- ``ip link set``: one ``ip link set PF vf N mac .. vlan .. qos .. spoofchk .. trust .. max_tx_rate
  .. state ..`` process per VF to configure, one per VF to clean, no read-back.
Prints the median time per VF (configure + clean) and the ratios against the ``ip`` loop. Times
under TCG are far slower than on hardware; only the ratios carry over.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUNDS = 3
VFS = 64
REPO = Path(__file__).resolve().parent.parent


def _in_guest() -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from testhost import ENV_NETDEVSIM
    from testhost.guest import modprobe, read, sh, wait_for, write

    from aifactory_core.host import netlink_vf, sriov
    from aifactory_core.host.pcibind import SysfsWriter
    from aifactory_core.hostroot import HostRoot
    from aifactory_core.lifecycle import executor
    from aifactory_core.vnm import vf as vf_actions

    if not Path("/sys/bus/netdevsim").exists():
        modprobe("psample")
        sh("insmod", os.environ[ENV_NETDEVSIM])
    if not Path("/sys/kernel/debug/netdevsim").exists():
        subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], check=False)
    write("/sys/bus/netdevsim/new_device", "77 1")
    dev = Path("/sys/bus/netdevsim/devices/netdevsim77")
    net = wait_for(lambda: (dev / "net").exists() and sorted((dev / "net").iterdir()), "netdevsim netdev")
    write("/sys/kernel/debug/netdevsim/netdevsim77/max_vfs", str(VFS))
    name, index = net[0].name, int(read(net[0] / "ifindex"))
    host = HostRoot(Path("/"), Path(tempfile.mkdtemp()) / "state")
    sriov.set_pool_size(host, sriov.pf_by_netdev(host, name), VFS, SysfsWriter())
    ipr = netlink_vf.open_netlink()
    wanted = [netlink_vf.settings(mac=f"02:00:00:00:{vf:02x}:01", vlan=100 + vf, qos=vf % 8, spoofchk=False,
                                  trust=True, max_tx_rate=1000, link_state="enable") for vf in range(VFS)]

    def transaction() -> None:
        executor.prepare(host, 5, [vf_actions.action(name, vf, 5, s) for vf, s in enumerate(wanted)])
        executor.release(host, 5)

    def netlink_only() -> None:
        for vf, s in enumerate(wanted):
            netlink_vf.apply(ipr, index, vf, s, pool_size=VFS)
            netlink_vf.verify(ipr, index, vf, s)
        for vf in range(VFS):
            netlink_vf.scrub(ipr, index, vf)

    def ip_loop() -> None:
        for vf, s in enumerate(wanted):
            subprocess.run(["ip", "link", "set", name, "vf", str(vf), "mac", s.mac, "vlan", str(s.vlan), "qos",
                            str(s.qos), "spoofchk", "off", "trust", "on", "max_tx_rate", "1000", "state", "enable"],
                           check=True)
        for vf in range(VFS):
            subprocess.run(["ip", "link", "set", name, "vf", str(vf), "mac", "00:00:00:00:00:00", "vlan", "0",
                            "qos", "0", "spoofchk", "on", "trust", "off", "min_tx_rate", "0", "max_tx_rate", "0",
                            "state", "auto"], check=True)

    ways = {"aifactory (transaction)": transaction, "aifactory (netlink only)": netlink_only, "ip link set": ip_loop}
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(ROUNDS):
        for way, run in ways.items():
            start = time.perf_counter()
            run()
            times[way].append((time.perf_counter() - start) / VFS)
            assert all(s == netlink_vf.CLEAN for s in netlink_vf.read_vfs(ipr, index).values()), way
    base = statistics.median(times["ip link set"])
    print(f"vf-config: {VFS} VFs of netdevsim, configure + clean, median of {ROUNDS} rounds, per VF")
    for way, values in times.items():
        median = statistics.median(values)
        print(f"vf-config: {way:26s} {median * 1000:8.2f} ms/VF  ratio {median / base:5.2f}x")
    write("/sys/bus/netdevsim/del_device", "77")
    return 0


def main() -> int:
    if os.environ.get("AIFACTORY_IN_TESTHOST") == "1":
        return _in_guest()
    sys.path.insert(0, str(REPO / "tests"))
    from testhost import ENV_NETDEVSIM
    from testhost.config import DEFAULT_GUEST, find_kernel_version, netdevsim_path
    from testhost.runner import GuestJob, run

    kver = find_kernel_version() or ""
    job = GuestJob(argv=(sys.executable, str(Path(__file__).resolve())), cwd=REPO,
                   env=(("AIFACTORY_IN_TESTHOST", "1"), ("PYTHONPATH", str(REPO)),
                        (ENV_NETDEVSIM, str(netdevsim_path(kver)))), timeout_s=900)
    result = run(DEFAULT_GUEST, job)
    lines = [line for line in result.console.splitlines() if line.startswith("vf-config:")]
    print("\n".join(lines) if lines else result.console_tail())
    return 0 if result.rc == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
