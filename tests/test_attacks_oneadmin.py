"""Attacks on root by the real ``oneadmin`` (looked up; its uid is switched to with ``setpriv``).

* Through the real ``sudo`` and the suite's sudoers snippet (:mod:`sudoharness`): the helper asked
  to move or reset this machine's own devices as the kernel shows them (the disk holding a mounted
  filesystem, the NIC carrying an address or the default route, a function listed in ``[host]
  host_devices``), each by every verb; argv outside the grammar; ``sudo`` options and environment
  that would reach root's interpreter. Every sysfs file the helper could write for the target is
  covered by a guard file in the call's private mount namespace: the evidence that nothing was
  written, and the reason the real device cannot move.
* Links and hard links planted, as ``oneadmin``, at every path root opens in the state directory,
  while root's own commands run there.
* Races: ``oneadmin`` swapping a state subdirectory for a link (or the install manifest for its
  own file) in a loop while root repeats the operation that checks and then acts.
* The install manifest in ``oneadmin``'s directory, forged or replaced, on ``--uninstall``.

Each case is one attack (marker ``root_attack``, counted in the session's summary line); the
controls (unmarked) show the same harness does act when the request is legitimate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import needs
import pytest
from sudoharness import SudoStage, driver_link, guard_targets, oneadmin

from aifactory_core.hostroot import HostRoot

attack = pytest.mark.root_attack
REPO = Path(__file__).resolve().parents[1]
GPU = "0000:1b:00.0"


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A root-owned 0755 directory under ``/tmp`` that oneadmin can reach."""
    path = Path(tempfile.mkdtemp(prefix="aifactory-oneadmin-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---- the live machine's own devices, through sudo -------------------------------------------------


def _live_uses() -> tuple[dict[str, str], dict[str, str]]:
    from aifactory_core.host.blockuse import block_uses
    from aifactory_core.host.netuse import net_uses

    live = HostRoot(Path("/"))
    return block_uses(live), net_uses(live)


def _unused_function(excluded: set[str], attribute: str = "class") -> str | None:
    """A PCI function the kernel shows no use of (no bridge), with sysfs ``attribute``: what
    ``host_devices`` alone protects."""
    for address in sorted(os.listdir("/sys/bus/pci/devices")):
        device = Path("/sys/bus/pci/devices") / address
        if address not in excluded and not (device / "class").read_text().startswith("0x06") and (
                device / attribute).exists():
            return address
    return None


def live_target(kind: str) -> tuple[str, str]:
    """``(address, why)`` of this machine's device of ``kind``; unavailable when it has none."""
    blocks, nets = _live_uses()
    if kind == "mounted-disk":
        found = [(address, why) for address, why in blocks.items() if "mounted" in why]
    elif kind == "host-nic":
        found = list(nets.items())
    else:
        address = _unused_function(set(blocks) | set(nets))
        found = [(address, "listed in [host] host_devices")] if address else []
    if not found:
        needs.unavailable(f"this machine has no PCI {kind} to attack")
    return found[0]


@pytest.fixture
def stage(open_tmp: Path) -> SudoStage:
    oneadmin()
    listed = _unused_function(set().union(*_live_uses()))
    return SudoStage(open_tmp / "sudo", f'[host]\nhost_devices = ["{listed}"]\n' if listed else "[host]\n")


VERBS = [["set-driver", "{}", "vfio-pci"], ["set-driver", "{}", "none"], ["reset", "{}"]]
LIVE = [pytest.param(kind, verb, id=f"live-{kind}-{'-'.join(word for word in verb if word != '{}')}")
        for kind in ("mounted-disk", "host-nic", "host-devices-entry") for verb in VERBS]


@attack
@pytest.mark.parametrize(("kind", "verb"), LIVE)
def test_sudo_helper_refuses_this_machines_own_device(stage: SudoStage, kind: str, verb: list[str]) -> None:
    address, why = live_target(kind)
    argv = [word.format(address) for word in verb]
    guards = guard_targets(address)
    before = driver_link(address)
    outcome = stage.run(argv, guard=guards)
    assert outcome.status != 0 and len(outcome.stderr.splitlines()) == 1, outcome
    assert outcome.stderr.startswith(f"aifactory-root-helper: refusing {address}: the host uses it ("), outcome
    assert why.split(" (")[0] in outcome.stderr, outcome
    assert outcome.guards_written == {} and driver_link(address) == before


def test_control_the_same_sudo_path_resets_a_function_nobody_uses(open_tmp: Path) -> None:
    """The control: the harness does reach the helper as root, which judges the request fine and
    resets the function (into the guard file, where the function has a ``reset``; a function
    without one is answered ``none``, nothing written)."""
    oneadmin()
    blocks, nets = _live_uses()
    address = _unused_function(set(blocks) | set(nets), "reset") or _unused_function(set(blocks) | set(nets))
    if address is None:
        needs.unavailable("no PCI function the host does not use on this machine")
    stage = SudoStage(open_tmp / "sudo", "[host]\n")
    outcome = stage.run(["reset", address], guard=guard_targets(address))
    assert outcome.status == 0, outcome
    method = outcome.stdout.splitlines()[0]
    if (Path("/sys/bus/pci/devices") / address / "reset").exists():
        assert method != "none" and outcome.guards_written == {f"/sys/bus/pci/devices/{address}/reset": "1"}, outcome
    else:
        assert method == "none" and outcome.guards_written == {}, outcome


# ---- argv and sudo's own surface ------------------------------------------------------------------

UNUSED = "{unused}"
ARGV = [
    ("extra-word", ["set-driver", UNUSED, "vfio-pci", "extra"]),
    ("path-as-address", ["set-driver", "../../../../etc/passwd", "vfio-pci"]),
    ("address-with-dotdot", ["set-driver", UNUSED + "/../0000:00:00.0", "vfio-pci"]),
    ("address-with-newline", ["set-driver", UNUSED + "\n", "vfio-pci"]),
    ("address-with-blank", ["set-driver", " " + UNUSED, "vfio-pci"]),
    ("short-address", ["set-driver", UNUSED[5:], "vfio-pci"]),
    ("driver-with-semicolon", ["set-driver", UNUSED, "vfio-pci;id"]),
    ("driver-as-path", ["set-driver", UNUSED, "../../../tmp/x"]),
    ("driver-with-slash", ["set-driver", UNUSED, "vfio-pci/../nvme"]),
    ("driver-empty", ["set-driver", UNUSED, ""]),
    ("driver-dollar", ["set-driver", UNUSED, "$(id)"]),
    ("reset-extra-word", ["reset", UNUSED, "now"]),
    ("reset-option", ["reset", "--help"]),
    ("unknown-verb", ["bind", UNUSED]),
    ("vf-set-duplicate-key", ["vf-set", "eth0", "0", "vlan=5", "vlan=6"]),
    ("vf-set-unknown-key", ["vf-set", "eth0", "0", "script=/bin/sh"]),
    ("vf-set-ifname-path", ["vf-set", "../eth0", "0", "vlan=5"]),
    ("vf-set-negative-index", ["vf-set", "eth0", "-1", "vlan=5"]),
    ("vf-set-blank-index", ["vf-set", "eth0", " 1", "vlan=5"]),
    ("vf-set-huge-index", ["vf-set", "eth0", "99999", "vlan=5"]),
    ("vf-set-mac-injection", ["vf-set", "eth0", "0", "mac=00:11:22:33:44:55;reboot"]),
    ("vf-scrub-unknown-kind", ["vf-scrub", "eth0", "0", "sh"]),
    ("vf-scrub-extra-word", ["vf-scrub", "eth0", "0", "eth", "extra"]),
    ("vf-scrub-outside-the-pools", ["vf-scrub", "eth0", "0", "eth"]),
]


@attack
@pytest.mark.parametrize("argv", [pytest.param(argv, id=name) for name, argv in ARGV])
def test_sudo_helper_refuses_argv_outside_its_grammar(stage: SudoStage, argv: list[str]) -> None:
    """The target, where there is one, is a function nobody uses: only the grammar (or, for the
    last case, the pools) stands between the request and a write."""
    unused = _unused_function(set().union(*_live_uses())) or "0000:00:00.0"
    stage.write_config("[host]\n")
    words = [word.replace(UNUSED, unused) for word in argv]
    guards = guard_targets(unused)
    outcome = stage.run(words, guard=guards)
    assert outcome.status != 0 and len(outcome.stderr.splitlines()) == 1, outcome
    assert outcome.stderr.startswith(("aifactory-root-helper: ", "sudo: ")), outcome  # the helper, or sudo
    assert outcome.guards_written == {}, outcome


SUDO_SURFACE = [
    ("preserve-environment", dict(sudo_options=["-E"], env={"PYTHONPATH": "{evil}"})),
    ("set-variable-on-the-command-line", dict(sudo_options=["PYTHONPATH={evil}"])),
    ("python-variables-in-the-environment", dict(env={
        "PYTHONPATH": "{evil}", "PYTHONSTARTUP": "{evil}/sitecustomize.py", "PYTHONINSPECT": "1",
        "PYTHONHOME": "{evil}"})),
    ("another-user", dict(sudo_options=["-u", "daemon"])),
    ("the-environments-interpreter", dict(command="/usr/local/lib/aifactory/venv/bin/python3",
                                          argv=["-c", "import os; open('{evil}/proof', 'w')"])),
    ("a-shell", dict(command="/bin/sh", argv=["-c", "id > {evil}/proof"])),
    ("the-helper-by-a-relative-path", dict(command="../../usr/local/lib/aifactory/venv/bin/aifactory-root-helper")),
    ("a-verb-the-snippet-does-not-list", dict(argv=["list"])),
]


@attack
@pytest.mark.parametrize("how", [pytest.param(how, id=name) for name, how in SUDO_SURFACE])
def test_sudo_gives_root_nothing_but_the_helpers_verbs(stage: SudoStage, open_tmp: Path,
                                                       how: dict[str, object]) -> None:
    """Each would run code of oneadmin's as root (its sitecustomize writes the proof), or run the
    helper outside the snippet; sudo refuses, or the interpreter never sees the variables."""
    evil = open_tmp / "evil"
    evil.mkdir(mode=0o777)
    evil.chmod(0o777)
    (evil / "sitecustomize.py").write_text(f"open({str(evil / 'proof')!r}, 'w').write('root')\n")
    (evil / "sitecustomize.py").chmod(0o644)
    unused = _unused_function(set().union(*_live_uses())) or "0000:00:00.0"
    stage.write_config(f'[host]\nhost_devices = ["{unused}"]\n')

    def fill(value: object) -> object:
        if isinstance(value, str):
            return value.replace("{evil}", str(evil))
        if isinstance(value, list):
            return [fill(item) for item in value]
        if isinstance(value, dict):
            return {key: fill(item) for key, item in value.items()}
        return value

    options = fill(how)
    assert isinstance(options, dict)
    argv = options.pop("argv", ["reset", unused])
    outcome = stage.run(argv, guard=guard_targets(unused), **options)
    assert outcome.status != 0, outcome
    assert not (evil / "proof").exists(), outcome
    assert outcome.guards_written == {}, outcome


# ---- links and hard links planted where root opens ------------------------------------------------


def as_oneadmin(*argv: str) -> None:
    user = oneadmin()
    setpriv = needs.tool("setpriv", hint="util-linux")
    subprocess.run([setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", *argv],
                   check=True, capture_output=True, timeout=60)


@pytest.fixture
def state(open_tmp: Path) -> HostRoot:
    """A state directory oneadmin owns, as on a host (the operations here read no sysfs: the host
    root is empty)."""
    needs.root("root's own commands in oneadmin's state directory")
    root = open_tmp / "root"
    root.mkdir()
    directory = open_tmp / "state"
    directory.mkdir()
    user = oneadmin()
    os.chown(directory, user.pw_uid, user.pw_gid)
    return HostRoot(root, directory)


def _claim(host: HostRoot) -> None:
    from aifactory_core.lifecycle import ownership

    ownership.claim(host, GPU, 5)


def _disown(host: HostRoot) -> None:
    from aifactory_core.lifecycle import ownership

    ownership.disown(host, GPU, 5)


def _held(host: HostRoot) -> None:
    from aifactory_core.lifecycle import ownership

    ownership.held_devices(host)


def _quarantine(host: HostRoot) -> None:
    from aifactory_core.host.sanitize import quarantine

    quarantine(host, GPU, "reset failed")


def _clear_quarantine(host: HostRoot) -> None:
    from aifactory_core.host.sanitize import clear_quarantine

    clear_quarantine(host, GPU)


def _record_reset(host: HostRoot) -> None:
    from aifactory_core.host.sanitize import record_reset

    record_reset(host, GPU, "flr", None)


def _save_journal(host: HostRoot) -> None:
    from aifactory_core.lifecycle.journal import Journal

    Journal(host, 7).save()


def _load_journal(host: HostRoot) -> None:
    from aifactory_core.lifecycle.journal import Journal

    Journal.load(host, 7)


def _remove_journal(host: HostRoot) -> None:
    from aifactory_core.lifecycle.journal import Journal

    Journal(host, 7).remove()


def _repair(host: HostRoot) -> None:
    from aifactory_core.lifecycle.repair import repair

    repair(host, boot=True)


def _vnm_journal(host: HostRoot) -> None:
    from aifactory_core.lifecycle.journal import Journal
    from aifactory_core.vnm.hook import vnm_host

    Journal(vnm_host(host), 7).save()


def _fingerprint(host: HostRoot) -> None:
    from aifactory_core.host.fingerprint import record

    record(host, GPU, {"serial": "1"})


def _vf_lock(host: HostRoot) -> None:
    from aifactory_core.vnm import vf as vf_actions

    with vf_actions._token_lock(host, "enp170s0f0np0", 0):
        pass


OPERATIONS: dict[str, tuple[str, Callable[[HostRoot], None]]] = {
    # name: (the path root opens, relative to the state directory; what root does there)
    "owner-record-claim": (f"owners/{GPU}", _claim),
    "owner-record-disown": (f"owners/{GPU}", _disown),
    "owner-records-listed": (f"owners/{GPU}", _held),
    "device-lock": (f"locks/{GPU}.lock", _claim),
    "quarantine-marker-write": (f"quarantine/{GPU}", _quarantine),
    "quarantine-marker-clear": (f"quarantine/{GPU}", _clear_quarantine),
    "reset-history": (f"resets/{GPU}", _record_reset),
    "journal-save": ("vms/7.json", _save_journal),
    "journal-load": ("vms/7.json", _load_journal),
    "journal-remove": ("vms/7.json", _remove_journal),
    "journal-repair": ("vms/7.json", _repair),
    "network-journal": ("vnm/vms/7.json", _vnm_journal),
    "fingerprint": (f"fingerprints/{GPU}.json", _fingerprint),
    "vf-token-lock": ("vf-owners/enp170s0f0np0.0.lock", _vf_lock),
}


def _plant(state_dir: Path, relative: str, how: str, outside: Path) -> Path:
    """oneadmin plants, at ``relative``, a link of kind ``how`` to a file (or directory) of root's."""
    place = state_dir / relative
    as_oneadmin("mkdir", "-p", str(place.parent))
    if how == "symlink":
        target = outside / "root-only"
        target.write_text("root-only secret\n")
        target.chmod(0o600)
        as_oneadmin("ln", "-s", str(target), str(place))
    elif how == "hardlink":  # a root file oneadmin may link to (protected_hardlinks: it can read and write it)
        target = outside / "shared"
        target.write_text("root's shared file\n")
        target.chmod(0o666)
        as_oneadmin("ln", str(target), str(place))
    else:  # the directory holding it
        target = outside / "root-directory"
        target.mkdir()
        (target / place.name).write_text("root's file\n")
        directory = place.parent
        as_oneadmin("rmdir", str(directory))
        as_oneadmin("ln", "-s", str(target), str(directory))
    return target


def _fingerprints(path: Path) -> dict[str, tuple[int, int, int, bytes]]:
    found = {}
    for each in [path, *path.rglob("*")] if path.is_dir() else [path]:
        info = each.lstat()
        found[str(each)] = (info.st_uid, info.st_gid, info.st_mode, each.read_bytes() if each.is_file() else b"")
    return found


PLANTED = [pytest.param(relative, operation, how, id=f"{how}-{name}")
           for how in ("symlink", "hardlink", "directory-link")
           for name, (relative, operation) in OPERATIONS.items()]


@attack
@pytest.mark.parametrize(("relative", "operation", "how"), PLANTED)
def test_root_opens_nothing_through_what_oneadmin_planted(state: HostRoot, open_tmp: Path, relative: str,
                                                          operation: Callable[[HostRoot], None], how: str) -> None:
    from aifactory_core.errors import AifactoryError

    outside = open_tmp / "outside"
    outside.mkdir()
    target = _plant(state.state_dir, relative, how, outside)
    before = _fingerprints(outside)
    try:
        operation(state)
    except AifactoryError as error:
        assert "not following it" in error.message or "not using it" in error.message or (
            "is not a regular file" in error.message or "damaged" in error.message), error.message
    assert _fingerprints(outside) == before, target
    leaked = [path for path in state.state_dir.rglob("*")
              if path.is_file() and not path.is_symlink() and path.stat().st_nlink == 1
              and b"secret" in path.read_bytes()]
    assert leaked == []


@attack
def test_root_reads_no_root_only_file_hard_linked_into_the_state_dir(state: HostRoot, open_tmp: Path) -> None:
    """Where the kernel lets anyone link any file (``fs.protected_hardlinks = 0``; made here by root,
    since this kernel refuses oneadmin), a reset history linked to a root-only file had root copy
    it into a new file of oneadmin's."""
    from aifactory_core.errors import AifactoryError

    secret = open_tmp / "shadow"
    secret.write_text("root-only secret line\n")
    secret.chmod(0o600)
    as_oneadmin("mkdir", "-p", str(state.state_dir / "resets"))
    os.link(secret, state.state_dir / "resets" / GPU)
    with pytest.raises(AifactoryError, match="hard link to a file of uid 0: not using it"):
        _record_reset(state)
    copies = [path for path in state.state_dir.rglob("*") if path.is_file() and path.stat().st_ino !=
              secret.stat().st_ino and b"secret" in path.read_bytes()]
    assert copies == [] and secret.read_text() == "root-only secret line\n"


# ---- races: oneadmin swaps a directory while root checks and acts ---------------------------------

SWAPPER = """
import os, sys, time
directory, outside, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
away = directory + ".away"
end = time.monotonic() + seconds
swaps = 0
while time.monotonic() < end:
    try:
        os.rename(directory, away)
        os.symlink(outside, directory)
        os.unlink(directory)
        os.rename(away, directory)
        swaps += 1
    except OSError:
        pass
print(swaps)
"""

RACES = {
    "claim-and-disown": ("owners", lambda host: (_claim(host), _disown(host))),
    "device-lock": ("locks", _claim),
    "quarantine-and-clear": ("quarantine", lambda host: (_quarantine(host), _clear_quarantine(host))),
    "reset-history": ("resets", _record_reset),
    "journal-save-and-remove": ("vms", lambda host: (_save_journal(host), _remove_journal(host))),
    "damaged-journal-set-aside": ("vms", lambda host: (_write_damaged(host), _repair(host))),
    "fingerprint": ("fingerprints", _fingerprint),
}


def _write_damaged(host: HostRoot) -> None:
    from aifactory_core.lifecycle.atomic import write_atomic

    write_atomic(host.state_dir / "vms" / "7.json", b"[]")


@attack
@pytest.mark.parametrize(("directory", "operation"), [pytest.param(*value, id=name) for name, value in RACES.items()])
def test_a_directory_swapped_for_a_link_in_a_loop_never_sends_root_outside(
        state: HostRoot, open_tmp: Path, directory: str, operation: Callable[[HostRoot], object]) -> None:
    from aifactory_core.errors import AifactoryError

    outside = open_tmp / "outside"
    outside.mkdir()
    (outside / "root-file").write_text("root's\n")
    as_oneadmin("mkdir", "-p", str(state.state_dir / directory))
    before = _fingerprints(outside)
    user = oneadmin()
    swapper = subprocess.Popen(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
                                "/usr/bin/python3", "-c", SWAPPER, str(state.state_dir / directory), str(outside), "3"],
                               stdout=subprocess.PIPE, text=True)
    rounds = 0
    deadline = time.monotonic() + 2.5
    try:
        while time.monotonic() < deadline:
            try:
                operation(state)
            except (AifactoryError, OSError):
                pass  # refused, or the directory was away at that moment
            rounds += 1
    finally:
        swaps = int(swapper.communicate(timeout=60)[0].strip() or 0)
    assert swaps > 0 and rounds > 0, (swaps, rounds)
    assert _fingerprints(outside) == before


# ---- the install manifest on --uninstall ----------------------------------------------------------


@pytest.fixture
def installed(open_tmp: Path) -> tuple[Path, Path]:
    """A staged frontend root whose state directory is oneadmin's, with a manifest root wrote, and
    a precious file of root's outside it."""
    needs.root("the installer runs as root")
    from aifactory_core.install import layout

    root = open_tmp / "root"
    target = layout.Layout(root)
    state = target.path(target.state_dir)
    state.mkdir(parents=True)
    user = oneadmin()
    os.chown(state, user.pw_uid, user.pw_gid)
    precious = open_tmp / "precious"
    precious.mkdir()
    (precious / "file").write_text("root's\n")
    manifest = target.path(target.manifest)
    manifest.write_text(json.dumps({"format": 1, "prefix": layout.DEFAULT_PREFIX, "files": [], "directories": [],
                                    "hooks": {}, "environments": []}))
    manifest.chmod(0o644)
    return root, precious


def uninstall(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aifactory_core.install.main", "uninstall", "--destdir", str(root),
                           "--no-hooks", "--source", str(REPO)], capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, "ONE_LOCATION": ""})


