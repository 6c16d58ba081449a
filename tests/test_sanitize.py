"""The gate between tenants: health after reset, quarantine, and refusal of quarantined devices."""

import os
from pathlib import Path

import pytest
from hostroots import run_cli

from aifactory_core.errors import HostError
from aifactory_core.host.pcibind import RecordingWriter
from aifactory_core.host.sanitize import clear_quarantine, health_problem, quarantined, sanitize
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import ownership

GPU = "0000:1b:00.0"


@pytest.fixture
def host(tmp_path: Path) -> HostRoot:
    from hostroots import generate_host

    return HostRoot(generate_host("dgx-h100", tmp_path / "root"), tmp_path / "state")


def test_healthy_device_passes(host: HostRoot) -> None:
    assert health_problem(host, GPU) is None
    assert sanitize(host, GPU) is None and quarantined(host) == {}


def test_device_off_the_bus_is_quarantined_and_refused(host: HostRoot) -> None:
    config = host.pci_devices / GPU / "config"
    config.write_bytes(b"\xff" * 256)
    reason = sanitize(host, GPU)
    assert reason == "config space reads all-ones: the device fell off the bus"
    assert quarantined(host) == {GPU: reason}
    with pytest.raises(HostError, match="quarantined"):
        ownership.claim(host, GPU, 5)
    listing = run_cli("--host-root", str(host.root), "device", "list",
                      env={"AIFACTORY_STATE_DIR": str(host.state_dir)})
    assert any(GPU in line and "fell off the bus" in line for line in listing.stdout.splitlines())
    assert clear_quarantine(host, GPU)
    ownership.claim(host, GPU, 5)


def test_degraded_link_is_a_problem(host: HostRoot) -> None:
    (host.pci_devices / GPU / "current_link_width").write_text("8\n")
    assert health_problem(host, GPU) == "link trained at x8 of x16"


def test_reset_falls_back_to_bus_reset(host: HostRoot) -> None:
    device = host.pci_devices / GPU
    (device / "reset").write_text("")
    (device / "reset_method").write_text("flr bus\n")

    class FlrFails(RecordingWriter):
        def write(self, path: Path, value: str, why: str) -> None:
            super().write(path, value, why)
            if path.name == "reset" and len([w for w in self.writes if w.path.endswith("/reset")]) == 1:
                raise HostError("writing 1 to reset failed: Inappropriate ioctl for device")

    writer = FlrFails()
    from aifactory_core.host.sanitize import reset_and_check

    assert reset_and_check(host, GPU, writer) is None
    assert [(Path(w.path).name, w.value) for w in writer.writes] == [
        ("reset", "1"), ("reset_method", "bus"), ("reset", "1"), ("reset_method", "flr bus")]


def test_link_is_judged_against_its_width_before_the_reset(host: HostRoot) -> None:
    width = host.pci_devices / GPU / "current_link_width"
    width.write_text("8\n")
    assert health_problem(host, GPU, width_before=16) == "link trained at x8 after reset, x16 before"
    assert health_problem(host, GPU, width_before=8) is None  # it was already at x8: not the reset's doing
    width.write_text("0\n")
    assert health_problem(host, GPU, width_before=16) == "link down after reset"
    assert health_problem(host, GPU, width_before=0) is None  # no link of its own (integrated endpoint)


class _FlrFailsOnce:
    """The real sysfs writer, except that the first write to ``reset`` fails as an FLR the device
    refuses does (EINVAL/ENOTTY from the kernel)."""

    def __init__(self) -> None:
        from aifactory_core.host.pcibind import SysfsWriter

        self.real = SysfsWriter()
        self.failed = False

    def write(self, path: Path, value: str, why: str) -> None:
        if path.name == "reset" and not self.failed:
            self.failed = True
            raise HostError("writing 1 to reset failed: Inappropriate ioctl for device")
        self.real.write(path, value, why)


def _release_through_the_engine(host: HostRoot, monkeypatch: pytest.MonkeyPatch, vm: int,
                                before_release: object = None) -> None:
    """Prepare ``GPU`` for ``vm`` and release it with the engine's own ``pci_driver`` undo (reset,
    check, record, quarantine); only the driver move itself is the simulated kernel's (``simkernel``)."""
    from simkernel import SimulatedDriverCore

    from aifactory_core.lifecycle import executor
    from aifactory_core.model import Action

    core = SimulatedDriverCore()
    monkeypatch.setattr(executor, "_set_driver",
                        lambda host, address, driver, writer: core.set_driver(host, address, driver))
    executor.prepare(host, vm, [Action("pci_driver", GPU, "vfio-pci", "nvidia", f"VM {vm}")])
    if callable(before_release):
        before_release()
    assert executor.release(host, vm)


def _probe_gpu(host: HostRoot) -> dict[str, object]:
    from aifactory_core.probes.collect import collect
    from aifactory_core.probes.sysfs import Root

    snapshot = collect(Root(str(host.root), str(host.state_dir)), nvml_mode="off")
    [row] = [row for row in snapshot["gpus"] if row["BUS_ID"] == GPU]
    return row


