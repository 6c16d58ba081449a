"""Monitoring probes: GPU, NIC and fabric inventory and health for OpenNebula's IM probes.

This package is on the hot path (a process per probe run, every host, every cycle): its modules
import only what ``python3`` has already loaded at start-up (``os``, ``re``, ``base64``...) and
read sysfs directly under a host-root prefix. pynvml, threading and the lifecycle engine are
imported inside the functions that need them, and only when there is something for them to do.
"""
