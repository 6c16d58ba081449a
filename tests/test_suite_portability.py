"""The tests run from whatever environment runs them: none names the checkout's own ``.venv``.

A test that starts the ``aifactory`` command or a hook's interpreter uses the interpreter running
the tests (``sys.executable``, ``[sys.executable, "-m", "aifactory_core.cli"]``, or the script next
to it), so the suite passes from any virtual environment. ``tests/realone.py`` and ``tests/oned/``
build their own environments from Debian's Python on purpose and are not checked here.
"""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
EXEMPT = (TESTS / "realone.py", TESTS / "oned", Path(__file__).resolve())
# .venv as a path component: a string of its own ("/ '.venv' /") or in a path ("x/.venv/bin").
VENV_PATH = re.compile(r"""["']\.venv["']|[/"']\.venv/""")


def test_no_test_hard_codes_the_checkout_venv() -> None:
    modules = [path for path in sorted(TESTS.rglob("*.py"))
               if not any(path == exempt or exempt in path.parents for exempt in EXEMPT)]
    assert TESTS / "test_tenant_apply.py" in modules
    offending = [f"{path.relative_to(TESTS)}:{number}: {line.strip()}"
                 for path in modules for number, line in enumerate(path.read_text().splitlines(), 1)
                 if VENV_PATH.search(line)]
    assert offending == []
