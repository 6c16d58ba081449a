"""An OpenNebula XML-RPC endpoint for the faults a real oned will not produce on demand.

What oned does is tested against a real oned (``tests/realone.py``, ``tests/oned/``): tenant apply,
hook registration, hooks fired by the hook manager, the probes through monitoring, the lean
transport. This stand-in stays for what a real oned cannot be made to do, or not deterministically:
answers it never gives (ids that are not numbers, refused updates of the showback), calls whose
parameters must be recorded as delivered, an unreachable or half-dead endpoint, VM pools in states
that oned's own quotas keep a real tenant from reaching (a GPU cap exceeded, to prove the hook's
own count), and many concurrent hook events against one group with a precise interleaving.

A real HTTP XML-RPC server (stdlib ``xmlrpc.server`` on 127.0.0.1, a random port) answering the
calls the suite makes with OpenNebula's answer convention (``[success, value, error code]``).
Every XML document it answers is validated against OpenNebula's own release-7.0.2 XSDs
(``tests/fixtures/opennebula/xsd``, elements moved into the schema namespace as
``ATTRIBUTION.md`` describes) *before* it is sent: an invalid answer raises in the server and
fails the call. VM documents start from the synthesized ``vm_gpu_pinned.xml`` sample minus its
listed drift (``GPU_*`` monitoring keys, ``CPU_MODEL``). One deliberate exception: generic
quotas (``QUOTA_VM_ATTRIBUTE = "GPU"``) add ``GPU``/``RUNNING_GPU`` counters to ``VM_QUOTA/VM``
that shared.xsd does not declare; they are removed from the copy that is validated.

Clients use pyone over real HTTP. Fixture: ``one_server`` (a started :class:`OneTestServer`).
"""

from __future__ import annotations

import copy
import threading
import xmlrpc.server
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from aifactory_core.one.template import parse_template

FIXTURES = Path(__file__).parent / "fixtures" / "opennebula"
XSD = FIXTURES / "xsd" / "release-7.0.2"
NS = "http://opennebula.org/XMLSchema"
GENERIC_QUOTA = ("GPU", "GPU_USED", "RUNNING_GPU", "RUNNING_GPU_USED")
_SCHEMAS: dict[str, etree.XMLSchema] = {}
# oned's default ACL rules (share/doc / AclManager bootstrap), as one.acl.info shows them.
DEFAULT_ACLS = [
    ("200000001", "220000004", "8", "100000000", "@1 VM+NET+IMAGE+TEMPLATE/* CREATE #0"),
    ("400000000", "4000000000", "1", "100000000", "* NET/* USE #0"),
]


def schema(name: str) -> etree.XMLSchema:
    if name not in _SCHEMAS:
        _SCHEMAS[name] = etree.XMLSchema(etree.parse(str(XSD / name)))
    return _SCHEMAS[name]


def namespaced(root: etree._Element) -> etree._Element:
    """A copy of ``root`` with every element moved into OpenNebula's schema namespace."""
    result = copy.deepcopy(root)
    for element in result.iter():
        if isinstance(element.tag, str):
            element.tag = f"{{{NS}}}{element.tag}"
    return result


def xsd_errors(root: etree._Element, schema_name: str) -> list[str]:
    """Validation errors of ``root`` against OpenNebula's ``schema_name`` (empty: valid)."""
    document = copy.deepcopy(root)
    for quota in document.iterfind(".//VM_QUOTA/VM"):
        for name in GENERIC_QUOTA:
            for item in quota.findall(name):
                quota.remove(item)
    checker = schema(schema_name)
    if checker.validate(namespaced(document)):
        return []
    return [entry.message for entry in checker.error_log]


def _sub(parent: etree._Element, tag: str, text: object = None) -> etree._Element:
    element = etree.SubElement(parent, tag)
    if text is not None:
        element.text = str(text)
    return element


def _vm_base() -> etree._Element:
    from aifactory_core.one.xmlsafe import parse_xml

    root = parse_xml((FIXTURES / "samples" / "synthesized" / "vm_gpu_pinned.xml").read_bytes())
    for path in (".//MONITORING/*", ".//TEMPLATE/CPU_MODEL"):
        for element in list(root.iterfind(path)):
            if path.endswith("*") and not element.tag.startswith("GPU_"):
                continue
            element.getparent().remove(element)
    return root


