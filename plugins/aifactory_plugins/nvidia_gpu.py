"""NVIDIA GPUs and NVSwitches: discovery (with companion functions) and driver readiness."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from aifactory_core.config import Config
from aifactory_core.errors import HostError
from aifactory_core.hookspecs import hookimpl
from aifactory_core.host.inventory import HostInventory
from aifactory_core.host.sysfs import list_dir, read_str
from aifactory_core.model import PCI_CLASS_DISPLAY, Check, DeployRequest, DiscoveredDevice, PciDevice, ProbeAttribute
from aifactory_plugins.pci_names import model_name

AIFACTORY_API_VERSION = 1
NAME = "nvidia_gpu"
NVIDIA = 0x10DE
_BRIDGE_OTHER = 0x0680  # NVSwitch functions report "bridge: other"
_HOLDER_NAMES = ("nvidia-persistenced", "nv-hostengine", "nv-fabricmanager", "dcgm")
_PERSISTENCED = "nvidia-persiste"  # nvidia-persistenced's comm (cut at 15 characters)


def _is_gpu(device: PciDevice) -> bool:
    return device.vendor_id == NVIDIA and device.base_class == PCI_CLASS_DISPLAY and not device.is_vf


def _is_nvswitch(device: PciDevice) -> bool:
    return device.vendor_id == NVIDIA and device.class_code >> 8 == _BRIDGE_OTHER


def _companions(inventory: HostInventory, device: PciDevice) -> tuple[str, ...]:
    """Other functions of the same physical GPU (HD audio, USB-C, UCSI) that travel with it."""
    return tuple(
        other.address
        for other in inventory.pci.values()
        if other.slot == device.slot and other.address != device.address
    )


@hookimpl
def aifactory_discover_devices(inventory: HostInventory) -> Iterable[DiscoveredDevice]:
    devices = []
    for device in inventory.pci.values():
        if _is_gpu(device):
            kind = "gpu"
        elif _is_nvswitch(device):
            kind = "nvswitch"
        else:
            continue
        node = inventory.device_node(device)
        devices.append(
            DiscoveredDevice(
                address=device.address,
                kind=kind,  # type: ignore[arg-type]
                vendor="NVIDIA",
                model=device.device_name or model_name(device.vendor_id, device.device_id),
                plugin=NAME,
                companions=_companions(inventory, device),
                details=(
                    ("driver", device.driver or "-"),
                    ("numa_node", "-" if node is None else str(node)),
                    ("reset_method", " ".join(device.reset_methods) or "-"),
                ),
            )
        )
    return devices


HEALTH_KEYS = ("HEALTH", "HEALTH_REASON", "HEALTH_SOURCE", "LINK_SPEED", "LINK_SPEED_MAX", "LINK_WIDTH",
               "LINK_WIDTH_MAX", "AER_CORRECTABLE", "AER_NONFATAL", "AER_FATAL", "CONFIG_SPACE", "QUARANTINED")


@hookimpl
def aifactory_device_health(inventory: HostInventory, device: DiscoveredDevice) -> list[ProbeAttribute] | None:
    """An NVIDIA GPU's or NVSwitch's health from the host side, judged as the probes judge a GPU on
    vfio-pci (:func:`aifactory_core.probes.host_side.attributes`: config space, quarantine, PCIe
    AER, link width); NVML's view is the probes' (``aifactory probe host-system``)."""
    if device.plugin != NAME:
        return None
    from aifactory_core.probes import host_side
    from aifactory_core.probes.sysfs import Root

    root = Root(str(inventory.host.root), str(inventory.host.state_dir))
    side = host_side.attributes(root, device.address, host_side.quarantine_reasons(root))
    return [ProbeAttribute("NVIDIA_" + device.kind.upper(), tuple((key, str(side[key])) for key in HEALTH_KEYS))]


def _running_holders(inventory: HostInventory) -> list[str]:
    """NVIDIA daemons that keep /dev/nvidia* open (and so block an unbind), by name and PID."""
    found = []
    proc = inventory.host.proc
    for pid in list_dir(proc):
        if not pid.isdigit():
            continue
        comm = read_str(proc / pid / "comm") or ""
        # comm is cut at 15 characters: "nvidia-persistenced" reads "nvidia-persiste"
        if comm and any(name[:15] == comm or comm.startswith(name) for name in _HOLDER_NAMES):
            found.append(f"{comm}[{pid}]")
    return found


@hookimpl
def aifactory_doctor_checks(
    inventory: HostInventory, devices: Sequence[DiscoveredDevice], config: Config
) -> Iterable[Check]:
    gpus = [device for device in devices if device.kind == "gpu" and device.plugin == NAME]
    if not gpus:
        return []
    checks = []
    on_nvidia = [gpu.address for gpu in gpus if inventory.pci[gpu.address].driver == "nvidia"]
    on_vfio = [gpu.address for gpu in gpus if inventory.pci[gpu.address].driver == "vfio-pci"]
    version = read_str(inventory.host.path("/sys/module/nvidia/version"))
    if on_nvidia:
        checks.append(Check("nvidia-driver", "PASS",
                            f"NVIDIA driver {version or '(version unknown)'} holds {', '.join(on_nvidia)}"))
    elif not on_vfio:
        checks.append(Check("nvidia-driver", "WARN", "no NVIDIA GPU is bound to nvidia or vfio-pci",
                            fix="install the NVIDIA driver for host monitoring, or load vfio-pci"))
    holders = _running_holders(inventory)
    if on_nvidia and holders:
        checks.append(Check(
            "nvidia-holders", "WARN",
            f"processes that keep GPUs open (an unbind for passthrough waits for them): {' '.join(holders)}",
            fix="run them only on host-pool GPUs ([host] host_devices); for nvidia-persistenced: "
                "nvidia-smi -i <VM-pool GPU> -pm 0 per GPU"))
    checks.extend(persistence_checks(inventory, on_nvidia, config))
    if on_nvidia:
        checks.append(xid_check(inventory))
    for gpu in gpus:
        device = inventory.pci[gpu.address]
        if device.link.degraded:
            checks.append(Check("gpu-pcie-link", "WARN",
                                f"link trained at {device.link.current_speed} x{device.link.current_width}, "
                                f"maximum {device.link.max_speed} x{device.link.max_width}",
                                fix="reseat the GPU or check the riser/retimer", subject=gpu.address))
        if not device.reset_methods:
            checks.append(Check("gpu-reset-method", "WARN", "no reset method: the GPU cannot be "
                                "sanitised between tenants", fix="check the platform's slot reset support",
                                subject=gpu.address))
    nvswitches = [device for device in devices if device.kind == "nvswitch"]
    if nvswitches:
        fabric = any(name.startswith("nv-fabricmanager") for name in holders)
        checks.append(Check("nvswitch-fabric", "PASS" if fabric else "WARN",
                            f"{len(nvswitches)} NVSwitches; Fabric Manager {'running' if fabric else 'not running'}",
                            fix=None if fabric else "start nvidia-fabricmanager (shared NVSwitch mode for VMs)"))
    return checks


SUDOERS_SNIPPET = "/etc/sudoers.d/aifactory"
ROOT_HELPER = "/usr/local/lib/aifactory/venv/bin/aifactory-root-helper"


def xid_check(inventory: HostInventory) -> Check:
    """Can the probes (oneadmin) read XIDs? Either the kernel log is open to every user
    (``kernel.dmesg_restrict=0``) or ``host-setup``'s sudoers snippet grants the root helper's
    ``xid-log``, which returns XID codes only."""
    restrict = read_str(inventory.host.path("/proc/sys/kernel/dmesg_restrict")) or "unknown"
    if restrict == "0":
        return Check("xid-source", "PASS", "kernel.dmesg_restrict=0: the probes read XIDs from /dev/kmsg")
    snippet = inventory.host.path(SUDOERS_SNIPPET)
    try:
        granted = f"{ROOT_HELPER} xid-log" in snippet.read_text(encoding="utf-8", errors="replace")
    except PermissionError:
        return Check("xid-source", "WARN", f"kernel.dmesg_restrict={restrict}: {SUDOERS_SNIPPET} not readable by "
                     "this user, so the XID grant was not checked", fix="run aifactory doctor as root")
    except OSError:
        granted = False
    if granted and inventory.host.path(ROOT_HELPER).exists():
        return Check("xid-source", "PASS", f"kernel.dmesg_restrict={restrict}: the probes read XIDs through the root "
                     "helper's xid-log (XID codes only)")
    return Check("xid-source", "FAIL", f"kernel.dmesg_restrict={restrict} and no xid-log grant: the probes cannot "
                 "read XID errors (AIF_XID_SOURCE unavailable), so a GPU that fell off the bus is not seen",
                 fix="as root: aifactory host-setup (installs the root helper and its sudoers snippet)")


def persistence_fix(address: str) -> str:
    """The one way out for a VM-pool GPU that persists: persistence off for that GPU alone
    (nvidia-persistenced closes it and keeps the host pool's)."""
    return f"nvidia-smi -i {address} -pm 0 (VM-pool GPUs never persist; host-pool GPUs may)"


def persistence_checks(inventory: HostInventory, on_nvidia: Sequence[str], config: Config) -> list[Check]:
    """Persistence per GPU: a host-pool GPU (``[host] host_devices``) may persist; a VM-pool GPU must
    not — nvidia-persistenced holding it open makes its deploy refuse (:func:`aifactory_prepare`),
    and persistence mode keeps the driver's state on a GPU about to leave it."""
    from aifactory_core.errors import AifactoryError
    from aifactory_plugins.nvidia_state import gpu_state

    checks: list[Check] = []
    host_pool = [address for address in on_nvidia if address in config.host.host_devices]
    for address in on_nvidia:
        if address in host_pool:
            continue
        daemon = [holder for holder in device_holders(inventory, address) if holder.startswith(_PERSISTENCED)]
        try:
            state = gpu_state(inventory.host, address)
        except AifactoryError:
            state = None
        if daemon:
            checks.append(Check("gpu-persistence", "WARN", f"VM-pool GPU held open by {' '.join(daemon)}: its "
                                "deploys are refused until it lets go", fix=persistence_fix(address), subject=address))
        elif state is not None and state.persistence:
            checks.append(Check("gpu-persistence", "WARN", "VM-pool GPU in persistence mode",
                                fix=persistence_fix(address), subject=address))
    if host_pool:
        persisting = any(name.startswith(_PERSISTENCED) for name in _running_holders(inventory))
        vm_pool = [persistence_fix(address) for address in on_nvidia if address not in host_pool]
        checks.append(Check("nvidia-persistence", "PASS" if persisting else "WARN",
                            f"host-pool GPUs {', '.join(host_pool)}: persistence daemon "
                            f"{'running' if persisting else 'not running'}",
                            fix=None if persisting else "; then ".join(["start nvidia-persistenced", *vm_pool])))
    return checks


def _device_minor(inventory: HostInventory, address: str) -> int | None:
    text = read_str(inventory.host.path(f"/proc/driver/nvidia/gpus/{address}/information")) or ""
    for line in text.splitlines():
        if line.startswith("Device Minor:") and line.split(":", 1)[1].strip().isdigit():
            return int(line.split(":", 1)[1])
    return None


def device_holders(inventory: HostInventory, address: str) -> list[str]:
    """Processes with the GPU's ``/dev/nvidiaN`` open, as ``name[pid]`` (an unbind would wait for them)."""
    import os

    minor = _device_minor(inventory, address)
    wanted = {f"/dev/nvidia{minor}"} if minor is not None else None
    proc = inventory.host.proc
    holders = []
    for pid in list_dir(proc):
        if not pid.isdigit():
            continue
        for fd in list_dir(proc / pid / "fd"):
            try:
                target = os.readlink(proc / pid / "fd" / fd)
            except OSError:
                continue
            if (target in wanted) if wanted is not None else (
                    target.startswith("/dev/nvidia") and target[len("/dev/nvidia"):].isdigit()):
                holders.append(f"{read_str(proc / pid / 'comm') or '?'}[{pid}]")
                break
    return holders


@hookimpl
def aifactory_prepare(inventory: HostInventory, request: Any, config: Config) -> None:
    """Leaving the nvidia driver blocks while anything holds the GPU: refuse fast, naming the PIDs."""
    if not isinstance(request, DeployRequest):
        return
    for address in request.pci_addresses:
        device = inventory.pci.get(address)
        if device is None or not _is_gpu(device) or device.driver != "nvidia":
            continue
        holders = device_holders(inventory, address)
        if holders and all(holder.startswith(_PERSISTENCED) for holder in holders):
            raise HostError(f"GPU {address} is held open by {' '.join(holders)} (persistence): "
                            + persistence_fix(address))
        if holders:
            raise HostError(f"GPU {address} is held open by {' '.join(holders)}; stop them or keep this GPU "
                            "in the host pool")
        from aifactory_plugins.nvidia_state import gpu_state

        state = gpu_state(inventory.host, address)
        if state is None:
            continue
        if state.mig_enabled:
            raise HostError(f"GPU {address} has MIG enabled on the host; its MIG instances would be lost: "
                            f"disable MIG (nvidia-smi -i {address} -mig 0) or keep it in the host pool")
        if state.process_pids:
            raise HostError(f"GPU {address} runs processes {' '.join(map(str, state.process_pids))} (NVML); "
                            "stop them or keep this GPU in the host pool")
