"""Log lines of a driver action or network hook, held until its outcome is known.

What OpenNebula does with what a remote script writes:

- a VMM action (``remotes/vmm/kvm/<action>``): its stderr goes to the VM's log, success or not;
  on failure 7.0/7.4 leave the lines starting ``ERROR:``/``WARN:``/``INFO:``/``DEBUG:`` out of the
  VM's error message, but 6.10 makes the whole stderr the error message;
- a VNM hook (``remotes/vnm/<driver>/<phase>.d/*``, ``VNMDriver#run_hooks``): on success its
  stdout is logged and its stderr dropped; on failure its stderr is the error (``Error running
  <hook>`` and then that stderr), its stdout dropped.

So the lines are held (:class:`HeldLog`) and written once the outcome is known: after a success all
of them, where that success is logged (stderr for a VMM action, stdout for a VNM hook); after a
failure only those at ERROR, which belong to the error, on stderr. A failed action's stderr is thus
its error alone.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

LOGGERS = (("aifactory", logging.INFO), ("aifactory_core", logging.WARNING))
"""The suite's loggers (plugins log under ``aifactory.<plugin>``) and the level each is held from."""


class OpenNebulaLogFormat(logging.Formatter):
    """``WARN: aifactory deploy: ...``: the driver log convention, one line per record."""

    LEVELS = {"WARNING": "WARN", "CRITICAL": "ERROR"}

    def __init__(self, action: str) -> None:
        super().__init__()
        self.action = action

    def format(self, record: logging.LogRecord) -> str:
        level = self.LEVELS.get(record.levelname, record.levelname)
        return f"{level}: aifactory {self.action}: {' '.join(record.getMessage().split())}"


class HeldLog(logging.Handler):
    """Holds the formatted lines until :meth:`write`."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append((record.levelno, self.format(record)))
        except Exception:  # a log line must never fail the action
            self.handleError(record)

    def write(self, succeeded: bool, logged: TextIO | None = None) -> None:
        """After a success every line to ``logged`` (default stderr); after a failure the ERROR
        lines to stderr, the others nowhere (OpenNebula would put them in the error message)."""
        for level, line in self.lines:
            if succeeded:
                (logged or sys.stderr).write(line + "\n")
            elif level >= logging.ERROR:
                sys.stderr.write(line + "\n")
        self.lines.clear()


def hold_log(action: str) -> HeldLog:
    """Route the suite's log records into a new :class:`HeldLog` (replacing an earlier one)."""
    held = HeldLog()
    held.setFormatter(OpenNebulaLogFormat(action))
    for name, level in LOGGERS:
        logger = logging.getLogger(name)
        for old in [handler for handler in logger.handlers if isinstance(handler, HeldLog)]:
            logger.removeHandler(old)
        logger.addHandler(held)
        logger.setLevel(level)  # with a handler in place, Python's last-resort stderr handler stays out
    return held
