#!/usr/bin/env bash
# On a GPU host (read-only: never unbinds, resets or reconfigures anything; the probes' state goes
# to a temporary directory): the installed probes' output next to nvidia-smi for the same fields,
# values compared; then whole-process wall time of the host/system and vm/monitor probes against
# `nvidia-smi --query-gpu=<same fields> --format=csv`, 20 runs each, interleaved, median ratio.
#
#   bash benchmarks/h100_probe_check.sh [PYNVML_DIR]
#
# PYNVML_DIR: a directory holding pynvml.py (nvidia-ml-py); default: this checkout's venv copy,
# carried to the device machine with carry=[".venv/lib/python3.11/site-packages/pynvml.py"].
# Exit 0 when every compared field agrees, 1 otherwise.
set -u
cd "$(dirname "$0")/.." || exit 2
PYNVML_DIR=${1:-.venv/lib/python3.11/site-packages}
PYTHON=${PYTHON:-python3}
STATE=$(mktemp -d)
trap 'rm -rf "$STATE"' EXIT
export AIFACTORY_STATE_DIR="$STATE" PYTHONPATH="$PWD/$PYNVML_DIR" PYTHONDONTWRITEBYTECODE=
unset AIFACTORY_HOST_ROOT AIFACTORY_NVML_REPLAY
FIELDS=uuid,name,pci.bus_id,serial,vbios_version,memory.total,mig.mode.current,ecc.mode.current,ecc.errors.corrected.aggregate.total,ecc.errors.uncorrected.volatile.total,pcie.link.gen.max,pcie.link.width.max,temperature.gpu,power.draw,clocks.sm,clocks.mem
echo "== host: $(hostname) kernel $(uname -r); $($PYTHON --version); nvidia-smi $(nvidia-smi --version 2>/dev/null | head -1)"
nvidia-smi -L
$PYTHON -m compileall -q aifactory_core >/dev/null
$PYTHON - "$FIELDS" <<'PY'
import csv, io, os, statistics, subprocess, sys, time
sys.path.insert(0, os.getcwd())
from aifactory_core.one.template import parse_template, parse_vm_monitor, template_to_dict

fields = sys.argv[1]
py = [sys.executable, "-S"]
host_probe = py + ["drivers/im/kvm-probes.d/host/system/aifactory-gpu", "kvm", "0", "h100"]
vm_probe = py + ["drivers/im/kvm-probes.d/vm/monitor/aifactory-gpu", "kvm", "0", "h100"]
smi = ["nvidia-smi", f"--query-gpu={fields}", "--format=csv"]

out = subprocess.run(host_probe, capture_output=True, text=True, stdin=subprocess.DEVNULL)
print(f"== host/system probe: exit {out.returncode}, stderr {out.stderr!r}")
print(out.stdout)
vm = subprocess.run(vm_probe, capture_output=True, text=True, stdin=subprocess.DEVNULL)
print(f"== vm/monitor probe: exit {vm.returncode}, stderr {vm.stderr!r}, records {len(parse_vm_monitor(vm.stdout))}")
parsed = template_to_dict(parse_template(out.stdout))
probe_gpus = {g["BUS_ID"]: g for g in parsed.get("AIF_GPU", []) if isinstance(g, dict) and g}
table = subprocess.run(smi + ["noheader,nounits"], capture_output=True, text=True).stdout
print("== nvidia-smi --query-gpu (csv, noheader, nounits)\n" + table)
names = fields.split(",")
ok = True
def same(key, probe_value, smi_value, tolerance=None):
    global ok
    if tolerance is None:
        agree = probe_value.strip().upper() == smi_value.strip().upper()
    else:
        try:
            agree = abs(float(probe_value) - float(smi_value)) <= tolerance
        except ValueError:
            agree = False
    ok = ok and agree
    print(f"  {key:32s} probe={probe_value!r:44s} nvidia-smi={smi_value!r:24s} {'AGREE' if agree else 'DIFFER'}")
for row in csv.reader(io.StringIO(table)):
    smi_row = dict(zip(names, (v.strip() for v in row)))
    bus = smi_row["pci.bus_id"].lower()[4:]
    gpu = probe_gpus.get(bus)
    print(f"-- GPU {bus}")
    if gpu is None:
        ok = False; print("  not in the probe's output: DIFFER"); continue
    same("uuid", gpu["UUID"], smi_row["uuid"])
    same("name", gpu["MODEL"], smi_row["name"])
    same("serial", gpu["SERIAL"], smi_row["serial"])
    same("vbios_version", gpu["VBIOS"], smi_row["vbios_version"])
    same("memory.total MiB", gpu["MEMORY_MIB"], smi_row["memory.total"])
    same("mig.mode.current", gpu["MIG_MODE"], smi_row["mig.mode.current"])
    same("ecc.mode.current", gpu["ECC_MODE"], smi_row["ecc.mode.current"])
    same("ecc corrected aggregate", gpu["ECC_CORRECTED_AGGREGATE"], smi_row["ecc.errors.corrected.aggregate.total"])
    same("ecc uncorrected volatile", gpu["ECC_UNCORRECTED_VOLATILE"], smi_row["ecc.errors.uncorrected.volatile.total"])
    same("pcie.link.gen.max", gpu["PCIE_LINK_GEN_MAX"], smi_row["pcie.link.gen.max"])
    same("pcie.link.width.max", gpu["PCIE_LINK_WIDTH_MAX"], smi_row["pcie.link.width.max"])
    print(f"  health {gpu['HEALTH']} {gpu['HEALTH_REASON']!r}, NVML status {gpu['NVML_STATUS']}")
metrics = subprocess.run([sys.executable, "-m", "aifactory_core.cli", "metrics"], capture_output=True, text=True)
print("== metrics (temperature/power/clocks move between reads; shown, not compared)")
print("\n".join(l for l in metrics.stdout.splitlines() if l.startswith(("aifactory_gpu_temp", "aifactory_gpu_power", "aifactory_gpu_sm"))))

runs = 20
pynvml_probe = ["env", "AIFACTORY_NVML_BINDING=pynvml"] + host_probe
commands = {"nvidia-smi --query-gpu": smi, "host/system probe": host_probe, "vm/monitor probe": vm_probe,
            "host/system via pynvml": pynvml_probe,
            "python3 -c pass": [sys.executable, "-c", "pass"], "python3 -S -c pass": py + ["-c", "pass"]}
times = {name: [] for name in commands}
for _ in range(runs):
    for name, command in commands.items():
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        times[name].append(time.perf_counter() - start)
base = statistics.median(times["nvidia-smi --query-gpu"])
print(f"== wall time, {runs} runs each, interleaved; ratio = median / median(nvidia-smi)")
for name, samples in times.items():
    print(f"  {name:24s} median {statistics.median(samples)*1000:8.2f} ms  min {min(samples)*1000:8.2f} ms  "
          f"ratio {statistics.median(samples)/base:5.2f}")
print("== fields agree" if ok else "== SOME FIELDS DIFFER")
sys.exit(0 if ok else 1)
PY
