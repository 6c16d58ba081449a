"""NUMA-aware CPU pinning aligned with a VM's GPUs and NICs, written into the libvirt domain.

``topology`` (the host as the planner sees it), ``pcie`` (GPU/NIC pairing below NUMA),
``planner`` (deterministic placement), ``held`` (what other pinned VMs hold),
``domain_rewrite`` (the libvirt ``<domain>`` edits) and ``plugin`` (the hooks).
"""
