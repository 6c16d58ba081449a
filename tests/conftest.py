"""Shared pytest setup for the whole suite (keep minimal; fixtures live in their own modules)."""

import os

pytest_plugins = ["hostroots", "testhost.pytest_plugin", "onetestserver", "realone", "rootattacks"]

# Hook processes the tests start decide in their own process unless a test starts its own hook
# server: a server listening at the default socket on the test machine must not answer them.
os.environ["AIFACTORY_HOOK_SOCKET"] = "/nonexistent/aifactory-tests/hooks.sock"