def test_release_records_a_good_reset_and_the_probe_reports_it(host: HostRoot,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    from aifactory_core.host.sanitize import reset_history
    from aifactory_core.probes import host_system, prometheus
    from aifactory_core.probes.collect import collect
    from aifactory_core.probes.sysfs import Root

    assert _probe_gpu(host)["LAST_RESET"] == ""  # never reset: nothing to report
    _release_through_the_engine(host, monkeypatch, 7)
    assert (host.pci_devices / GPU / "reset").read_text() == "1"  # the kernel's reset was asked for
    [(stamp, result, method, reason)] = reset_history(host, GPU)
    assert (result, method, reason) == ("OK", "flr", "")  # the generated GPU lists "flr bus"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
    row = _probe_gpu(host)
    assert row["LAST_RESET"] == f"OK flr {stamp}" and row["QUARANTINED"] == "NO" and row["HEALTH"] == "OK"
    root = Root(str(host.root), str(host.state_dir))
    assert f'LAST_RESET="OK flr {stamp}"' in host_system.probe(root, None, 1.0).replace(" = ", "=")
    # the NVML path too (the GPU back on its driver, read from the real H100 recording per GPU)
    from probe_replays import DGX_GPUS, multi_gpu, write

    replay = write(multi_gpu(DGX_GPUS), host.state_dir / "dgx-nvml.json")
    [nvml_row] = [row for row in collect(root, str(replay))["gpus"] if row["BUS_ID"] == GPU]
    assert (nvml_row["HEALTH_SOURCE"], nvml_row["LAST_RESET"]) == ("NVML", f"OK flr {stamp}")
    text = prometheus.exposition(collect(root, nvml_mode="off"))
    import calendar
    import time

    epoch = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    assert re.search(rf'^aifactory_gpu_last_reset_timestamp_seconds\{{bus_id="{GPU}",[^}}]*method="flr"\}} {epoch}$',
                     text, re.M)
    assert re.search(rf'^aifactory_gpu_last_reset_ok\{{bus_id="{GPU}",[^}}]*method="flr"\}} 1$', text, re.M)


def test_release_records_a_failed_reset_and_quarantines(host: HostRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    from aifactory_core.host.sanitize import reset_history
    from aifactory_core.probes import prometheus
    from aifactory_core.probes.collect import collect
    from aifactory_core.probes.sysfs import Root

    _release_through_the_engine(host, monkeypatch, 7)
    _release_through_the_engine(host, monkeypatch, 8, lambda: (host.pci_devices / GPU / "config").write_bytes(
        b"\xff" * 256))
    history = reset_history(host, GPU)
    assert [(result, method) for _stamp, result, method, _reason in history] == [("OK", "flr"), ("FAILED", "flr")]
    reason = "config space reads all-ones: the device fell off the bus"
    assert history[-1][3] == reason and quarantined(host) == {GPU: reason}
    row = _probe_gpu(host)
    assert row["LAST_RESET"] == f"FAILED flr {history[-1][0]}: {reason}"
    assert row["QUARANTINED"] == "YES" and row["HEALTH"] == "FAILED"
    # kept from the host on vfio-pci, so no tenant's state reaches it (the simulated driver core
    # moves the driver link only, not uevent, so the link is read here rather than the probe's DRIVER)
    assert os.readlink(host.pci_devices / GPU / "driver").endswith("/vfio-pci")
    text = prometheus.exposition(collect(Root(str(host.root), str(host.state_dir)), nvml_mode="off"))
    assert f'aifactory_gpu_last_reset_ok{{bus_id="{GPU}"' in text
    assert any(line.startswith(f'aifactory_gpu_last_reset_ok{{bus_id="{GPU}"') and line.endswith(" 0")
               for line in text.splitlines())


def test_bus_reset_fallback_is_recorded_as_bus(host: HostRoot) -> None:
    from aifactory_core.host.sanitize import reset_history

    assert sanitize(host, GPU, _FlrFailsOnce()) is None  # type: ignore[arg-type]
    assert [(result, method) for _stamp, result, method, _reason in reset_history(host, GPU)] == [("OK", "bus")]
    assert (host.pci_devices / GPU / "reset_method").read_text().split() == ["flr", "bus"]  # restored
    assert _probe_gpu(host)["LAST_RESET"].startswith("OK bus ")  # type: ignore[union-attr]


def test_reset_history_is_bounded_and_dry_runs_record_nothing(host: HostRoot) -> None:
    from aifactory_core.host.sanitize import RESET_HISTORY, reset_history

    assert sanitize(host, GPU, RecordingWriter()) is None
    assert reset_history(host, GPU) == [] and not (host.state_dir / "resets").exists()
    for _ in range(RESET_HISTORY + 4):
        assert sanitize(host, GPU) is None
    assert len(reset_history(host, GPU)) == RESET_HISTORY
    leftovers = [name for name in os.listdir(host.state_dir / "resets") if name != GPU]
    assert leftovers == []  # the atomic writer left no temporary files


def test_device_without_reset_records_method_none(host: HostRoot) -> None:
    from aifactory_core.host.sanitize import reset_history

    (host.pci_devices / GPU / "reset").unlink()
    assert sanitize(host, GPU) is None
    assert [(result, method) for _stamp, result, method, _reason in reset_history(host, GPU)] == [("OK", "none")]


def test_root_helper_answers_the_method_then_the_problem(host: HostRoot, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The unprivileged release path records what the helper says it did (a bus-reset fallback
    included), and a garbled method is not written into the record."""
    from aifactory_core import rootconfig, roothelper
    from aifactory_core.host import sanitize as sanitize_module
    from aifactory_core.host.sanitize import parse_helper_reset

    monkeypatch.setattr(roothelper, "HOST_ROOT", str(host.root))
    monkeypatch.setattr(rootconfig, "ROOT_CONFIG_PATH", str(host.root / "etc/one/aifactory.conf"))
    monkeypatch.setattr(sanitize_module, "reset_check_method", lambda host, address: ("bus", "link trained at x4"))
    assert roothelper.main(["reset", "0000:1b:00.0"]) == 0
    answer = capsys.readouterr().out
    assert answer == "bus\nlink trained at x4\n"
    assert parse_helper_reset(answer, "flr") == ("bus", "link trained at x4")
    assert parse_helper_reset("flr\n\n", "flr") == ("flr", None)
    assert parse_helper_reset("../../x\nbad", "flr") == ("flr", "bad")