def _forged(precious: Path) -> dict[str, object]:
    return {"format": 1, "prefix": "/opt/aifactory", "hooks": {},
            "files": [{"path": str(precious / "file"), "kind": "file", "mode": 420, "sha256": "0" * 64},
                      {"path": "/var/lib/one/remotes/vmm/kvm/deploy", "kind": "wrapper", "mode": 493,
                       "sha256": "0" * 64, "original": str(precious / "file")}],
            "environments": [str(precious)], "directories": [str(precious / "empty")]}


def _oneadmin_replaces_the_manifest(root: Path, precious: Path) -> None:
    manifest = root / "var/lib/one/aifactory/install-manifest.json"
    as_oneadmin("rm", "-f", str(manifest))
    as_oneadmin("/usr/bin/python3", "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(manifest),
                json.dumps(_forged(precious)))


def _oneadmin_links_the_manifest(root: Path, precious: Path) -> None:
    elsewhere = precious.parent / "looks-like-a-manifest.json"
    elsewhere.write_text(json.dumps(_forged(precious)))
    manifest = root / "var/lib/one/aifactory/install-manifest.json"
    as_oneadmin("rm", "-f", str(manifest))
    as_oneadmin("ln", "-s", str(elsewhere), str(manifest))


def _root_owned_manifest_naming_outside_paths(root: Path, precious: Path) -> None:
    """A manifest of root's (an older run's, put back by oneadmin, or edited by hand) naming paths
    this installer never places: left alone whatever it says."""
    (precious / "empty").mkdir()
    manifest = root / "var/lib/one/aifactory/install-manifest.json"
    manifest.write_text(json.dumps(_forged(precious)))


