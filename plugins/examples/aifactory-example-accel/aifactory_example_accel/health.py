"""The example accelerator's verdict, shared by the plugin (inventory) and its probe module: the
PCIe link trained narrower than expected is DEGRADED. Imports nothing, so the probe stays lean."""

from __future__ import annotations

DEFAULT_VENDORS = frozenset({0x1DA3})
DEFAULT_LINK_WIDTH = 16
PCI_CLASS_ACCELERATOR = 0x12


def link_verdict(width: int, expected: int = DEFAULT_LINK_WIDTH) -> tuple[str, str]:
    """(``OK``/``DEGRADED``, reason) for a link trained at ``width`` lanes."""
    if width >= expected:
        return "OK", ""
    return "DEGRADED", f"PCIe link x{width}, expected x{expected}"
