"""pytest plugin: run ``@pytest.mark.realkernel`` tests inside the test host, one boot per run.

On the host, realkernel items are not run locally.  The first time one is reached, the guest is
booted once (per distinct guest config) and runs ONE pytest session over all selected realkernel
node ids; each outer item then reports the guest's result for it (passed / failed with the inner
failure text / skipped with the reason).  Inside the guest (``AIFACTORY_IN_TESTHOST=1``) the
plugin only tags items with their node id for the JUnit XML, so the tests run for real.

Missing prerequisites (qemu, Debian kernel, netdevsim.ko) skip realkernel tests with the reason,
except under ``CI=true``, where they fail: CI must never silently skip them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testhost import ENV_IN_GUEST, ENV_NETDEVSIM, junit, runner
from testhost.config import DEFAULT_GUEST, GuestConfig, find_kernel_version, netdevsim_path

MARKER = "realkernel"
ENV_KEEP = "AIFACTORY_TESTHOST_KEEP"
"""Set to ``1`` to keep the run's out dir (console.log, junit.xml, job.sh) even when all passed."""
LIBVIRT_FIXTURE = "libvirt_conn"
"""Items using this fixture make the guest start libvirtd early, while pytest imports."""


def in_guest() -> bool:
    return os.environ.get(ENV_IN_GUEST) == "1"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(guest=GuestConfig): needs Debian's real kernel; runs in the QEMU test host, "
        "all such tests of a run in one boot (see tests/testhost/README.md)",
    )
    if not in_guest() and not config.pluginmanager.has_plugin("testhost-host"):
        config.pluginmanager.register(HostSide(config), "testhost-host")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if in_guest():
        for item in items:
            item.user_properties.append((junit.NODEID_PROPERTY, item.nodeid))


def guest_config_of(item: pytest.Item) -> GuestConfig:
    marker = item.get_closest_marker(MARKER)
    guest = marker.kwargs.get("guest", DEFAULT_GUEST) if marker else DEFAULT_GUEST
    if not isinstance(guest, GuestConfig):
        raise pytest.UsageError(f"{item.nodeid}: realkernel(guest=...) must be a GuestConfig")
    return guest


@dataclass
class _Verdict:
    """What to report for one outer item."""

    results: dict[str, junit.InnerResult]
    session_error: str | None = None  # every item fails with this
    skip_reason: str | None = None  # every item skips with this
    log_note: str = ""


