"""Test-wide plugins: host-root fixtures (hostroots) and the real-kernel test host (testhost)."""

pytest_plugins = ["hostroots"]
