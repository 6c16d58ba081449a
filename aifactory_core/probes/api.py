"""What a probe plugin returns: devices with their health and metrics (``aifactory_probe_devices``).

A probe plugin is a module named in the ``aifactory.probes`` entry-point group (see
:func:`aifactory_core.hookspecs.aifactory_probe_devices`). It is imported by the IM probes every
cycle, so it and this module import only what ``python3 -S`` has already loaded: plain classes
with ``__slots__``, no dataclasses, no pluggy, no host model.

Names and units follow Prometheus: a metric's name is ``[a-z][a-z0-9_]*``, in base units with the
unit as suffix (``_bytes``, ``_watts``, ``_celsius``, ``_seconds``, ``_hertz``, ``_ratio``), a
counter's ends in ``_total``; the exposition prefixes ``aifactory_`` and adds the device's labels
(``bus_id``, ``plugin``, ``kind``, ``model``, and ``vm_id``/``tenant`` while a VM holds it).
"""

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

API_VERSION = 1
"""The probe-plugin API this core provides; a module declaring a newer ``AIFACTORY_PROBE_API`` is
not called."""
VERDICTS = ("OK", "DEGRADED", "FAILED")
KINDS = ("gauge", "counter")
_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
_UPPER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
# Attribute names the probe itself writes into every AIF_DEVICE vector.
RESERVED = frozenset(("PLUGIN", "KIND", "ADDRESS", "SHORT_ADDRESS", "BUS_ID", "VENDOR", "DEVICE", "CLASS",
                      "NUMA_NODE", "IOMMU_GROUP", "DRIVER", "STATE", "VM_ID", "MODEL", "HEALTH",
                      "HEALTH_REASON"))
RESERVED_LABELS = frozenset(("bus_id", "plugin", "kind", "model", "vm_id", "tenant"))
# Name prefixes of the suite's own metric families, which a plugin's metric may not take.
RESERVED_PREFIXES = ("gpu_", "device_", "hugepages_", "readiness_", "probe_")


def metric_name(name: str) -> bool:
    """``[a-z][a-z0-9_]*``, at most 100 characters."""
    return 0 < len(name) <= 100 and name[0].isalpha() and name.isascii() and _LOWER.issuperset(name)


def attribute_name(name: str) -> bool:
    """``[A-Z][A-Z0-9_]*``, at most 64 characters (OpenNebula's template syntax takes these)."""
    return 0 < len(name) <= 64 and name[0].isalpha() and name.isascii() and _UPPER.issuperset(name)


class Metric:
    """One sample of a device: ``name`` without the ``aifactory_`` prefix, ``kind`` ``gauge`` or
    ``counter`` (its name then ends in ``_total``), ``labels`` of its own besides the device's."""

    __slots__ = ("name", "value", "kind", "help", "labels")

    def __init__(self, name: str, value: float, kind: str = "gauge", help: str = "",  # noqa: A002
                 labels: "Mapping[str, str] | None" = None) -> None:
        if not metric_name(name):
            raise ValueError(f"metric name {name!r}: use [a-z][a-z0-9_]*")
        if name.startswith(RESERVED_PREFIXES):
            raise ValueError(f"metric name {name!r}: {', '.join(RESERVED_PREFIXES)} are the suite's own families")
        if kind not in KINDS:
            raise ValueError(f"metric {name}: kind {kind!r} is not gauge or counter")
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name}: a counter's name ends in _total")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"metric {name}: value {value!r} is not a number")
        own = dict(labels or {})
        for label in own:
            if not metric_name(label) or label in RESERVED_LABELS:
                raise ValueError(f"metric {name}: label {label!r} is invalid or the probe's own")
        self.name, self.value, self.kind, self.help = name, value, kind, " ".join(str(help).split())
        self.labels = {label: str(text) for label, text in own.items()}


class ProbeDevice:
    """A device a probe plugin recognises, with its verdict.

    ``address`` is the PCI function (``0000:3b:00.0``); the probe adds what sysfs says of it (ids,
    NUMA node, IOMMU group, driver) and who holds it. ``attributes`` are extra ``KEY: value`` pairs
    for the host template's ``AIF_DEVICE`` vector (``[A-Z][A-Z0-9_]*``, not the probe's own keys)."""

    __slots__ = ("address", "kind", "model", "health", "health_reason", "attributes", "metrics")

    def __init__(self, address: str, kind: str, *, model: str = "", health: str = "OK", health_reason: str = "",
                 attributes: "Mapping[str, object] | None" = None, metrics: "Iterable[Metric]" = ()) -> None:
        from aifactory_core.probes.sysfs import is_pci_address

        if not is_pci_address(address):
            raise ValueError(f"device address {address!r} is not a PCI function (dddd:bb:ss.f)")
        if not metric_name(kind):
            raise ValueError(f"device {address}: kind {kind!r}: use [a-z][a-z0-9_]*")
        if health not in VERDICTS:
            raise ValueError(f"device {address}: health {health!r} is not one of {', '.join(VERDICTS)}")
        extra = dict(attributes or {})
        for key in extra:
            if not attribute_name(key) or key in RESERVED:
                raise ValueError(f"device {address}: attribute {key!r} is invalid or the probe's own")
        self.address, self.kind, self.model = address, kind, str(model)
        self.health, self.health_reason = health, str(health_reason)
        self.attributes = extra
        self.metrics = list(metrics)
        for metric in self.metrics:
            if not isinstance(metric, Metric):
                raise ValueError(f"device {address}: {metric!r} is not a Metric")
