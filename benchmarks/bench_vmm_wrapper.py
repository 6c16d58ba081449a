"""The VMM wrapper's cost for a VM without devices: whole-process wall time against the unwrapped action.

    .venv/bin/python benchmarks/bench_vmm_wrapper.py [--runs 40] [--compare CHECKOUT]

Sets up a scratch host: the bundled H100 capture as host root, VM 42's directory in it with a
``vm.xml`` that lists no PCI device or NIC, an empty state directory, the configuration
``install.sh`` writes, and for each action a stand-in original (``<action>.one``: ``#!/bin/sh``,
``exit 0``). Then times, interleaved round by round (so load on the machine hits all alike):

- ``python -c pass`` (this interpreter, which the wrappers also run: ``AIFACTORY_PYTHON``);
- each original alone, with OpenNebula's argv and stdin;
- each wrapper (``drivers/vmm/kvm/<action>``) around it: ``deploy`` with a domain without
  ``<hostdev>`` (the synthesized deployment file with its hostdevs, vCPU pins and comment
  removed) on stdin, ``shutdown`` and ``cancel`` with the driver action data.

Prints medians, the wrapper's overhead (median wrapper - median original) in ms and as a ratio to
``python -c pass``, and which path each wrapper took (:func:`aifactory_core.vmm_fast.full_path_reason`;
a deploy on the full path would also leave a journal, which is checked). Target: overhead <= 3x
``python -c pass``. Bytecode is compiled first, as ``pip install`` does.

``--compare CHECKOUT`` also times another source tree's wrappers, interleaved in the same run, with
``PYTHONPATH`` pointing at that tree (e.g. ``git worktree add /tmp/before <rev>``): the figure
before a change, under the same load.
"""

from __future__ import annotations

import argparse
import compileall
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "tests" / "fixtures" / "opennebula" / "samples" / "synthesized"
VM_DIR = "/var/lib/one//datastores/0/42"
ACTION_DATA = b"<VMM_DRIVER_ACTION_DATA><HOST>gpu-node-01</HOST></VMM_DRIVER_ACTION_DATA>"
ARGV = {
    "deploy": [f"{VM_DIR}/deployment.0", "gpu-node-01", "42", "gpu-node-01"],
    "shutdown": ["6f1c2c1e-5d0a-4d43-9a53-7d0c6f1b2a42", "gpu-node-01", "42", "gpu-node-01"],
    "cancel": ["6f1c2c1e-5d0a-4d43-9a53-7d0c6f1b2a42", "gpu-node-01", "42", "gpu-node-01"],
}


def deviceless_domain() -> bytes:
    """The synthesized deployment file without its comment, hostdevs and vCPU pins."""
    text = (SAMPLES / "deployment.0.xml").read_text()
    text = re.sub(r"<!--.*?-->\s*", "", text, flags=re.S)
    text = re.sub(r"\s*<hostdev .*?</hostdev>", "", text, flags=re.S)
    text = re.sub(r"\s*<vcpupin [^>]*/>", "", text)
    return text.encode()


def deviceless_vm() -> bytes:
    """The synthesized ``<VM>`` of VM 42 without its PCI devices and NIC."""
    text = (SAMPLES / "vm_gpu_pinned.xml").read_text()
    text = re.sub(r"<!--.*?-->\s*", "", text, flags=re.S)
    return re.sub(r"\s*<PCI>.*?</PCI>", "", text, flags=re.S).encode()


def scratch_host(top: Path) -> dict[str, str]:
    """The scratch host under ``top``; returns the environment the actions run with."""
    from aifactory_core.install.manifest import DEFAULT_CONFIG
    from aifactory_core.samples import extract_sample

    root = top / "root"
    shutil.copytree(extract_sample("h100-sxm5-vm"), root, symlinks=True)
    vm_dir = root / VM_DIR.lstrip("/").replace("//", "/")
    vm_dir.mkdir(parents=True)
    (vm_dir / "vm.xml").write_bytes(deviceless_vm())
    (top / "domain.xml").write_bytes(deviceless_domain())
    (top / "action_data.xml").write_bytes(ACTION_DATA)
    (top / "aifactory.conf").write_text(DEFAULT_CONFIG)
    remotes = top / "remotes"
    remotes.mkdir()
    for action in ARGV:
        original = remotes / f"{action}.one"
        original.write_text("#!/bin/sh\nexit 0\n")
        original.chmod(0o755)
    (top / "state").mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env.update(AIFACTORY_PYTHON=sys.executable, AIFACTORY_HOST_ROOT=str(root), AIFACTORY_STATE_DIR=str(top / "state"),
               AIFACTORY_CONFIG=str(top / "aifactory.conf"), AIFACTORY_VMM_ORIGINAL_DIR=str(remotes))
    return env


