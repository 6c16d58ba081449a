"""Whole-process wall and CPU time of the IM probe executables against ``python -c pass`` (same
interpreter).

    .venv/bin/python benchmarks/bench_probes.py [--runs 20] [--host-root DIR] [--nvml-replay FILE]
        [--state-dir DIR] [--compare CHECKOUT]

Runs each command ``--runs`` times, interleaved (so load on the machine hits all of them alike),
and prints the medians and the median ratio probe / baseline, of wall time and of CPU time (user +
system, from ``wait4``: on a shared, loaded machine the wall time mostly measures the others). The
probes run as OpenNebula runs them (``<probe> kvm 0 <hostname>``, stdin from /dev/null), started
with ``-S`` as their first line says. Bytecode is compiled first, as a package install does
(``pip install`` writes ``.pyc``).
Target on a machine without GPU: ratio <= 1.3, with the example vendor plugin installed
(``pip install --no-deps ./plugins/examples/aifactory-example-accel``): the probes then find and
run its ``aifactory.probes`` module every run. The probe plugins found are printed first.

``--installed`` also times each probe with ``site`` on (this environment's python without ``-S``,
the checkout first on ``PYTHONPATH``), for comparison: ``install.sh`` keeps ``-S``, the probes then
adding the site-packages of their interpreter's virtual environment themselves (its ``pyvenv.cfg``),
so ``--python`` an environment made as the installer makes it, with the suite and the example
plugin pip-installed, times the probes as installed, plugin included.

``--discovery`` also times, in one process of this interpreter (site on), the three
ways of finding the probe plugins (``aifactory_core.probes.plugins``):
``importlib.metadata`` (import and ``entry_points(group=...)``), the probe's own scan of the
``*.dist-info`` directories, and its cached answer (one ``stat`` per ``sys.path`` directory).

``--install-dir DIR`` times the probes as ``install.sh`` installs them, with the example vendor
plugin and without it, in the same run: ``install.sh --destdir DIR/example --no-hooks
--with-example-plugin`` and ``install.sh --destdir DIR/plain --no-hooks`` stage both (each once;
delete DIR to stage again), and each staged tree's probes run with its hosts' environment
interpreter, ``-S`` as their first line says, the suite and the plugin coming from that environment
as on a host. The baseline is ``python -c pass`` of the example tree's interpreter. Without
``--host-root`` the probes read ``tests/fixtures/topologies/accel-node.json`` written by the
generator (an H100 on vfio-pci, the plugin's Gaudi2 accelerator, no NVML), so the plugin has a
device to report; the run stops unless the example tree's host/system probe reports it.

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
# Where install.sh puts the hosts' environment and the probes, under its --destdir.
STAGED_REMOTES = Path("var/lib/one/remotes")
STAGED_PYTHON = STAGED_REMOTES / "aifactory/venv/bin/python3"
ACCEL_TOPOLOGY = REPO / "tests/fixtures/topologies/accel-node.json"


def stage(dest: Path, example: bool) -> Path:
    """``install.sh --destdir dest --no-hooks [--with-example-plugin]``, once (kept for later runs)."""
    if not (dest / STAGED_PYTHON).exists():
        argv = ["sh", str(REPO / "install.sh"), "--destdir", str(dest), "--no-hooks"]
        env = {key: value for key, value in os.environ.items() if key not in ("DESTDIR", "PYTHONPATH")}
        done = subprocess.run(argv + (["--with-example-plugin"] if example else []), env=env,
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"install.sh --destdir {dest} failed ({done.returncode}): {done.stderr.strip()}")
    return dest


def staged_probe(tree: Path, probe: Path) -> Path:
    """The staged copy of one of the checkout's probe executables."""
    return tree / STAGED_REMOTES / "im" / probe.relative_to(REPO / "drivers/im")


