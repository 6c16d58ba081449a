"""Shared pytest setup for the whole suite (keep minimal; fixtures live in their own modules)."""

pytest_plugins = ["hostroots", "testhost.pytest_plugin", "onetestserver"]