def which_path(env: dict[str, str], action: str, domain: bytes) -> str:
    """The path this tree's wrapper takes for ``action``, decided as the wrapper decides it."""
    from aifactory_core import vmm_fast

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        reason = vmm_fast.full_path_reason(action, ARGV[action], domain if action == "deploy" else None)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return "fast path" if reason is None else f"full path: {reason}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--compare", type=Path, help="another checkout whose wrappers are timed alongside")
    args = parser.parse_args()
    checkouts = {"": REPO} | ({f" @{args.compare.name}": args.compare.resolve()} if args.compare else {})
    for checkout in checkouts.values():
        compileall.compile_dir(str(checkout / "aifactory_core"), quiet=1)
        compileall.compile_dir(str(checkout / "plugins" / "aifactory_plugins"), quiet=1)
    with tempfile.TemporaryDirectory(prefix="aifactory-bench-vmm-") as scratch:
        top = Path(scratch)
        env = scratch_host(top)
        stdin_of = {"deploy": top / "domain.xml", "shutdown": top / "action_data.xml",
                    "cancel": top / "action_data.xml"}
        commands: dict[str, tuple[list[str], Path | None, dict[str, str]]] = {
            "python -c pass": ([sys.executable, "-c", "pass"], None, env)}
        for action, argv in ARGV.items():
            commands[f"{action} original"] = ([str(top / "remotes" / f"{action}.one"), *argv], stdin_of[action], env)
            for suffix, checkout in checkouts.items():
                tree_env = env if checkout == REPO else {
                    **env, "PYTHONPATH": f"{checkout}{os.pathsep}{checkout / 'plugins'}"}
                wrapper = checkout / "drivers" / "vmm" / "kvm" / action
                commands[f"{action} wrapped{suffix}"] = ([str(wrapper), *argv], stdin_of[action], tree_env)

        def run(command: list[str], stdin: Path | None, run_env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
            with open(stdin or os.devnull, "rb") as stream:
                return subprocess.run(command, env=run_env, stdin=stream, capture_output=True, check=False)

        for name, (command, stdin, run_env) in commands.items():  # warm-up and exit-status check
            result = run(command, stdin, run_env)
            if result.returncode != 0 or result.stderr:
                print(f"{name}: exit {result.returncode}, stderr {result.stderr[:300]!r}")
                return 1
            shutil.rmtree(top / "state")  # a full-path deploy journals the VM: the next run starts clean
            (top / "state").mkdir()
        times: dict[str, list[float]] = {name: [] for name in commands}
        journals = 0
        for _ in range(args.runs):
            for name, (command, stdin, run_env) in commands.items():
                start = time.perf_counter()
                result = run(command, stdin, run_env)
                times[name].append(time.perf_counter() - start)
                if result.returncode != 0:
                    print(f"{name}: exit {result.returncode}")
                    return 1
                if name == "deploy wrapped" and (top / "state" / "vms" / "42.json").exists():
                    journals += 1
                shutil.rmtree(top / "state")
                (top / "state").mkdir()
        baseline = statistics.median(times["python -c pass"])
        domain = (top / "domain.xml").read_bytes()
        print(f"interpreter: {sys.executable} ({sys.version.split()[0]}), runs: {args.runs}, "
              f"load average: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
        for name, samples in times.items():
            median = statistics.median(samples)
            line = (f"{name:36s} median {median * 1000:7.1f} ms  min {min(samples) * 1000:7.1f} ms  "
                    f"x pass {median / baseline:5.2f}")
            action = name.split()[0]
            if " wrapped" in name:
                overhead = median - statistics.median(times[f"{action} original"])
                line += f"  overhead {overhead * 1000:6.1f} ms = {overhead / baseline:5.2f}x pass"
            print(line)
        for action in ARGV:
            print(f"{action}: {which_path(env, action, domain)}")
        if journals:
            print(f"deploy wrapped left a journal in {journals} of {args.runs} runs: it took the full path")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
