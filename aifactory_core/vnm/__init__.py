"""Tenant-isolated VM networking on the host: SR-IOV VF configuration, owner tokens, VNM hooks.

``grant`` is the tenant's network grant (the only source of VLANs, VNIs and pkeys a VM may use),
``vf`` the ``vf_config`` action kind run by the lifecycle executor (journaled, undone by a
verified scrub), ``plan`` turns a VM's PCI NICs into actions, ``hook`` is the ``pre.d``/
``post.d``/``clean.d`` entry point. Importing this package loads nothing.
"""
