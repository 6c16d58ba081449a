"""The real-kernel test host: Debian's kernel booted under QEMU/TCG for tests that need it.

``config`` describes the guest, ``initramfs`` builds its boot image, ``runner`` boots it and
runs one job, ``pytest_plugin`` runs every ``@pytest.mark.realkernel`` test in one boot.
"""

ENV_IN_GUEST = "AIFACTORY_IN_TESTHOST"
"""Set to ``1`` inside the guest: the pytest plugin then steps aside and tests run for real."""

ENV_NETDEVSIM = "AIFACTORY_NETDEVSIM_KO"
"""Inside the guest: path of the out-of-tree netdevsim.ko built for the guest kernel."""