class HostSide:
    """Host-side half: defers realkernel items to one guest session per guest config."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.groups: dict[GuestConfig, list[pytest.Item]] = {}
        self.verdicts: dict[GuestConfig, _Verdict] = {}
        self.tail_shown: set[GuestConfig] = set()

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.groups = {}
        for item in session.items:
            if item.get_closest_marker(MARKER):
                self.groups.setdefault(guest_config_of(item), []).append(item)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
        if not item.get_closest_marker(MARKER):
            return None
        guest = guest_config_of(item)
        if guest not in self.verdicts:
            self.verdicts[guest] = self._run_group(guest, self.groups.get(guest, [item]))
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for report in self._reports(item, guest, self.verdicts[guest]):
            if report.when == "teardown" and report.passed:
                report = self._teardown_host_state(item, nextitem) or report
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    @staticmethod
    def _teardown_host_state(item: pytest.Item, nextitem: pytest.Item | None) -> pytest.TestReport | None:
        """Tear down host fixtures/collectors the next item does not need, as a normal teardown would.

        Realkernel items set nothing up on the host, but an earlier host-side item may have left
        its module or class set up; without this, the next item's setup would trip over it.
        """
        state = getattr(item.session, "_setupstate", None)
        if state is None:
            return None
        call = pytest.CallInfo.from_call(lambda: state.teardown_exact(nextitem), when="teardown")
        return None if call.excinfo is None else pytest.TestReport.from_item_and_call(item, call)

    # -- the one boot ---------------------------------------------------------------------------

    def _say(self, line: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"testhost: {line}")

    def _run_group(self, guest: GuestConfig, items: list[pytest.Item]) -> _Verdict:
        missing = runner.missing_prerequisites(guest)
        if missing:
            reason = "test host unavailable: " + "; ".join(missing)
            if in_ci():
                return _Verdict({}, session_error=f"{reason} (CI=true: realkernel tests must not be skipped)")
            return _Verdict({}, skip_reason=reason)
        kver = find_kernel_version(guest.kernel_version)
        assert kver is not None  # checked by missing_prerequisites
        nodeids = [i.nodeid for i in items]
        libvirt = any(LIBVIRT_FIXTURE in getattr(i, "fixturenames", ()) for i in items)
        out_dir = Path(tempfile.mkdtemp(prefix="aifactory-testhost-"))
        job = self._job(guest, nodeids, kver, out_dir, libvirt)
        self._say(f"booting {kver} under QEMU/TCG for {len(nodeids)} realkernel test(s)...")
        try:
            result = runner.run(guest, job, out_dir)
        except (OSError, RuntimeError) as exc:
            return _Verdict({}, session_error=f"test host could not start: {exc}")
        results: dict[str, junit.InnerResult] = {}
        xml = result.junit_xml
        if xml is not None:
            try:
                results = junit.parse(xml, nodeids)
            except Exception as exc:  # noqa: BLE001 - a broken XML is reported, not raised
                return _Verdict({}, session_error=f"cannot read the guest's JUnit XML {xml}: {exc}")
        note = f"{result.summary()}\nconsole log: {result.console_log}"
        clean = result.ok and len(results) == len(nodeids) and all(r.outcome != "failed" for r in results.values())
        if clean and os.environ.get(ENV_KEEP) != "1":
            shutil.rmtree(result.out_dir, ignore_errors=True)
            note = result.summary()
        self._say(note.replace("\n", "; "))
        error = None
        if not result.ok or xml is None:
            error = f"{result.summary()}\nconsole log: {result.console_log}\n--- console tail ---\n"
            error += result.console_tail()
        return _Verdict(results, session_error=error if not results else None, log_note=note)

    def _job(self, guest: GuestConfig, nodeids: list[str], kver: str, out_dir: Path, libvirt: bool) -> runner.GuestJob:
        config = self.config
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "--color=no", "--tb=short"]
        argv += ["--rootdir", str(config.rootpath)]
        if config.inipath is not None:
            argv += ["-c", str(config.inipath)]
        argv += ["-o", "junit_logging=all", "-o", "junit_log_passing_tests=false", "-o", "faulthandler_timeout=120"]
        argv += ["--junitxml", str(out_dir / "junit.xml"), *nodeids]
        env = (
            (ENV_IN_GUEST, "1"),
            (ENV_NETDEVSIM, str(netdevsim_path(kver))),
            ("PYTHONDONTWRITEBYTECODE", "1"),
            ("PYTHONUNBUFFERED", "1"),
        )
        # The guest's pytest is interrupted well before the host kills QEMU, so the results of
        # the tests that finished still come back in the JUnit XML.
        inner_timeout = max(30.0, guest.with_env_overrides().session_timeout_s - 60)
        return runner.GuestJob(tuple(argv), config.rootpath, env, libvirt, inner_timeout)

    # -- reports ---------------------------------------------------------------------------------

    def _reports(self, item: pytest.Item, guest: GuestConfig, verdict: _Verdict) -> Iterator[pytest.TestReport]:
        keywords = {k: 1 for k in item.keywords}

        def report(when: str, outcome: str, longrepr: object = None, **extra: object) -> pytest.TestReport:
            rep = pytest.TestReport(
                item.nodeid, item.location, keywords, outcome, longrepr, when,  # type: ignore[arg-type]
                sections=extra.pop("sections", ()), duration=extra.pop("duration", 0.0),  # type: ignore[arg-type]
                user_properties=item.user_properties,
            )  # fmt: skip
            for key, value in extra.items():
                setattr(rep, key, value)
            return rep

        path, lineno = str(item.location[0]), (item.location[1] or 0) + 1
        if verdict.skip_reason is not None:
            yield report("setup", "skipped", (path, lineno, f"Skipped: {verdict.skip_reason}"))
            yield report("teardown", "passed")
            return
        inner = verdict.results.get(item.nodeid)
        if inner is None:
            if verdict.session_error is not None:
                text = verdict.session_error
                if guest in self.tail_shown:  # the console tail once per boot is enough
                    text = text.split("\n--- console tail ---")[0] + "\n(console tail: see the first failure)"
                self.tail_shown.add(guest)
            else:
                text = f"not reported by the guest's pytest session\n{verdict.log_note}"
            yield report("setup", "passed")
            yield report("call", "failed", f"[testhost] {text}")
            yield report("teardown", "passed")
            return
        sections = [(f"{title} (in test host)", text) for title, text in inner.output]
        fail = inner.failures
        if "setup" in fail:
            yield report("setup", "failed", f"[in test host] {fail['setup']}", sections=sections)
        elif inner.skipped is not None:
            yield report("setup", "skipped", (path, lineno, f"Skipped: {inner.skipped}"))
        else:
            yield report("setup", "passed")
            if "call" in fail:
                yield report("call", "failed", f"[in test host] {fail['call']}", sections=sections,
                             duration=inner.duration)  # fmt: skip
            elif inner.xfailed is not None:
                yield report("call", "skipped", None, wasxfail=inner.xfailed, duration=inner.duration)
            else:
                yield report("call", "passed", duration=inner.duration)
        if "teardown" in fail:
            yield report("teardown", "failed", f"[in test host] {fail['teardown']}", sections=sections)
        else:
            yield report("teardown", "passed")