MANIFEST_ATTACKS = [
    pytest.param(_oneadmin_replaces_the_manifest, "not trusted as the install manifest", id="manifest-replaced"),
    pytest.param(_oneadmin_links_the_manifest, "not trusted as the install manifest", id="manifest-a-link"),
    pytest.param(_root_owned_manifest_naming_outside_paths, "left", id="manifest-names-outside-paths"),
]


@attack
@pytest.mark.parametrize(("forge", "named"), MANIFEST_ATTACKS)
def test_uninstall_removes_nothing_a_forged_manifest_names(installed: tuple[Path, Path],
                                                           forge: Callable[[Path, Path], None], named: str) -> None:
    root, precious = installed
    forge(root, precious)
    before = _fingerprints(precious)
    result = uninstall(root)
    assert named in result.stdout + result.stderr, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert _fingerprints(precious) == before, result.stdout + result.stderr


@attack
def test_stage_writes_no_file_through_a_planted_temporary_name(open_tmp: Path) -> None:
    """``stage._write`` makes a new temporary name (O_EXCL | O_NOFOLLOW): a link planted at the old
    fixed name ``.<name>.aifactory-new`` is never written through."""
    from aifactory_core.install import stage

    outside = open_tmp / "outside"
    outside.write_text("root's\n")
    directory = open_tmp / "dir"
    directory.mkdir()
    (directory / ".target.aifactory-new").symlink_to(outside)
    stage._write(directory / "target", b"new\n", 0o644)
    assert outside.read_text() == "root's\n" and (directory / "target").read_text() == "new\n"
    assert sorted(os.listdir(directory)) == [".target.aifactory-new", "target"]

