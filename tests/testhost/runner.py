"""Boot the test host under QEMU/TCG, run one job in it, and hand back what happened.

The guest sees the host's ``/`` read-only over 9p, and a per-run out dir read-write at the same
path.  The job (a shell script written into the out dir) is typically one pytest session; its
exit status, JUnit XML and the whole serial console come back in :class:`GuestResult`.
Time-outs are hard: QEMU is killed when the guest is not ready within ``boot_timeout_s`` or not
finished within ``session_timeout_s``.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from testhost import initramfs
from testhost.config import GuestConfig, find_kernel_version, netdevsim_path

QEMU = "qemu-system-x86_64"
GUEST_INIT = Path(__file__).resolve().with_name("guest_init.sh")
READY = "TESTHOST-READY"
FAIL = "TESTHOST-FAIL:"
CONSOLE_LIMIT = 4 * 1024 * 1024  # bytes of console kept in memory (the file has it all)


@dataclass(frozen=True)
class GuestJob:
    """What to run in the guest: ``argv`` in ``cwd`` with ``env`` added to the guest's env."""

    argv: tuple[str, ...]
    cwd: Path
    env: tuple[tuple[str, str], ...] = ()
    start_libvirt: bool = False
    timeout_s: float | None = None  # SIGINT after this (pytest then still writes its JUnit XML)

    def script(self) -> str:
        lines = ["#!/bin/bash", "set -u"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env]
        lines.append(f"cd {shlex.quote(str(self.cwd))} || exit 125")
        argv = self.argv
        if self.timeout_s is not None:
            argv = ("timeout", "--signal=INT", "--kill-after=20", f"{self.timeout_s:.0f}", *argv)
        lines.append(" ".join(shlex.quote(a) for a in argv))
        return "\n".join(lines) + "\n"


@dataclass
class GuestResult:
    """The outcome of one boot.  ``rc`` is the job's exit status, None when it never finished."""

    rc: int | None
    out_dir: Path
    console: str
    wall_s: float
    ready_s: float | None = None
    timed_out: str | None = None  # "boot" or "session"
    qemu_rc: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def junit_xml(self) -> Path | None:
        path = self.out_dir / "junit.xml"
        return path if path.is_file() else None

    @property
    def console_log(self) -> Path:
        return self.out_dir / "console.log"

    @property
    def ok(self) -> bool:
        """The job ran to the end (its own exit status says whether it passed)."""
        return self.rc is not None and not self.timed_out

    def summary(self) -> str:
        """One line: what went wrong, or how long it took."""
        if self.timed_out == "boot":
            return f"test host did not become ready within the boot time-out ({self.wall_s:.0f}s)"
        if self.timed_out == "session":
            return f"test host session exceeded its time-out ({self.wall_s:.0f}s) and was killed"
        fail = next((ln for ln in self.console.splitlines() if ln.startswith(FAIL)), None)
        if fail:
            return fail
        if self.rc is None:
            how = "before it was ready" if self.ready_s is None else "before the job finished"
            return f"test host stopped {how} (qemu exit status {self.qemu_rc}, see console)"
        ready = f"ready after {self.ready_s:.1f}s, " if self.ready_s is not None else ""
        return f"test host job exited {self.rc} ({ready}{self.wall_s:.1f}s wall)"

    def console_tail(self, lines: int = 60) -> str:
        return "\n".join(self.console.rstrip().splitlines()[-lines:])


def missing_prerequisites(config: GuestConfig) -> list[str]:
    """Why this host cannot boot the test host, one short reason each; empty when it can."""
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} not found (apt install qemu-system-x86)")
    if shutil.which("modprobe") is None:
        missing.append("modprobe not found (apt install kmod)")
    if not initramfs.BUSYBOX.is_file() or not initramfs.is_static_elf(initramfs.BUSYBOX):
        missing.append("no static /bin/busybox (apt install busybox-static)")
    kver = find_kernel_version(config.kernel_version)
    if kver is None:
        missing.append("no Debian kernel in /lib/modules with /boot/vmlinuz-* (apt install linux-image-amd64)")
    else:
        if not Path(f"/boot/vmlinuz-{kver}").is_file() or not Path(f"/lib/modules/{kver}").is_dir():
            missing.append(f"kernel {kver}: /boot/vmlinuz-{kver} or /lib/modules/{kver} missing")
        if not netdevsim_path(kver).is_file():
            missing.append(f"{netdevsim_path(kver)} missing (run .ci/install-testhost.sh)")
    return missing


