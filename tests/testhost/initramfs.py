"""Build the test host's tiny initramfs: busybox-static, /init, and the modules for a 9p root.

The initramfs only loads virtio-pci, 9p and overlay, mounts the host's ``/`` read-only over 9p
and switch_roots into ``guest_init.sh`` (path given by ``testhost.init=`` on the kernel command
line).  It is written in pure Python (newc cpio, uncompressed, fixed mtimes), so it needs no
cpio/find/gzip and the same inputs give the same bytes.
"""

from __future__ import annotations

import lzma
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "mount", "umount", "insmod", "switch_root", "mkdir", "echo", "cat", "poweroff", "sleep")

# PID 1 inside the initramfs.  Never drops to a shell: any failure prints one line and powers off.
INIT_SCRIPT = """#!/bin/sh
fail() { echo "TESTHOST-FAIL: initramfs: $*"; poweroff -f; }
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m || fail "insmod $m"; done
init=
for arg in $(cat /proc/cmdline); do case $arg in testhost.init=*) init=${arg#testhost.init=};; esac; done
[ -n "$init" ] || fail "no testhost.init= on the kernel command line"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /newroot \\
    || fail "cannot mount the host root over 9p (mount_tag hostroot)"
[ -x "/newroot$init" ] || fail "guest init $init is missing or not executable on the host root"
umount /proc /sys; mount --move /dev /newroot/dev
exec switch_root /newroot "$init"
"""


class InitramfsError(RuntimeError):
    """The initramfs cannot be built on this host."""


@dataclass(frozen=True)
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def module_paths(kver: str, modules: tuple[str, ...] = ROOT_MODULES) -> list[Path]:
    """Module files in load order (dependencies first), without duplicates or built-ins."""
    ordered: list[Path] = []
    for module in modules:  # modprobe --show-depends takes one module per call
        try:
            out = subprocess.run(
                ["modprobe", "-S", kver, "--show-depends", module],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
        except FileNotFoundError:
            raise InitramfsError("modprobe not found (install kmod)") from None
        except subprocess.CalledProcessError as exc:
            raise InitramfsError(f"modprobe -S {kver} --show-depends {module}: {exc.stderr.strip()}") from None
        for line in out.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "insmod" and Path(words[1]) not in ordered:
                ordered.append(Path(words[1]))
    return ordered


def _module_bytes(path: Path) -> tuple[str, bytes]:
    """busybox insmod wants plain ELF: decompress .ko.xz; refuse formats Python cannot read."""
    if path.name.endswith(".ko.xz"):
        return path.name[: -len(".xz")], lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko"):
        return path.name, path.read_bytes()
    raise InitramfsError(f"unsupported module compression: {path}")


def is_static_elf(path: Path) -> bool:
    """True when the ELF64 file has no PT_INTERP program header (no dynamic loader needed)."""
    data = path.read_bytes()[:65536]
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
            return False
    return True


def _entries(kver: str) -> list[_Entry]:
    if not BUSYBOX.is_file() or not is_static_elf(BUSYBOX):
        raise InitramfsError(f"{BUSYBOX} is missing or not static (install busybox-static)")
    entries = [_Entry(d, stat.S_IFDIR | 0o755) for d in ("bin", "dev", "proc", "sys", "newroot", "mods")]
    entries.append(_Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(_Entry("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes()))
    entries += [_Entry(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox") for a in APPLETS]
    entries.append(_Entry("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode()))
    order = []
    for path in module_paths(kver):
        name, data = _module_bytes(path)
        entries.append(_Entry(f"mods/{name}", stat.S_IFREG | 0o644, data))
        order.append(name)
    entries.append(_Entry("mods/order", stat.S_IFREG | 0o644, "".join(f"{m}\n" for m in order).encode()))
    return entries


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _cpio_newc(entries: list[_Entry]) -> bytes:
    out = bytearray()
    for ino, e in enumerate([*entries, _Entry("TRAILER!!!", 0)], start=1):
        name = e.name.encode() + b"\0"
        fields = (ino, e.mode, 0, 0, 1, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
        header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        out += header + name + _pad4(len(header) + len(name)) + e.data + _pad4(len(e.data))
    return bytes(out)


def build(kver: str, dest: Path) -> Path:
    """Write the initramfs for kernel ``kver`` to ``dest`` (uncompressed newc cpio)."""
    dest.write_bytes(_cpio_newc(_entries(kver)))
    return dest
