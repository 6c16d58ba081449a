"""The gate between tenants: health after reset, quarantine, and refusal of quarantined devices."""

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