_PATH = """
import sys
sys.path.insert(0, {repo!r})
from aifactory_core.probes.sysfs import Root
from aifactory_core.probes import plugins
root = Root.from_environment()
"""
DISCOVER = _PATH + """
print(",".join(f"{{name}}={{module}}" for name, module in plugins.discover(root)))
"""
TIME_DISCOVERY = _PATH + """
import time
def best(function, rounds=50):
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return min(samples) * 1000, sorted(samples)[len(samples) // 2] * 1000
directories = plugins._path_dirs()
plugins.discover(root)  # the cache is written
for label, function in (("cached discover", lambda: plugins.discover(root)),
                        ("scan of dist-info", lambda: plugins.scan(directories))):
    low, median = best(function)
    print(f"{{label:24s}} median {{median:7.3f}} ms  min {{low:7.3f}} ms")
start = time.perf_counter()
import importlib.metadata
imported = time.perf_counter()
points = [point.value for point in importlib.metadata.entry_points(group=plugins.GROUP)]
done = time.perf_counter()
print(f"{{'importlib.metadata':24s}} import {{(imported - start) * 1000:7.3f}} ms + entry_points "
      f"{{(done - imported) * 1000:7.3f}} ms (first call, as in a probe run): {{points}}")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--host-root", help="AIFACTORY_HOST_ROOT for the probes (default: this machine)")
    parser.add_argument("--nvml-replay", help="AIFACTORY_NVML_REPLAY for the probes")
    parser.add_argument("--state-dir", help="AIFACTORY_STATE_DIR for the probes (default: a scratch dir)")
    parser.add_argument("--compare", type=Path, help="another checkout whose probes are timed alongside")
    parser.add_argument("--discovery", action="store_true", help="also time the ways of finding probe plugins")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for every command (default: this one), e.g. an environment made "
                             "as install.sh makes it, with the suite and the example plugin pip-installed")
    parser.add_argument("--install-dir", type=Path,
                        help="stage install.sh with and without the example plugin here and time both trees' probes")
    parser.add_argument("--installed", action="store_true",
                        help="also time the probes with site on (this environment's python without -S)")
    args = parser.parse_args()
    if args.install_dir and (args.compare or args.installed or args.python != sys.executable):
        parser.error("--install-dir times the staged trees with their own interpreter: "
                     "not with --compare, --installed or --python")
    python = args.python
    checkouts = {"": REPO} | ({f" @{args.compare.name}": args.compare} if args.compare else {})
    for checkout in checkouts.values():
        compileall.compile_dir(str(checkout / "aifactory_core"), quiet=1)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    staged: dict[str, Path] = {}
    if args.install_dir:
        staged = {" (example plugin)": stage(args.install_dir / "example", True),
                  " (no plugin)": stage(args.install_dir / "plain", False)}
        python = str(staged[" (example plugin)"] / STAGED_PYTHON)
        if not args.host_root:
            accel_root = args.install_dir / "accel-node-root"
            if not accel_root.exists():
                subprocess.run([sys.executable, str(REPO / "tests/fixtures/hostgen.py"), str(ACCEL_TOPOLOGY),
                                str(accel_root)], check=True)
            args.host_root = str(accel_root)
    if args.host_root:
        env["AIFACTORY_HOST_ROOT"] = args.host_root
    if args.nvml_replay:
        env["AIFACTORY_NVML_REPLAY"] = args.nvml_replay
    env["AIFACTORY_STATE_DIR"] = args.state_dir or env.get("AIFACTORY_STATE_DIR", "/tmp/aifactory-bench-state")
    commands = {"python -c pass": [python, "-c", "pass"]}
    envs: dict[str, dict[str, str]] = {}
    for suffix, checkout in checkouts.items() if not staged else ():  # --install-dir: the staged trees only
        for name, path in PROBES.items():
            probe = checkout / path.relative_to(REPO)
            commands[name + suffix] = [python, "-S", str(probe), "kvm", "0", "bench"]
            if args.installed:  # site on: the environment applied by site (install.sh keeps -S)
                commands[f"{name} site{suffix}"] = [python, str(probe), "kvm", "0", "bench"]
                # its own state directory: its sys.path differs from the -S form's, and so does the
                # key of the probe-plugin cache, which the two forms would otherwise replace in turn
                envs[f"{name} site{suffix}"] = env | {"PYTHONPATH": str(checkout),
                                                           "AIFACTORY_STATE_DIR": env["AIFACTORY_STATE_DIR"] + "-site"}
    for index, (suffix, tree) in enumerate(staged.items()):
        for name, path in PROBES.items():
            commands[name + suffix] = [str(tree / STAGED_PYTHON), "-S", str(staged_probe(tree, path)), "kvm", "0",
                                       "bench"]
            # a state directory per tree: their sys.path differs, and so does the probe-plugin
            # cache's key, which the two trees would otherwise replace in turn every run
            envs[name + suffix] = env | {"AIFACTORY_STATE_DIR": f"{env['AIFACTORY_STATE_DIR']}-staged{index}"}
    if staged:
        reported = subprocess.run(commands["host/system (example plugin)"], env=envs["host/system (example plugin)"],
                                  stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, check=False).stdout.splitlines()
        plugins_line = next((line for line in reported if line.startswith("AIF_PROBE_PLUGINS=")), "(none)")
        devices = [line[:160] for line in reported if line.startswith("AIF_DEVICE=[ PLUGIN=")]
        print(f"staged probe with the example plugin: {plugins_line}; {len(devices)} device(s)")
        for line in devices:
            print(f"  {line}...")
        if plugins_line != 'AIF_PROBE_PLUGINS="example_accel"' or not devices:
            print("the staged probe did not run the example plugin on a device: nothing to measure")
            return 1
    found = subprocess.run([python, "-c", DISCOVER.format(repo=str(REPO))], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    print(f"probe plugins found: {found or 'none'}")
    if args.discovery:
        print(subprocess.run([python, "-c", TIME_DISCOVERY.format(repo=str(REPO))], env=env,
                             capture_output=True, text=True, check=True).stdout, end="")
    times: dict[str, list[float]] = {name: [] for name in commands}
    for name, command in commands.items():  # warm-up and exit-status check
        result = subprocess.run(command, env=envs.get(name, env), stdin=subprocess.DEVNULL, capture_output=True,
                                check=False)
        if result.returncode != 0 or result.stderr:
            print(f"{name}: exit {result.returncode}, stderr {result.stderr[:200]!r}")
            return 1
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, command in commands.items():
            start = time.perf_counter()
            process = subprocess.Popen(command, env=envs.get(name, env), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL)
            _pid, status, usage = os.wait4(process.pid, 0)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(usage.ru_utime + usage.ru_stime)
            process.returncode = os.waitstatus_to_exitcode(status)
            if process.returncode != 0:
                print(f"{name}: exit {process.returncode}")
                return 1
    baseline = statistics.median(times["python -c pass"])
    cpu_baseline = statistics.median(cpu["python -c pass"])
    print(f"interpreter: {python}, runs: {args.runs}")
    for name, samples in times.items():
        median = statistics.median(samples)
        cpu_median = statistics.median(cpu[name])
        print(f"{name:32s} wall median {median * 1000:7.2f} ms  min {min(samples) * 1000:7.2f} ms  "
              f"ratio {median / baseline:5.2f}   CPU median {cpu_median * 1000:6.2f} ms  "
              f"ratio {cpu_median / cpu_baseline:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
