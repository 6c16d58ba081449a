"""aifactory core: OpenNebula hooks and driver extensions for GPU/SR-IOV/NUMA-aware AI hosts.

Importing this package is cheap on purpose: probes and hooks start a process per event, so
heavy modules (pyone, pyroute2, pynvml, lxml, pluggy) are imported only where they are used.
"""

__version__ = "0.1.0"
