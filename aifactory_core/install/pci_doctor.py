"""``doctor --frontend``: do the hosts' passthrough devices reach oned's PCI share?

The suite's host/system probe reports each host's passthrough devices itself, healthy ones only
(:mod:`aifactory_core.probes.pci_offer`), and says which in ``AIF_PCI_OFFERED``. Two things on the
frontend can still spoil that:

* ``pci.conf`` (``remotes/etc/im/{kvm,qemu}-probes.d``): upstream's ``pci.rb`` reports whatever its
  ``:filter:`` matches. A filter that covers NVIDIA GPUs makes ``pci.rb`` report a GPU the suite
  withholds as FAILED, so oned keeps offering it. Filters for other devices (``[frontend]
  pci_filter``) are fine.
* ``PCI_FILTER`` / ``PCI_SHORT_ADDRESS`` on a host or its cluster (oned 7.0+: the host's value, else
  the cluster's): oned drops a reported device they do not match, so an offered GPU never becomes
  assignable.

Each host's ``AIF_PCI_OFFERED`` is compared with its ``HOST_SHARE/PCI_DEVICES``; a device offered
but missing is a FAIL naming the filter in effect.
"""

from __future__ import annotations

from typing import Any

from aifactory_core.install import layout
from aifactory_core.model import Check

GPU_CLASSES = ("0300", "0302")
PROBE_FIX = "as oneadmin: onehost sync --force (then onehost forceupdate HOST)"


def _covers_gpus(item: str) -> bool:
    """Whether an lspci ``-d`` filter (``vendor:device[:class]``) matches an NVIDIA GPU."""
    vendor, _, rest = item.partition(":")
    _device, _, klass = rest.partition(":")
    vendor_ok = vendor.lower() in ("", "*", "10de")
    try:
        class_ok = klass in ("", "*") or f"{int(klass, 16):04x}" in GPU_CLASSES
    except ValueError:
        class_ok = False
    return vendor_ok and class_ok and item != "0:0"


def pci_conf_checks(target: layout.Layout, record: dict[str, Any] | None = None) -> list[Check]:
    """``pci.conf`` of each host type: no filter covering NVIDIA GPUs, and the ``[frontend] pci_filter``
    entries the install record says the suite added still there (an OpenNebula upgrade may replace
    the file)."""
    from aifactory_core.install import pcifilter

    added: dict[str, list[str]] = (record or {}).get(pcifilter.RECORD_KEY, {})
    checks: list[Check] = []
    for host_type in pcifilter.HOST_TYPES:
        absolute = pcifilter.pci_conf(target, host_type)
        try:
            text = target.path(absolute).read_text(encoding="utf-8")
            filters = pcifilter.parse(text)[0]
        except FileNotFoundError:
            checks.append(Check("pci.conf", "WARN", f"{absolute} is missing: {host_type} hosts' pci.rb reads its "
                                "defaults", fix="reinstall OpenNebula's remotes (opennebula package)",
                                subject=absolute))
            continue
        except (OSError, ValueError) as error:
            checks.append(Check("pci.conf", "FAIL", f"{absolute}: {error}", fix=f"repair {absolute}",
                                subject=absolute))
            continue
        lost = [item for item in added.get(absolute, []) if item not in filters]
        if lost:
            checks.append(Check("pci.conf", "FAIL", f"{host_type} hosts: [frontend] pci_filter {', '.join(lost)} is no "
                                "longer in pci.conf (an OpenNebula upgrade replaced it?): those devices leave the "
                                "hosts' PCI lists", fix="run install.sh --upgrade --sync", subject=absolute))
        covering = [item for item in filters if _covers_gpus(item)]
        if covering:
            checks.append(Check(
                "pci.conf", "FAIL", f"{host_type} hosts' pci.rb reports NVIDIA GPUs ({', '.join(covering)}): a GPU "
                "the suite withholds as FAILED or quarantined stays assignable",
                fix=f"take {', '.join(covering)} out of :filter: in {absolute} (the suite's aifactory-gpu probe "
                "reports the GPUs), then " + PROBE_FIX, subject=absolute))
        else:
            checks.append(Check("pci.conf", "PASS", f"{host_type} hosts: pci.rb reports "
                                f"{', '.join(filters) if filters and filters != ['0:0'] else 'no device'}; "
                                "the GPUs come from the suite's probe", subject=absolute))
    return checks


