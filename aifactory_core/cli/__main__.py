"""``python -m aifactory_core.cli``: the same as the ``aifactory`` command."""

from aifactory_core.cli import entry_point

entry_point()
