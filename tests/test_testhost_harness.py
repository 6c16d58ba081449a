"""Host-side tests of the real-kernel test host harness itself (tests/testhost)."""

from __future__ import annotations

import subprocess
import textwrap
import time
from pathlib import Path

import needs
import pytest
from testhost import initramfs, junit, runner
from testhost.config import DEFAULT_GUEST, FOUR_NODES, E1000e, GuestConfig, NvmeSriov, find_kernel_version
from testhost.pytest_plugin import in_ci

pytest_plugins = ["pytester"]


def require_testhost(config: GuestConfig = DEFAULT_GUEST) -> str:
    """The guest kernel version; skip (fail under CI=true) when the host cannot boot a guest."""
    missing = runner.missing_prerequisites(config)
    if missing:
        (pytest.fail if in_ci() else pytest.skip)("test host unavailable: " + "; ".join(missing))
    kver = find_kernel_version(config.kernel_version)
    assert kver is not None
    return kver


# -- guest configuration ---------------------------------------------------------------------------


def test_default_guest_has_two_sockets_two_nodes_and_e1000e_behind_a_node1_expander() -> None:
    args = " ".join(DEFAULT_GUEST.machine_args() + DEFAULT_GUEST.device_args())
    assert "-smp 4,sockets=2,cores=2,threads=1" in args
    assert "node,nodeid=0,cpus=0-1,memdev=mem0" in args and "node,nodeid=1,cpus=2-3,memdev=mem1" in args
    assert "pxb-pcie,id=pxb1,bus_nr=144,numa_node=1,bus=pcie.0" in args
    assert "e1000e,id=nic0,bus=rp-nic0" in args
    assert "sriov_max_vfs=2" in args and "nvme,id=nvme0" in args and "bus=pcie.0" in args
    assert args.index("intel-iommu") < args.index("e1000e")


