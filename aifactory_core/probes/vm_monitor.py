"""The ``vm/monitor`` probe: which GPUs and VFs each running VM holds, with their host-side health.

One line per VM holding devices: ``VM = [ ID, DEPLOY_ID="one-<id>", MONITOR="<base64>" ]``; the
decoded MONITOR carries flat keys (merged into the VM's monitoring by monitord): ``AIF_PCI_DEVICES``
(every held function), ``AIF_GPU_COUNT``, ``AIF_GPU_ADDRESSES``, ``AIF_VF_COUNT``,
``AIF_GPU_HEALTH`` (worst of the VM's GPUs, from the host side: NVML cannot see a GPU a guest owns)
and ``AIF_GPU_HEALTH_REASON``; for devices of probe plugins ``AIF_DEVICE_COUNT``,
``AIF_DEVICE_HEALTH`` and ``AIF_DEVICE_HEALTH_REASON`` (their functions are not counted as VFs).
Numbers the guest reports are never used.

Every run also checks that each VM the suite's records name still has a domain, and starts the
reconciliation in the background when one has not (:mod:`aifactory_core.probes.reconcile_trigger`).
"""

from aifactory_core.probes import render
from aifactory_core.probes.collect import SEVERITY, collect, worst
from aifactory_core.probes.sysfs import Root

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def records(snapshot: "dict[str, Any]") -> list[tuple[int, list[tuple[str, object]]]]:
    by_vm: dict[int, list[str]] = {}
    for address, vm in snapshot["held"].items():
        by_vm.setdefault(int(vm), []).append(address)
    gpus = {str(row["BUS_ID"]): row for row in snapshot["gpus"]}
    devices = {str(row["BUS_ID"]): row for row in snapshot.get("devices", [])}
    result = []
    for vm in sorted(by_vm):
        addresses = sorted(by_vm[vm])
        mine = [gpus[address] for address in addresses if address in gpus]
        others = [devices[address] for address in addresses if address in devices and address not in gpus]
        verdict = worst([str(row["HEALTH"]) for row in mine])
        reasons = [f"{row['BUS_ID']}: {row['HEALTH_REASON']}" for row in mine
                   if SEVERITY.get(str(row["HEALTH"]), 1) and row["HEALTH_REASON"]]
        result.append((vm, [
            ("AIF_PCI_DEVICES", ",".join(addresses)),
            ("AIF_GPU_COUNT", len(mine)),
            ("AIF_GPU_ADDRESSES", ",".join(str(row["BUS_ID"]) for row in mine)),
            ("AIF_VF_COUNT", len(addresses) - len(mine) - len(others)),
            ("AIF_GPU_HEALTH", verdict),
            ("AIF_GPU_HEALTH_REASON", "; ".join(reasons)),
            ("AIF_DEVICE_COUNT", len(others)),
            ("AIF_DEVICE_HEALTH", worst([str(row["HEALTH"]) for row in others])),
            ("AIF_DEVICE_HEALTH_REASON", "; ".join(f"{row['BUS_ID']}: {row['HEALTH_REASON']}" for row in others
                                                   if row["HEALTH"] != "OK" and row["HEALTH_REASON"])),
        ]))
    return result


def probe(root: Root, replay: str | None = None, budget_s: float = 5.0) -> str:
    """The probe's whole output; never raises. When nothing can be read the output is empty (an
    empty vm/monitor stream is valid; monitord keeps the VMs' other monitoring) and the reason goes
    to stderr in one line, for whoever runs the probe by hand."""
    try:
        snapshot = collect(root, replay, budget_s, nvml_mode="off", host_wide=False)
        _reconcile_if_due(root, snapshot["held"])
        return "".join(render.vm_line(vm, f"one-{vm}", attributes) + "\n"
                       for vm, attributes in records(snapshot))
    except Exception as error:
        import sys

        sys.stderr.write(render.error_text(error, prefix="aifactory vm/monitor probe: ") + "\n")
        return ""


def _reconcile_if_due(root: Root, held: dict[str, int]) -> None:
    """Start the reconciliation when a VM holding something has no domain
    (:mod:`aifactory_core.probes.reconcile_trigger`); a failure is one line on stderr, never the
    probe's."""
    try:
        from aifactory_core.probes.reconcile_trigger import maybe_start

        maybe_start(root, held)
    except Exception as error:
        import sys

        sys.stderr.write(render.error_text(error, prefix="aifactory vm/monitor probe: reconcile: ") + "\n")
