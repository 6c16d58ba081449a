"""One exception family for the whole suite.

Every error that can reach an operator carries a one-line, user-facing message and a machine
code. Executables (CLI, hooks, drivers) turn it into an exit status and OpenNebula's error
format; no traceback reaches an operator unless ``--debug`` asks for it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2


class AifactoryError(Exception):
    """Base error: ``message`` is one line for humans, ``code`` a stable machine identifier."""

    code = "error"
    exit_status = EXIT_CHECK_FAILED

    def __init__(self, message: str, *, code: str | None = None) -> None:
        one_line = " ".join(str(message).split())
        super().__init__(one_line)
        self.message = one_line
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class UsageError(AifactoryError):
    """Bad input from the caller: argv, a file, a document, a value. Exit status 2."""

    code = "usage"
    exit_status = EXIT_USAGE


class ConfigError(UsageError):
    """The configuration file is missing, unreadable or invalid (names the bad key)."""

    code = "config"


class DocumentError(UsageError):
    """An XML/base64/template document handed to the suite is malformed or hostile."""

    code = "document"


class HostError(AifactoryError):
    """The host is not in the state an action needs (missing device, sysfs write refused)."""

    code = "host"


class PolicyRefused(AifactoryError):
    """A tenant policy rule refused the request; the message names the rule."""

    code = "policy"


class PluginError(AifactoryError):
    """A plugin could not be loaded or misbehaved."""

    code = "plugin"
