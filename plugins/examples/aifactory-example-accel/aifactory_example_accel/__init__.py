"""Example aifactory vendor plugin: PCI processing accelerators."""