@dataclass
class Group:
    id: int
    name: str
    admins: list[int] = field(default_factory=list)
    quota: dict[str, str] = field(default_factory=dict)


@dataclass
class Vdc:
    id: int
    name: str
    groups: list[int] = field(default_factory=list)
    clusters: list[tuple[int, int]] = field(default_factory=list)


class OneTestServer:
    """State plus the XML-RPC methods; ``calls`` records every call (method, params sans session)."""

    def __init__(self) -> None:
        self.groups: dict[int, Group] = {0: Group(0, "oneadmin"), 1: Group(1, "users")}
        self.vdcs: dict[int, Vdc] = {0: Vdc(0, "default", [1])}
        self.acls: dict[int, tuple[str, str, str, str, str]] = dict(enumerate(DEFAULT_ACLS))
        self.vms: dict[int, etree._Element] = {}
        self.hooks: dict[int, tuple[str, str, dict[str, str]]] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.sessions: list[str] = []
        self._server: xmlrpc.server.SimpleXMLRPCServer | None = None
        self._thread: threading.Thread | None = None
        self.lock = threading.Lock()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> OneTestServer:
        server = xmlrpc.server.SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False, allow_none=False)
        server.register_instance(self)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/RPC2"

    def writes(self) -> list[tuple[str, tuple[Any, ...]]]:
        return [call for call in self.calls if not call[0].endswith(("info", "infoextended"))]

    def _dispatch(self, method: str, params: tuple[Any, ...]) -> list[Any]:
        if not params or not isinstance(params[0], str) or ":" not in params[0]:
            return [False, "[" + method + "] User couldn't be authenticated, aborting call.", 0x0100]
        with self.lock:
            self.sessions.append(params[0])
            self.calls.append((method, tuple(params[1:])))
            handler = getattr(self, "m_" + method.replace("one.", "", 1).replace(".", "_"), None)
            if handler is None:
                return [False, f"[{method}] not implemented by the test server", 0x0400]
            try:
                value = handler(*params[1:])
            except LookupError as error:
                return [False, f"[{method}] {error}", 0x0400]
            if isinstance(value, tuple):
                root, schema_name = value
                errors = xsd_errors(root, schema_name)
                if errors:
                    raise AssertionError(f"test server answer to {method} is not {schema_name}-valid: {errors[:3]}")
                value = etree.tostring(root, encoding="unicode")
            return [True, value, 0]

    # ---------------------------------------------------------------- documents
    def _group_xml(self, group: Group, pool: bool = False) -> etree._Element:
        root = etree.Element("GROUP")
        _sub(root, "ID", group.id)
        _sub(root, "NAME", group.name)
        _sub(root, "TEMPLATE")
        users = _sub(root, "USERS")
        for uid in group.admins:
            _sub(users, "ID", uid)
        admins = _sub(root, "ADMINS")
        for uid in group.admins:
            _sub(admins, "ID", uid)
        if pool:  # the pool lists quotas apart (GROUP_POOL/QUOTAS), this server leaves them out
            return root
        _sub(root, "DATASTORE_QUOTA")
        _sub(root, "NETWORK_QUOTA")
        vm_quota = _sub(root, "VM_QUOTA")
        if group.quota:
            vm = _sub(vm_quota, "VM")
            for name in ("CPU", "CPU_USED", "MEMORY", "MEMORY_USED", "RUNNING_CPU", "RUNNING_CPU_USED",
                         "RUNNING_MEMORY", "RUNNING_MEMORY_USED", "RUNNING_VMS", "RUNNING_VMS_USED",
                         "SYSTEM_DISK_SIZE", "SYSTEM_DISK_SIZE_USED", "VMS", "VMS_USED"):
                _sub(vm, name, "0" if name.endswith("_USED") else "-1")
            for key, value in sorted(group.quota.items()):
                _sub(vm, key, value)
                _sub(vm, key + "_USED", "0")
        _sub(root, "IMAGE_QUOTA")
        defaults = _sub(root, "DEFAULT_GROUP_QUOTAS")
        for name in ("DATASTORE_QUOTA", "NETWORK_QUOTA", "VM_QUOTA", "IMAGE_QUOTA"):
            _sub(defaults, name)
        return root

    def _vdc_xml(self, vdc: Vdc) -> etree._Element:
        root = etree.Element("VDC")
        _sub(root, "ID", vdc.id)
        _sub(root, "NAME", vdc.name)
        groups = _sub(root, "GROUPS")
        for gid in vdc.groups:
            _sub(groups, "ID", gid)
        clusters = _sub(root, "CLUSTERS")
        for zone, cid in vdc.clusters:
            cluster = _sub(clusters, "CLUSTER")
            _sub(cluster, "ZONE_ID", zone)
            _sub(cluster, "CLUSTER_ID", cid)
        for name in ("HOSTS", "DATASTORES", "VNETS", "TEMPLATE"):
            _sub(root, name)
        return root

    # ---------------------------------------------------------------- VMs (test set-up)
    def add_vm(self, vm_id: int, *, uid: int = 5, gid: int = 100, gname: str = "tenant-a", state: int = 2,
               lcm_state: int = 0, pci: list[dict[str, str]] | None = None,
               nics: list[dict[str, str]] | None = None) -> etree._Element:  # fmt: skip
        """A VM from the sample document with the given owner, state, PCI and NIC requests
        (``pci`` and ``nics`` both None: the sample's own GPU, SR-IOV VF and NIC)."""
        root = _vm_base()
        for tag, value in (("ID", vm_id), ("UID", uid), ("GID", gid), ("GNAME", gname), ("STATE", state),
                           ("LCM_STATE", lcm_state)):  # fmt: skip
            root.find(tag).text = str(value)
        template = root.find("TEMPLATE")
        root.find("TEMPLATE/VMID").text = str(vm_id)
        self.vms[vm_id] = root
        if pci is None and nics is None:
            return root
        for old in template.findall("PCI") + template.findall("NIC"):
            template.remove(old)

        def _insert(tag: str, values: dict[str, str]) -> None:
            element = etree.Element(tag)
            for key, value in values.items():
                _sub(element, key, value)
            later = [child for child in template if isinstance(child.tag, str) and child.tag > tag]
            if later:
                later[0].addprevious(element)
            else:
                template.append(element)
        for values in nics or []:
            _insert("NIC", values)
        for values in pci or []:
            _insert("PCI", values)
        root.find("TEMPLATE/VMID").text = str(vm_id)
        self.vms[vm_id] = root
        return root

    # ---------------------------------------------------------------- groups
    def m_group_allocate(self, name: str) -> int:
        if any(group.name == name for group in self.groups.values()):
            raise LookupError(f"NAME is already taken by GROUP {name}")
        gid = max(self.groups) + 1 if max(self.groups) >= 100 else 100
        self.groups[gid] = Group(gid, name)
        return gid

    def m_group_info(self, gid: int, decrypt: bool = False) -> tuple[etree._Element, str]:
        if gid not in self.groups:
            raise LookupError(f"Error getting group [{gid}].")
        return self._group_xml(self.groups[gid]), "group.xsd"

    def m_grouppool_info(self) -> tuple[etree._Element, str]:
        root = etree.Element("GROUP_POOL")
        for group in self.groups.values():
            root.append(self._group_xml(group, pool=True))
        defaults = _sub(root, "DEFAULT_GROUP_QUOTAS")
        for name in ("DATASTORE_QUOTA", "NETWORK_QUOTA", "VM_QUOTA", "IMAGE_QUOTA"):
            _sub(defaults, name)
        return root, "group_pool.xsd"

    def m_group_quota(self, gid: int, template: str) -> int:
        if gid not in self.groups:
            raise LookupError(f"Error getting group [{gid}].")
        for name, attribute in parse_template(template):
            if name != "VM" or not isinstance(attribute, dict):
                raise LookupError(f"unsupported quota {name}")
            for key, value in attribute.items():
                self.groups[gid].quota[key] = str(value)
        return gid

    def m_group_addadmin(self, gid: int, uid: int) -> int:
        self.groups[gid].admins.append(uid)
        return gid

    # ---------------------------------------------------------------- VDCs
    def m_vdc_allocate(self, template: str) -> int:
        names = [value for name, value in parse_template(template) if name == "NAME"]
        if not names:
            raise LookupError("No NAME in template for VDC.")
        vid = max(self.vdcs) + 1
        self.vdcs[vid] = Vdc(vid, str(names[0]))
        return vid

    def m_vdc_info(self, vid: int, decrypt: bool = False) -> tuple[etree._Element, str]:
        if vid not in self.vdcs:
            raise LookupError(f"Error getting VDC [{vid}].")
        return self._vdc_xml(self.vdcs[vid]), "vdc.xsd"

    def m_vdcpool_info(self) -> tuple[etree._Element, str]:
        root = etree.Element("VDC_POOL")
        for vdc in self.vdcs.values():
            root.append(self._vdc_xml(vdc))
        return root, "vdc_pool.xsd"

    def m_vdc_addgroup(self, vid: int, gid: int) -> int:
        if gid in self.vdcs[vid].groups:
            raise LookupError(f"Group {gid} is already in VDC {vid}")
        self.vdcs[vid].groups.append(gid)
        return vid

    def m_vdc_addcluster(self, vid: int, zone: int, cid: int) -> int:
        if (zone, cid) in self.vdcs[vid].clusters:
            raise LookupError(f"Cluster {cid} is already in VDC {vid}")
        self.vdcs[vid].clusters.append((zone, cid))
        return vid

    # ---------------------------------------------------------------- ACLs
    def m_acl_addrule(self, user: str, resource: str, rights: str, zone: str = "0x100000000") -> int:
        values = tuple(format(int(text, 16), "x") for text in (user, resource, rights, zone))
        if any(existing[:4] == values for existing in self.acls.values()):
            raise LookupError("ACL rule already exists")
        rid = max(self.acls) + 1
        self.acls[rid] = (*values, "")  # type: ignore[assignment]
        return rid

    def m_acl_delrule(self, rid: int) -> int:
        del self.acls[rid]
        return rid

    def m_acl_info(self) -> tuple[etree._Element, str]:
        root = etree.Element("ACL_POOL")
        for rid, (user, resource, rights, zone, string) in sorted(self.acls.items()):
            acl = _sub(root, "ACL")
            for tag, value in (("ID", rid), ("USER", user), ("RESOURCE", resource), ("RIGHTS", rights),
                               ("ZONE", zone), ("STRING", string)):  # fmt: skip
                _sub(acl, tag, value)
        return root, "acl_pool.xsd"

    # ---------------------------------------------------------------- VMs
    def m_vm_info(self, vm_id: int, decrypt: bool = False) -> tuple[etree._Element, str]:
        if vm_id not in self.vms:
            raise LookupError(f"Error getting virtual machine [{vm_id}].")
        return copy.deepcopy(self.vms[vm_id]), "vm.xsd"

    def m_vmpool_infoextended(self, who: int, start: int, end: int, state: int) -> str:
        root = etree.Element("VM_POOL")
        for vm_id, vm in sorted(self.vms.items()):
            if vm.findtext("STATE") == "6" and state != -2:
                continue
            errors = xsd_errors(vm, "vm.xsd")
            assert not errors, f"VM {vm_id}: {errors[:3]}"
            root.append(copy.deepcopy(vm))
        return etree.tostring(root, encoding="unicode")  # each VM validated against vm.xsd above

    def m_vm_update(self, vm_id: int, template: str, merge: int) -> int:
        vm = self.vms[vm_id]
        user_template = vm.find("USER_TEMPLATE")
        if not merge:
            user_template.clear()
        for name, value in parse_template(template):
            for old in user_template.findall(name):
                user_template.remove(old)
            if isinstance(value, str) and value != "":
                _sub(user_template, name, value)
        return vm_id

    def m_vm_action(self, action: str, vm_id: int) -> int:
        vm = self.vms[vm_id]
        state = {"release": "1", "hold": "2", "terminate-hard": "6", "poweroff-hard": "8"}.get(action)
        if state is None:
            raise LookupError(f"action {action} not supported by the test server")
        vm.find("STATE").text = state
        vm.find("LCM_STATE").text = "0"
        return vm_id

    def m_vm_detachpci(self, vm_id: int, pci_id: int) -> int:
        """As oned's DispatchManager::detach_pci: POWEROFF or UNDEPLOYED (LCM_INIT) only, not a NIC."""
        vm = self.vms[vm_id]
        if vm.findtext("STATE") not in ("8", "9") or vm.findtext("LCM_STATE") != "0":
            raise LookupError("VM in wrong state, it has to be in poweroff")
        for pci in vm.findall("TEMPLATE/PCI"):
            if pci.findtext("PCI_ID") == str(pci_id):
                if pci.findtext("TYPE") == "NIC":
                    raise LookupError("Use one.vm.detachnic to detach this PCI device")
                vm.find("TEMPLATE").remove(pci)
                return vm_id
        raise LookupError("PCI device not found")

    # ---------------------------------------------------------------- hooks
    def _hook_xml(self, hid: int) -> etree._Element:
        name, kind, attributes = self.hooks[hid]
        root = etree.Element("HOOK")
        _sub(root, "ID", hid)
        _sub(root, "NAME", name)
        _sub(root, "TYPE", kind)
        template = _sub(root, "TEMPLATE")
        for key in ("ARGUMENTS", "ARGUMENTS_STDIN", "CALL", "COMMAND", "LCM_STATE", "REMOTE", "RESOURCE", "STATE"):
            if key in attributes:
                _sub(template, key, attributes[key])
        return root

    def _hook_template(self, template: str) -> tuple[str, str, dict[str, str]]:
        attributes = {name: value for name, value in parse_template(template) if isinstance(value, str)}
        for key in ("NAME", "TYPE", "COMMAND"):
            if key not in attributes:
                raise LookupError(f"No {key} in hook template")
        kind = attributes.pop("TYPE").lower()
        if kind not in ("api", "state"):
            raise LookupError(f"Invalid hook type {kind}")
        if kind == "api" and "CALL" not in attributes:
            raise LookupError("API hooks require a CALL attribute")
        if kind == "state" and "RESOURCE" not in attributes:
            raise LookupError("State hooks require a RESOURCE attribute")
        return attributes.pop("NAME"), kind, attributes

    def m_hook_allocate(self, template: str) -> int:
        name, kind, attributes = self._hook_template(template)
        if any(hook[0] == name for hook in self.hooks.values()):
            raise LookupError(f"NAME is already taken by HOOK {name}")
        hid = max(self.hooks, default=-1) + 1
        self.hooks[hid] = (name, kind, attributes)
        return hid

    def m_hook_update(self, hid: int, template: str, update_type: int = 0) -> int:
        name = self.hooks[hid][0]
        parsed = self._hook_template(f'NAME="{name}"\n' + template)
        self.hooks[hid] = (name, parsed[1], parsed[2])
        return hid

    def m_hook_delete(self, hid: int) -> int:
        del self.hooks[hid]
        return hid

    def m_hook_info(self, hid: int, decrypt: bool = False) -> tuple[etree._Element, str]:
        if hid not in self.hooks:
            raise LookupError(f"Error getting hook [{hid}].")
        return self._hook_xml(hid), "hook.xsd"

    def m_hookpool_info(self, who: int = -2, start: int = -1, end: int = -1) -> tuple[etree._Element, str]:
        root = etree.Element("HOOK_POOL")
        for hid in sorted(self.hooks):
            root.append(self._hook_xml(hid))
        return root, "hook_pool.xsd"


@pytest.fixture
def one_server() -> Iterator[OneTestServer]:
    """A started :class:`OneTestServer` (its ``endpoint`` is an http:// URL for pyone)."""
    server = OneTestServer().start()
    try:
        yield server
    finally:
        server.stop()
