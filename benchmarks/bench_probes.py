"""Whole-process wall time of the IM probe executables against ``python -c pass`` (same interpreter).

    .venv/bin/python benchmarks/bench_probes.py [--runs 20] [--host-root DIR] [--nvml-replay FILE]
        [--state-dir DIR] [--compare CHECKOUT]

Runs each command ``--runs`` times, interleaved (so load on the machine hits all of them alike),
and prints the medians and the median ratio probe / baseline. The probes run as OpenNebula runs
them (``<probe> kvm 0 <hostname>``, stdin from /dev/null), started with ``-S`` as their first line
says. Bytecode is compiled first, as a package install does (``pip install`` writes ``.pyc``).
Target on a machine without GPU: ratio <= 1.3.

``--compare CHECKOUT`` also times the probes of another source tree (e.g. ``git archive REV
aifactory_core drivers | tar -x -C DIR``), interleaved in the same run, so a change is judged
against its predecessor under the same load. ``--state-dir`` picks the state directory the probes
read (their GPU inventory cache, holders, quarantine); both trees share it.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROBES = {
    "host/system": REPO / "drivers/im/kvm-probes.d/host/system/aifactory-gpu",
    "vm/monitor": REPO / "drivers/im/kvm-probes.d/vm/monitor/aifactory-gpu",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--host-root", help="AIFACTORY_HOST_ROOT for the probes (default: this machine)")
    parser.add_argument("--nvml-replay", help="AIFACTORY_NVML_REPLAY for the probes")
    parser.add_argument("--state-dir", help="AIFACTORY_STATE_DIR for the probes (default: a scratch dir)")
    parser.add_argument("--compare", type=Path, help="another checkout whose probes are timed alongside")
    args = parser.parse_args()
    checkouts = {"": REPO} | ({f" @{args.compare.name}": args.compare} if args.compare else {})
    for checkout in checkouts.values():
        compileall.compile_dir(str(checkout / "aifactory_core"), quiet=1)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    if args.host_root:
        env["AIFACTORY_HOST_ROOT"] = args.host_root
    if args.nvml_replay:
        env["AIFACTORY_NVML_REPLAY"] = args.nvml_replay
    env["AIFACTORY_STATE_DIR"] = args.state_dir or env.get("AIFACTORY_STATE_DIR", "/tmp/aifactory-bench-state")
    commands = {"python -c pass": [sys.executable, "-c", "pass"]}
    for suffix, checkout in checkouts.items():
        for name, path in PROBES.items():
            probe = checkout / path.relative_to(REPO)
            commands[name + suffix] = [sys.executable, "-S", str(probe), "kvm", "0", "bench"]
    times: dict[str, list[float]] = {name: [] for name in commands}
    for name, command in commands.items():  # warm-up and exit-status check
        result = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if result.returncode != 0 or result.stderr:
            print(f"{name}: exit {result.returncode}, stderr {result.stderr[:200]!r}")
            return 1
    for _ in range(args.runs):
        for name, command in commands.items():
            start = time.perf_counter()
            subprocess.run(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - start)
    baseline = statistics.median(times["python -c pass"])
    print(f"interpreter: {sys.executable} ({sys.version.split()[0]}), runs: {args.runs}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:24s} median {median * 1000:7.2f} ms  min {min(samples) * 1000:7.2f} ms  "
              f"ratio {median / baseline:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
