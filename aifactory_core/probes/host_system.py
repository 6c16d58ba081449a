"""The ``host/system`` probe: GPU/NIC/fabric inventory, health and readiness as host attributes.

Output (OpenNebula template syntax; every attribute always present, zero/empty when nothing):

* ``AIF_PROBE = [ VERSION, STATUS=OK|PARTIAL, PROBLEMS ]`` — what went wrong, if anything.
* ``AIF_NVML = [ STATUS, DRIVER_VERSION ]``; ``AIF_XID_SOURCE``.
* one ``AIF_GPU = [ ... ]`` per GPU (keys of :data:`collect.GPU_KEYS`; ``ADDRESS``,
  ``SHORT_ADDRESS``, ``VENDOR``, ``DEVICE``, ``CLASS``, ``NUMA_NODE`` spelt as in OpenNebula's
  ``PCI`` attribute) and flat summaries the scheduler can match on: ``AIF_GPU_COUNT``,
  ``AIF_GPU_FREE``, ``AIF_GPU_HEALTHY_FREE``, ``AIF_GPU_MODELS``, ``AIF_GPU_HEALTH`` (the worst).
* one ``AIF_DEVICE = [ PLUGIN, KIND, ADDRESS, ..., HEALTH, HEALTH_REASON, <the plugin's own keys> ]``
  per device a probe plugin reports (:mod:`aifactory_core.probes.plugins`), ``AIF_DEVICE_COUNT``
  and ``AIF_PROBE_PLUGINS`` (the plugins that answered, comma-separated).
* ``AIF_SRIOV = [ ... ]`` per PF, ``AIF_IB_PORT = [ ... ]`` per port, ``AIF_HUGEPAGE = [ NODE_ID,
  SIZE, PAGES, FREE ]`` per node and size, ``AIF_CHECK = [ NAME, STATUS, DETAIL ]`` per readiness
  check and ``AIF_READY = YES|NO``.
* ``PCI = [ ... ]`` per passthrough device oned may give to a VM, healthy ones only, and
  ``AIF_PCI_OFFERED`` / ``AIF_PCI_WITHHELD`` (what was left out, and why): :mod:`.pci_offer`.

A later run that finds nothing for a list emits a single placeholder vector (``AIF_GPU = [ ]``) so
that oned's merge replaces the stale entries (an omitted attribute would stay in the template).
"""

from aifactory_core import __version__
from aifactory_core.probes import render
from aifactory_core.probes.collect import collect, quarantine, worst
from aifactory_core.probes.sysfs import Root

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def attributes(snapshot: "dict[str, Any]") -> list[tuple[str, object]]:
    problems = snapshot["problems"]
    out: list[tuple[str, object]] = [
        ("AIF_PROBE", {"VERSION": __version__, "STATUS": "PARTIAL" if problems else "OK",
                       "PROBLEMS": "; ".join(problems)}),
        ("AIF_NVML", {"STATUS": snapshot["nvml"]["STATUS"], "DRIVER_VERSION": snapshot["nvml"]["DRIVER_VERSION"]}),
        ("AIF_XID_SOURCE", snapshot["xid_source"]),
    ]
    gpus = snapshot["gpus"]
    for row in gpus:
        out.append(("AIF_GPU", {key: value for key, value in row.items() if not key.startswith("_")}))
    if not gpus:
        out.append(("AIF_GPU", {}))
    free = [row for row in gpus if row["STATE"] == "HOST"]
    out += [
        ("AIF_GPU_COUNT", len(gpus)),
        ("AIF_GPU_FREE", len(free)),
        ("AIF_GPU_HEALTHY_FREE", sum(1 for row in free if row["HEALTH"] == "OK")),
        ("AIF_GPU_MODELS", ",".join(sorted({str(row["MODEL"]) for row in gpus if row["MODEL"]}))),
        ("AIF_GPU_HEALTH", worst([str(row["HEALTH"]) for row in gpus])),
    ]
    devices = snapshot.get("devices", [])
    out += [("AIF_DEVICE", {key: value for key, value in row.items() if not key.startswith("_")})
            for row in devices] or [("AIF_DEVICE", {})]
    out += [("AIF_DEVICE_COUNT", len(devices)),
            ("AIF_PROBE_PLUGINS", ",".join(snapshot.get("probe_plugins", [])))]
    for key, rows in (("AIF_SRIOV", snapshot["sriov"]), ("AIF_IB_PORT", snapshot["ib"]),
                      ("AIF_HUGEPAGE", snapshot["hugepages"]), ("AIF_CHECK", snapshot["checks"])):
        out += [(key, row) for row in rows] or [(key, {})]
    ready = bool(snapshot["checks"]) and all(check["STATUS"] != "FAIL" for check in snapshot["checks"])
    out.append(("AIF_READY", "YES" if ready else "NO"))
    offered, withheld = snapshot.get("pci", ([], []))
    out += [("PCI", vector) for vector in offered]  # none at all: oned drops every free device
    out += [("AIF_PCI_OFFERED", ",".join(f"{vector['DOMAIN']}:{vector['SHORT_ADDRESS']}" for vector in offered)),
            ("AIF_PCI_WITHHELD", "; ".join(f"{address} {why}" for address, why in withheld))]
    return out


def pci_list(root: Root, snapshot: "dict[str, Any]") -> None:
    """Decide the host's PCI list into ``snapshot["pci"]`` (a failure: no device offered, a problem)."""
    from aifactory_core.probes import hostconf, pci_offer

    try:
        settings = hostconf.host_settings(root, snapshot["problems"])
        quarantined = quarantine(root, snapshot) if settings["vf_pools"] else {}
        snapshot["pci"] = pci_offer.offer(root, snapshot, settings, quarantined)
    except Exception as error:
        snapshot["problems"].append(render.error_text(error, prefix="pci: "))
        snapshot["pci"] = ([], [])


def probe(root: Root, replay: str | None = None, budget_s: float = 5.0) -> str:
    """The probe's whole output; never raises (a failure becomes ``AIF_PROBE/PROBLEMS``)."""
    try:
        snapshot = collect(root, replay, budget_s)
        pci_list(root, snapshot)
        return render.template(attributes(snapshot))
    except Exception as error:
        return render.template([("AIF_PROBE", {"VERSION": __version__, "STATUS": "FAILED",
                                               "PROBLEMS": render.error_text(error)}),
                                ("AIF_READY", "NO")])