def test_four_node_layout_gives_each_node_one_cpu_and_a_quarter_of_memory() -> None:
    args = " ".join(FOUR_NODES.machine_args())
    assert "-smp 4,sockets=4,cores=1,threads=1" in args
    assert all(f"node,nodeid={n},cpus={n}-{n},memdev=mem{n}" in args for n in range(4))
    assert "memory-backend-ram,id=mem3,size=512M" in args


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cpus": 3, "numa_nodes": 2}, "cannot be split evenly"),
        ({"memory_mib": 100, "numa_nodes": 1}, r"128\+ MiB"),
        ({"devices": (E1000e(numa_node=2),)}, "NUMA node 2"),
        ({"devices": (E1000e(), E1000e())}, "unique"),
        ({"udev": "sometimes"}, "udev must be"),
    ],
)
def test_guest_config_rejects_impossible_shapes(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GuestConfig(**kwargs)  # type: ignore[arg-type]


def test_session_timeout_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIFACTORY_TESTHOST_TIMEOUT", "42")
    assert DEFAULT_GUEST.with_env_overrides().session_timeout_s == 42
    monkeypatch.setenv("AIFACTORY_TESTHOST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="number of seconds"):
        DEFAULT_GUEST.with_env_overrides()


def test_job_script_quotes_arguments_and_wraps_the_inner_timeout(tmp_path: Path) -> None:
    job = runner.GuestJob(("python", "-m", "pytest", "a b.py::t[x y]"), tmp_path, (("K", "v w"),), False, 90)
    script = job.script()
    assert "export K='v w'" in script
    assert "timeout --signal=INT --kill-after=20 90 python -m pytest 'a b.py::t[x y]'" in script


# -- JUnit mapping ---------------------------------------------------------------------------------

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.realkernel.test_a" name="test_ok" time="1.5"/>
<testcase classname="tests.realkernel.test_a" name="test_bad[x]" time="0.1">
  <properties><property name="testhost_nodeid" value="tests/realkernel/test_a.py::test_bad[x]"/></properties>
  <failure message="assert 1 == 2">def test_bad(): assert 1 == 2</failure>
  <error message="failed on teardown with &quot;OSError&quot;">OSError: busy</error>
</testcase>
<testcase classname="tests.realkernel.test_a.TestC" name="test_skip">
  <skipped type="pytest.skip" message="no nvme">x</skipped></testcase>
<testcase classname="tests.realkernel.test_a" name="test_setup">
  <error message="failed on setup with &quot;E&quot;">E</error></testcase>
</testsuite></testsuites>"""


def test_junit_results_map_back_to_node_ids_with_phases(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text(JUNIT)
    ids = [
        "tests/realkernel/test_a.py::test_ok",
        "tests/realkernel/test_a.py::test_bad[x]",
        "tests/realkernel/test_a.py::TestC::test_skip",
        "tests/realkernel/test_a.py::test_setup",
        "tests/realkernel/test_a.py::test_missing",
    ]
    res = junit.parse(xml, ids)
    assert set(res) == set(ids[:4])
    assert res[ids[0]].outcome == "passed" and res[ids[0]].duration == 1.5
    assert res[ids[1]].failures == {
        "call": "def test_bad(): assert 1 == 2",  # the message is already in the body
        "teardown": 'failed on teardown with "OSError"\nOSError: busy',
    }
    assert res[ids[2]].outcome == "skipped" and res[ids[2]].skipped == "no nvme"
    assert set(res[ids[3]].failures) == {"setup"}


# -- the plugin, with a fake runner ----------------------------------------------------------------

INNER_TESTS = """
import pytest

pytestmark = pytest.mark.realkernel

def test_passes(): pass
def test_fails(): pass
def test_skips(): pass
def test_not_in_junit(): pass

@pytest.mark.realkernel
def test_host_never_runs_this_body():
    raise SystemExit("ran on the host")
"""


@pytest.fixture
def outer(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("AIFACTORY_IN_TESTHOST", raising=False)
    monkeypatch.delenv("CI", raising=False)
    pytester.makeconftest('pytest_plugins = ["testhost.pytest_plugin"]')
    pytester.makepyfile(test_plain="def test_plain(): pass", test_rk=INNER_TESTS)
    return pytester


def _fake_run(boots: list[runner.GuestJob], xml: str) -> object:
    def run(config: GuestConfig, job: runner.GuestJob, out_dir: Path) -> runner.GuestResult:
        boots.append(job)
        (out_dir / "junit.xml").write_text(xml)
        return runner.GuestResult(1, out_dir, "TESTHOST-READY\nconsole text", 3.0, 1.0)

    return run


def test_plugin_runs_all_realkernel_tests_in_one_boot_and_reports_each(
    outer: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    xml = """<testsuites><testsuite>
    <testcase classname="test_rk" name="test_passes"/>
    <testcase classname="test_rk" name="test_fails">
      <failure message="assert 0">inner traceback text</failure></testcase>
    <testcase classname="test_rk" name="test_skips">
      <skipped type="pytest.skip" message="needs nvme">x</skipped></testcase>
    <testcase classname="test_rk" name="test_host_never_runs_this_body"/>
    </testsuite></testsuites>"""
    boots: list[runner.GuestJob] = []
    monkeypatch.setattr(runner, "missing_prerequisites", lambda config: [])
    monkeypatch.setattr(runner, "run", _fake_run(boots, xml))
    result = outer.runpytest_inprocess("-rA")
    result.assert_outcomes(passed=3, failed=2, skipped=1)
    assert len(boots) == 1
    argv = boots[0].argv
    assert argv[1:3] == ("-m", "pytest") and "no:cacheprovider" in argv
    assert sum(a.startswith("test_rk.py::") for a in argv) == 5 and "test_plain.py::test_plain" not in argv
    assert ("AIFACTORY_IN_TESTHOST", "1") in boots[0].env
    out = result.stdout.str()
    assert "inner traceback text" in out
    assert "needs nvme" in out
    assert "not reported by the guest's pytest session" in out


def test_plugin_boots_nothing_when_no_realkernel_test_is_selected(
    outer: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    boots: list[runner.GuestJob] = []
    monkeypatch.setattr(runner, "run", _fake_run(boots, "<testsuites/>"))
    outer.runpytest_inprocess("-m", "not realkernel").assert_outcomes(passed=1)
    assert boots == []


def test_missing_prerequisites_skip_locally_and_fail_under_ci(
    outer: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "missing_prerequisites", lambda config: ["qemu-system-x86_64 not found"])
    result = outer.runpytest_inprocess("-rs")
    result.assert_outcomes(passed=1, skipped=5)
    result.stdout.fnmatch_lines(["*test host unavailable: qemu-system-x86_64 not found*"])
    monkeypatch.setenv("CI", "true")
    result = outer.runpytest_inprocess()
    result.assert_outcomes(passed=1, failed=5)
    result.stdout.fnmatch_lines(["*CI=true: realkernel tests must not be skipped*"])


# -- real QEMU: fast failures ----------------------------------------------------------------------


def test_initramfs_holds_busybox_init_and_modules_in_dependency_order(tmp_path: Path) -> None:
    kver = require_testhost()
    image = initramfs.build(kver, tmp_path / "initramfs.cpio")
    names = subprocess.run(["cpio", "-it"], input=image.read_bytes(), capture_output=True, check=True).stdout
    listing = names.decode().split()
    assert {"init", "bin/busybox", "bin/switch_root", "dev/console", "mods/order"} <= set(listing)
    order = [line for line in listing if line.startswith("mods/") and line.endswith(".ko")]
    assert order.index("mods/virtio.ko") < order.index("mods/virtio_pci.ko")
    assert order.index("mods/9pnet.ko") < order.index("mods/9p.ko")


def test_guest_that_panics_fails_the_outer_test_quickly_with_the_console_tail(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_testhost()
    monkeypatch.delenv("AIFACTORY_IN_TESTHOST", raising=False)
    pytester.makeconftest('pytest_plugins = ["testhost.pytest_plugin"]')
    pytester.makepyfile(
        test_panics=textwrap.dedent(
            """
            import pytest
            from testhost.config import GuestConfig

            # No such rdinit, no root= -> "Kernel panic - not syncing: VFS: Unable to mount root fs".
            BROKEN = GuestConfig(extra_append=("rdinit=/nonexistent",), boot_timeout_s=60, session_timeout_s=90)

            @pytest.mark.realkernel(guest=BROKEN)
            def test_never_runs():
                pass
            """
        )
    )
    start = time.monotonic()
    result = pytester.runpytest_inprocess()
    elapsed = time.monotonic() - start
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "test host stopped before it was ready" in out
    assert "--- console tail ---" in out and "Kernel panic" in out
    assert elapsed < 60, f"boot failure took {elapsed:.0f}s to report"


def test_boot_timeout_kills_a_guest_that_is_not_ready_in_time(tmp_path: Path) -> None:
    require_testhost()
    config = GuestConfig(devices=(NvmeSriov(),), boot_timeout_s=1.5)
    start = time.monotonic()
    result = runner.run(config, runner.GuestJob(("true",), tmp_path), tmp_path / "out")
    assert time.monotonic() - start < 15
    assert result.timed_out == "boot" and result.rc is None and not result.ok
    assert "did not become ready" in result.summary()
    assert result.console_log.is_file()


def test_a_test_using_libvirt_uri_makes_the_guest_start_libvirtd(
    outer: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    outer.makeconftest(
        textwrap.dedent(
            """
            import pytest
            pytest_plugins = ["testhost.pytest_plugin"]

            @pytest.fixture(scope="session")
            def libvirt_conn(): return None

            @pytest.fixture(scope="session")
            def libvirt_uri(libvirt_conn): return "qemu:///system"
            """
        )
    )
    outer.makepyfile(test_virt="import pytest\n\n@pytest.mark.realkernel\ndef test_uses_uri(libvirt_uri): pass\n")
    boots: list[runner.GuestJob] = []
    monkeypatch.setattr(runner, "missing_prerequisites", lambda config: [])
    monkeypatch.setattr(runner, "run", _fake_run(boots, "<testsuites/>"))
    outer.runpytest_inprocess("test_virt.py")
    assert len(boots) == 1 and boots[0].start_libvirt
    boots.clear()
    outer.runpytest_inprocess("test_rk.py")
    assert len(boots) == 1 and not boots[0].start_libvirt


def test_guest_init_and_install_script_are_shellcheck_clean() -> None:
    needs.tool("shellcheck", hint="apt-get install -y shellcheck")
    repo = Path(__file__).resolve().parents[1]
    scripts = [repo / ".ci" / "install-testhost.sh", repo / "tests" / "testhost" / "guest_init.sh"]
    result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
