"""``aifactory doctor --frontend``: is the suite installed on this frontend the way OpenNebula needs it?

Checks, each PASS/WARN/FAIL with the fix: the recorded installation (every file present, unchanged,
with its mode), the VMM wrappers (still the wrapper, original kept as ``<action>.one``: a package
upgrade of OpenNebula overwrites the remotes), the state directory, the sudoers snippet (``visudo
-cf``), the Python environments, the drivers in ``oned.conf``/``monitord.conf`` (``VM_MAD`` kvm
running the wrapped actions on the hosts, ``IM_MAD`` kvm, ``HM_MAD`` for the hooks) and the hooks
registered with oned; ``release`` in ``VM_ADMIN_OPERATIONS`` (oned.conf, and the running oned through
``one.system.config``); where ``--enable-hook-server`` enabled the hook server, whether it runs;
the hosts' PCI lists (:mod:`aifactory_core.install.pci_doctor`: ``pci.conf`` leaves the GPUs to the
suite's probe, every device a host offered is in oned's share, ``PCI_FILTER`` named when it is not).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aifactory_core.errors import AifactoryError
from aifactory_core.install import hook_server, layout
from aifactory_core.install.manifest import SUDOERS, WRAPPER
from aifactory_core.install.stage import VISUDO_PATHS
from aifactory_core.model import Check

UPGRADE_FIX = "run install.sh --upgrade, then as oneadmin: onehost sync --force"


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def file_checks(target: layout.Layout, record: dict[str, Any]) -> list[Check]:
    checks: list[Check] = []
    for item in record.get("files", []):
        where = item["path"]
        path = target.path(where)
        relative = where.removeprefix(target.remotes + "/")
        digest = _digest(path)
        if item["kind"] == WRAPPER:
            original = target.path(item["original"])
            if digest != item["sha256"]:
                checks.append(Check("wrapper", "FAIL", f"{relative} is not the aifactory wrapper (an OpenNebula "
                                    "upgrade overwrote it?): VMs deploy without device preparation",
                                    fix=UPGRADE_FIX, subject=where))
            elif not os.access(original, os.X_OK):
                checks.append(Check("wrapper", "FAIL", f"{relative}.one (OpenNebula's original) is missing",
                                    fix="reinstall OpenNebula's remotes (opennebula package), then " + UPGRADE_FIX,
                                    subject=where))
            else:
                checks.append(Check("wrapper", "PASS", f"{relative} wraps {relative}.one", subject=where))
            continue
        if digest is None:
            checks.append(Check("file", "FAIL", f"{where} is missing", fix=UPGRADE_FIX, subject=where))
        elif digest != item["sha256"] and item["kind"] != "config":
            checks.append(Check("file", "WARN", f"{where} differs from what was installed", fix=UPGRADE_FIX,
                                subject=where))
        elif item["kind"] != "config" and stat.S_IMODE(path.stat().st_mode) != item["mode"]:
            checks.append(Check("file", "WARN", f"{where} has mode {stat.S_IMODE(path.stat().st_mode):o}, "
                                f"expected {item['mode']:o}", fix=f"chmod {item['mode']:o} {where}", subject=where))
        if item["kind"] == SUDOERS and digest is not None:
            checks.append(sudoers_check(path, where))
    missing = [c for c in checks if c.name == "file" and c.status != "PASS"]
    if not missing:
        count = sum(1 for item in record.get("files", []) if item["kind"] != WRAPPER)
        checks.append(Check("files", "PASS", f"{count} installed files present and unchanged"))
    return checks


def sudoers_check(path: Path, where: str) -> Check:
    visudo = next((p for p in VISUDO_PATHS if os.access(p, os.X_OK)), None)
    if visudo is None:
        return Check("sudoers", "WARN", "visudo not found: the sudoers snippet was not checked",
                     fix="apt-get install sudo", subject=where)
    result = subprocess.run([visudo, "-cf", str(path)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return Check("sudoers", "FAIL", f"{where} refused by visudo: {' '.join(result.stderr.split())[:200]}",
                     fix=UPGRADE_FIX, subject=where)
    return Check("sudoers", "PASS", f"{where} passes visudo -cf", subject=where)


def state_check(target: layout.Layout) -> Check:
    import pwd

    path = target.path(target.state_dir)
    if not path.is_dir():
        return Check("state", "FAIL", f"{target.state_dir} is missing", fix="run install.sh")
    info = path.stat()
    problems = []
    if stat.S_IMODE(info.st_mode) != 0o750:
        problems.append(f"mode {stat.S_IMODE(info.st_mode):o}, expected 750")
    try:
        owner = pwd.getpwnam(layout.OWNER)
        if info.st_uid != owner.pw_uid:
            problems.append(f"owned by uid {info.st_uid}, expected {layout.OWNER}")
    except KeyError:
        if not target.staged:
            problems.append(f"user {layout.OWNER} does not exist")
    if problems:
        return Check("state", "FAIL", f"{target.state_dir}: {'; '.join(problems)}",
                     fix=f"chown {layout.OWNER}:{layout.OWNER} {target.state_dir} && chmod 750 {target.state_dir}")
    return Check("state", "PASS", f"{target.state_dir} (750, {layout.OWNER})")


def environment_checks(target: layout.Layout, record: dict[str, Any]) -> list[Check]:
    checks = []
    for environment in record.get("environments", []):
        python = target.path(environment) / "bin" / "python3"
        if os.access(python, os.X_OK):
            checks.append(Check("python", "PASS", f"{environment} present", subject=environment))
        else:
            checks.append(Check("python", "FAIL", f"{environment} is missing or broken", fix=UPGRADE_FIX,
                                subject=environment))
    return checks


def _drivers(path: Path, key: str) -> list[dict[str, str]] | None:
    from aifactory_core.one.template import parse_template

    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return [value for name, value in parse_template(text, str(path)) if name == key and isinstance(value, dict)]


def oned_checks(target: layout.Layout, wrapped: Sequence[str]) -> list[Check]:
    checks: list[Check] = []
    vm_mads = _drivers(target.path(target.oned_conf), "VM_MAD")
    if vm_mads is None:
        return [Check("oned.conf", "FAIL", f"{target.oned_conf} not readable: is this the OpenNebula frontend?",
                      fix="run install.sh and aifactory doctor --frontend on the frontend, as root")]
    kvm = [mad for mad in vm_mads if mad.get("NAME") == "kvm"]
    if not kvm:
        checks.append(Check("oned.conf", "FAIL", "no VM_MAD named kvm in oned.conf",
                            fix='restore the VM_MAD = [ NAME = "kvm", EXECUTABLE = "one_vmm_exec", ... ] block'))
    for mad in kvm:
        arguments = mad.get("ARGUMENTS", "").split()
        local: set[str] = set()
        for index, token in enumerate(arguments):
            if token == "-l" and index + 1 < len(arguments):
                local |= {action.split("=")[0] for action in arguments[index + 1].split(",")}
        if not arguments or arguments[-1] != "kvm" and "kvm" not in arguments:
            checks.append(Check("oned.conf", "FAIL", "VM_MAD kvm does not use the kvm remotes directory",
                                fix='VM_MAD kvm ARGUMENTS must name the "kvm" remotes directory'))
        elif local & set(wrapped):
            checks.append(Check("oned.conf", "FAIL", "VM_MAD kvm runs " + ", ".join(sorted(local & set(wrapped)))
                                + " on the frontend (-l): the wrappers must run on the hosts",
                                fix="remove those actions from -l in VM_MAD kvm ARGUMENTS; restart opennebula"))
        else:
            checks.append(Check("oned.conf", "PASS", f"VM_MAD kvm: {mad.get('EXECUTABLE')} {' '.join(arguments)}"))
    hm = _drivers(target.path(target.oned_conf), "HM_MAD") or []
    if not hm:
        checks.append(Check("oned.conf", "FAIL", "no HM_MAD in oned.conf: hooks never run",
                            fix='add HM_MAD = [ EXECUTABLE = "one_hm", ARGUMENTS = "-p 2101 -l 2102 -b 127.0.0.1" ]'))
    checks.append(submit_on_hold_check(target))
    checks.append(release_check(target))
    im = _drivers(target.path(target.monitord_conf), "IM_MAD")
    if not im or not any(mad.get("NAME") == "kvm" for mad in im):
        checks.append(Check("monitord.conf", "FAIL", "no IM_MAD named kvm in monitord.conf: probes never run",
                            fix='restore IM_MAD = [ NAME = "kvm", EXECUTABLE = "one_im_ssh", ... ] in monitord.conf'))
    return checks


def submit_on_hold_check(target: layout.Layout) -> Check:
    """Admission releases what it admits, so VMs must be created on hold: oned 7.0 holds a new VM only
    for ``VM_SUBMIT_ON_HOLD = "YES"`` in oned.conf or a hold asked in the call itself (a template's
    ``SUBMIT_ON_HOLD`` is copied into the VM, not acted on, at instantiate)."""
    from aifactory_core.one.template import parse_template

    try:
        text = target.path(target.oned_conf).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    values = [value for name, value in parse_template(text, target.oned_conf) if name == "VM_SUBMIT_ON_HOLD"]
    if values and isinstance(values[0], str) and values[0].strip().upper() == "YES":  # oned: the first, YES only
        return Check("oned.conf", "PASS", 'VM_SUBMIT_ON_HOLD = "YES": new VMs wait for admission')
    return Check("oned.conf", "FAIL", "VM_SUBMIT_ON_HOLD is not YES: a tenant's VM is scheduled before the admission "
                 "hook has decided on it", fix='set VM_SUBMIT_ON_HOLD = "YES" in oned.conf; restart opennebula')


def release_check(target: layout.Layout) -> Check:
    """Admission holds what it refuses; ``release`` must then be an ADMIN VM operation in oned.conf
    (OpenNebula ships it among VM_MANAGE_OPERATIONS, which every VM owner has)."""
    from aifactory_core.install import vmops

    try:
        text = target.path(target.oned_conf).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    if vmops.configured_admin(text):
        return Check("oned.conf", "PASS", "release is in VM_ADMIN_OPERATIONS: a tenant cannot release a VM "
                     "admission holds")
    return Check("oned.conf", "FAIL", "release is not in VM_ADMIN_OPERATIONS: a tenant releases the VMs admission "
                 "holds (onevm release)", fix="run install.sh (it moves release into VM_ADMIN_OPERATIONS), then "
                 "restart oned")


def running_release_check(oned: Any) -> Check | None:
    """What the running oned read at its start (``one.system.config``): a changed oned.conf acts only
    after a restart. None when oned does not answer (not oneadmin's credentials)."""
    from aifactory_core.install import vmops

    try:
        config = oned.document("one.system.config")
    except AifactoryError:
        return None
    value = config.findtext("VM_ADMIN_OPERATIONS")
    if value is None:
        return None
    if vmops.OPERATION in vmops.operations(value):
        return Check("oned", "PASS", "the running oned has release in VM_ADMIN_OPERATIONS")
    return Check("oned", "FAIL", "the running oned still has release outside VM_ADMIN_OPERATIONS (oned.conf "
                 "changed since it started)", fix="restart oned: systemctl restart opennebula (or 'one restart' "
                 "as oneadmin)")


def hook_checks(record: dict[str, Any], source: Path | None, endpoint: str | None) -> list[Check]:
    from aifactory_core.install import hookreg, manifest

    names = sorted(record.get("hooks", {}))
    if not names:
        return []
    try:
        from aifactory_core.policy.oned import Oned

        oned = Oned(endpoint, timeout=10.0, transport="pyone")
        registered = hookreg.registered_hooks(oned)
    except (AifactoryError, ImportError) as error:
        return [Check("hooks", "WARN", f"could not ask oned for its hooks: {error}",
                      fix="run as oneadmin (ONE_AUTH), or pass --endpoint")]
    templates = {t.name: t for t in manifest.hook_templates(source)} if source else {}
    checks = []
    running = running_release_check(oned)
    if running is not None:
        checks.append(running)
    for name in names:
        if name not in registered:
            checks.append(Check("hooks", "FAIL", f"hook {name} is not registered", fix="run install.sh",
                                subject=name))
        elif name in templates and hookreg.differs(hookreg.desired_attributes(templates[name]),
                                                   registered[name].template):
            checks.append(Check("hooks", "WARN", f"hook {name} differs from its template", fix="run install.sh",
                                subject=name))
    if not any(check.name == "hooks" for check in checks):
        checks.append(Check("hooks", "PASS", f"{len(names)} hooks registered"))
    return checks


def run_checks(target: layout.Layout, endpoint: str | None = None, source: Path | None = None,
               hooks: bool = True) -> list[Check]:
    from aifactory_core.install.stage import load_record

    try:
        record = load_record(target)
    except AifactoryError as error:
        return [Check("install", "FAIL", error.message, fix="run install.sh")]
    if not record:
        return [Check("install", "FAIL", f"the suite is not installed (no {target.manifest})", fix="run install.sh")]
    wrapped = [Path(item["path"]).name for item in record.get("files", []) if item["kind"] == WRAPPER]
    checks = file_checks(target, record)
    checks.append(state_check(target))
    checks.extend(environment_checks(target, record))
    checks.extend(oned_checks(target, wrapped))
    server = hook_server.doctor_check(target, record)
    if server is not None:
        checks.append(server)
    from aifactory_core.install import pci_doctor

    checks.extend(pci_doctor.pci_conf_checks(target, record))
    if hooks:
        checks.extend(hook_checks(record, source, endpoint))
        checks.extend(pci_doctor.oned_checks(endpoint))  # each host's offered devices in oned's PCI share
    return checks


def print_checks(checks: Sequence[Check], out: Any = sys.stdout) -> None:
    for check in checks:
        out.write(f"{check.status:<4}  {check.name}: {check.message}\n")
        if check.fix and check.status in ("WARN", "FAIL"):
            out.write(f"      fix: {check.fix}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aifactory-frontend-doctor")
    parser.add_argument("--destdir", default="/")
    parser.add_argument("--endpoint")
    parser.add_argument("--no-hooks", action="store_true")
    args = parser.parse_args(argv)
    target = layout.Layout(Path(args.destdir), one_location=os.environ.get("ONE_LOCATION", "").rstrip("/"))
    checks = run_checks(target, args.endpoint, hooks=not args.no_hooks)
    print_checks(checks)
    return 1 if any(check.status == "FAIL" for check in checks) else 0


if __name__ == "__main__":
    raise SystemExit(main())