def _filter_in_effect(host: Any, clusters: dict[str, Any], name: str) -> tuple[str, str]:
    """(value, where) of ``name`` as oned reads it: the host's template, else its cluster's."""
    value = (host.findtext(f"TEMPLATE/{name}") or "").strip()
    if value:
        return value, f"host {host.findtext('NAME')}"
    cluster = clusters.get(host.findtext("CLUSTER_ID") or "")
    value = (cluster.findtext(f"TEMPLATE/{name}") or "").strip() if cluster is not None else ""
    return value, f"cluster {cluster.findtext('NAME')}" if value and cluster is not None else ""


def share_checks(hosts: Any, clusters_pool: Any) -> list[Check]:
    """Per kvm/qemu host: every device the suite's probe offered is in oned's PCI share."""
    clusters = {cluster.findtext("ID") or "": cluster for cluster in clusters_pool.iterfind("CLUSTER")}
    checks: list[Check] = []
    for host in hosts.iterfind("HOST"):
        name = host.findtext("NAME") or "?"
        if host.findtext("IM_MAD") not in ("kvm", "qemu") or host.findtext("STATE") not in ("1", "2"):
            continue  # only monitored KVM hosts report
        offered_text = host.findtext("TEMPLATE/AIF_PCI_OFFERED")
        if offered_text is None:
            checks.append(Check("pci-share", "WARN", f"{name}: the suite's probe has not reported a PCI list "
                                "(AIF_PCI_OFFERED missing)", fix=PROBE_FIX, subject=name))
            continue
        offered = [address for address in offered_text.split(",") if address]
        share = {(pci.findtext("ADDRESS") or "") for pci in host.iterfind("HOST_SHARE/PCI_DEVICES/PCI")}
        missing = [address for address in offered if f"{address[:-2]}:{address[-1]}" not in share]
        if missing:
            causes = [f"PCI_FILTER '{value}' on {where}" for value, where in
                      [_filter_in_effect(host, clusters, "PCI_FILTER")] if value]
            causes += [f"PCI_SHORT_ADDRESS '{value}' on {where}" for value, where in
                       [_filter_in_effect(host, clusters, "PCI_SHORT_ADDRESS")] if value]
            checks.append(Check(
                "pci-share", "FAIL", f"{name}: {', '.join(missing)} offered by the suite's probe but not in oned's "
                f"PCI list{(': dropped by ' + ' and '.join(causes)) if causes else ''}",
                fix=("widen or remove it (onehost update / onecluster update), e.g. PCI_FILTER = \"10de:*:0302\""
                     if causes else PROBE_FIX), subject=name))
        else:
            withheld = host.findtext("TEMPLATE/AIF_PCI_WITHHELD") or ""
            checks.append(Check("pci-share", "PASS", f"{name}: {len(offered)} passthrough devices in oned's PCI list"
                                + (f"; withheld: {withheld}" if withheld else ""), subject=name))
    return checks


def oned_checks(endpoint: str | None) -> list[Check]:
    from aifactory_core.errors import AifactoryError
    from aifactory_core.policy.oned import Oned

    try:
        oned = Oned(endpoint, timeout=10.0)
        return share_checks(oned.document("one.hostpool.info"), oned.document("one.clusterpool.info"))
    except AifactoryError as error:
        return [Check("pci-share", "WARN", f"could not ask oned for its hosts: {error}",
                      fix="run as oneadmin (ONE_AUTH), or pass --endpoint")]