def qemu_argv(config: GuestConfig, kver: str, initrd: Path, out_dir: Path, *, libvirt: bool) -> list[str]:
    append = [
        # no_timer_check: under a loaded TCG host the IO-APIC timer check can fail and panic the boot
        "console=ttyS0", "quiet", "loglevel=3", "intel_iommu=on", "panic=-1", "no_timer_check",
        f"testhost.init={GUEST_INIT}", f"testhost.out={out_dir}", f"testhost.udev={config.udev}",
        f"testhost.libvirt={int(libvirt)}", *config.extra_append,
    ]  # fmt: skip
    return [
        QEMU, "-accel", "tcg,thread=multi", "-nodefaults", "-no-reboot",
        "-display", "none", "-serial", "stdio",
        *config.machine_args(),
        "-kernel", f"/boot/vmlinuz-{kver}", "-initrd", str(initrd), "-append", " ".join(append),
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=out,path={out_dir},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=out,mount_tag=out",
        *config.device_args(),
        *config.extra_qemu,
    ]  # fmt: skip


class _Console:
    """Drains QEMU's serial output into a file and memory; flags the ready line."""

    def __init__(self, stream: object, log: Path) -> None:
        self.ready = threading.Event()
        self._chunks: list[bytes] = []
        self._size = 0
        self._thread = threading.Thread(target=self._pump, args=(stream, log), daemon=True)
        self._thread.start()

    def _pump(self, stream: object, log: Path) -> None:
        tail = b""
        with log.open("wb") as f:
            for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
                f.write(chunk)
                f.flush()
                self._chunks.append(chunk)
                self._size += len(chunk)
                while self._size > CONSOLE_LIMIT and len(self._chunks) > 1:
                    self._size -= len(self._chunks.pop(0))
                tail = (tail + chunk)[-64:]
                if READY.encode() in tail:
                    self.ready.set()

    def text(self) -> str:
        self._thread.join(timeout=5)
        return b"".join(self._chunks).decode("utf-8", errors="replace").replace("\r\n", "\n")


def run(config: GuestConfig, job: GuestJob, out_dir: Path | None = None) -> GuestResult:
    """Boot the guest described by ``config``, run ``job``, power off; never hangs."""
    config = config.with_env_overrides()
    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="aifactory-testhost-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    kver = find_kernel_version(config.kernel_version)
    if kver is None:
        raise RuntimeError("no Debian kernel in /lib/modules (run .ci/install-testhost.sh)")
    (out_dir / "job.sh").write_text(job.script())
    initrd = initramfs.build(kver, out_dir / "initramfs.cpio")
    argv = qemu_argv(config, kver, initrd, out_dir, libvirt=job.start_libvirt)
    (out_dir / "qemu.argv").write_text(shlex.join(argv) + "\n")

    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    console = _Console(proc.stdout, out_dir / "console.log")
    timed_out = None
    ready_s = None
    while proc.poll() is None:
        elapsed = time.monotonic() - start
        if ready_s is None and console.ready.is_set():
            ready_s = elapsed
        if ready_s is None and elapsed > config.boot_timeout_s:
            timed_out = "boot"
        elif elapsed > config.session_timeout_s:
            timed_out = "session"
        if timed_out:
            proc.kill()
            break
        console.ready.wait(0.2) if ready_s is None else time.sleep(0.2)
    qemu_rc = proc.wait()
    wall = time.monotonic() - start
    if ready_s is None and console.ready.is_set():
        ready_s = wall
    rc_file = out_dir / "rc"
    rc = int(rc_file.read_text().strip()) if rc_file.is_file() and not timed_out else None
    return GuestResult(rc, out_dir, console.text(), wall, ready_s, timed_out, qemu_rc)