PROBE_STATE_MAX_BYTES = 1 << 20


def _copy_probe_state(source: str, dest: str) -> None:
    """Copy the regular files directly in the probe's state directory ``source`` (``oneadmin``'s)
    into ``dest``. A copy made by root is root's file, so the probe plugins' discovery cache
    (``plugins-<euid>.tsv``: modules to import) is never copied: root never imports a module named
    by a file another user wrote. ``source`` as a link, links, hard-linked files, subdirectories and
    files over :data:`PROBE_STATE_MAX_BYTES` are left behind (the probe remakes what it misses)."""
    import os
    import stat

    try:
        directory = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # none yet, or a link: the probe starts from nothing
    try:
        os.mkdir(dest, 0o700)
        for name in os.listdir(directory):
            if name.startswith("plugins-") or name.startswith("."):
                continue
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
            except OSError:
                continue
            try:
                status = os.fstat(fd)
                if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1 or status.st_size > PROBE_STATE_MAX_BYTES:
                    continue
                data = os.read(fd, PROBE_STATE_MAX_BYTES)
            except OSError:
                continue
            finally:
                os.close(fd)
            with open(os.path.join(dest, name), "xb") as handle:
                handle.write(data)
    finally:
        os.close(directory)


def host_checks(host_root: str, state_dir: str, remotes: str = "/var/tmp/one") -> list[Check]:
    """On a KVM host (``aifactory doctor``): what the probe offers oned right now, what it withholds
    and why, and the synced ``pci.conf`` of both host types not reporting the GPUs itself."""
    import os
    import tempfile

    from aifactory_core.probes.collect import collect
    from aifactory_core.probes.host_system import pci_list
    from aifactory_core.probes.sysfs import Root

    with tempfile.TemporaryDirectory(prefix="aifactory-doctor-") as scratch:
        # The probe's own state (XID sequence, caches) is copied, never advanced: an XID the doctor
        # reads must still reach the next probe run. The engine's records are read where they are.
        for name in ("quarantine", "owners", "resets"):
            if os.path.isdir(os.path.join(state_dir, name)):
                os.symlink(os.path.join(state_dir, name), os.path.join(scratch, name))
        _copy_probe_state(os.path.join(state_dir, "probes"), os.path.join(scratch, "probes"))
        root = Root(host_root, scratch)
        snapshot = collect(root)
        pci_list(root, snapshot)
    offered, withheld = snapshot["pci"]
    names = ", ".join(f"{vector['DOMAIN']}:{vector['SHORT_ADDRESS']}" for vector in offered)
    checks = [Check("pci-offer", "PASS" if offered else "WARN",
                    f"oned is offered {len(offered)} passthrough devices" + (f": {names}" if names else ""),
                    fix=None if offered else "no GPU, accelerator or [host] vf_pools VF to offer: check lspci and "
                    "[host] vf_pools in the config")]
    checks += [Check("pci-offer", "WARN", f"withheld from oned: {why}", subject=address,
                     fix="replace or reset the device; it is offered again once healthy" if "FAILED" in why
                     else "remove it from [host] host_devices if VMs should get it") for address, why in withheld]
    for host_type in ("kvm", "qemu"):
        path = f"{remotes}/etc/im/{host_type}-probes.d/pci.conf"
        try:
            from aifactory_core.install.pcifilter import parse

            filters = parse(open(root.path(path), encoding="utf-8").read())[0]
        except (OSError, ValueError):
            continue  # not synced here (or not this host type's): the frontend's doctor checks the source
        covering = [item for item in filters if _covers_gpus(item)]
        if covering:
            checks.append(Check("pci.conf", "FAIL", f"{path}: pci.rb reports NVIDIA GPUs ({', '.join(covering)}): a "
                                "GPU withheld as FAILED stays assignable", subject=path,
                                fix="on the frontend: take them out of remotes/etc/im/*-probes.d/pci.conf, then "
                                + PROBE_FIX))
    return checks
