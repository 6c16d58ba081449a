"""aifactory_core.one.xmlsafe, and the OpenNebula samples against OpenNebula's own XSDs.

The XSDs are namespaced (``http://opennebula.org/XMLSchema``) and oned's documents are not, so a
copy of each document is moved into that namespace before validating. The XSDs lag oned's code:
``KNOWN_DRIFT`` lists every error we expect, and each test asserts that the errors found are
*exactly* those; a second pass removes the drifting elements and asserts the document validates.

lxml's bundled libxml2 (2.12+) refuses to compile several 6.10.5 schemas (their content models
violate the XSD "unique particle attribution" rule: an ``xs:any`` next to named elements); older
libxml2 (``xmllint`` 2.9/2.10) accepts them. For those, the test validates with ``xmllint`` when
it is installed and is skipped (with the reason) otherwise.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from aifactory_core.errors import DocumentError
from aifactory_core.one import xmlsafe
from tests.onetestserver import namespaced

etree = pytest.importorskip("lxml.etree")

FIXTURES = Path(__file__).parent / "fixtures" / "opennebula"
SAMPLES = FIXTURES / "samples" / "synthesized"
XSD = FIXTURES / "xsd"
TAGS = ("release-7.0.2", "release-6.10.5")

GPU_MONITORING = (
    "GPU_COUNT", "GPU_MEMORY_FREE", "GPU_MEMORY_UTILIZATION", "GPU_POWER_USAGE", "GPU_UTILIZATION",
)  # fmt: skip

# (sample file, sub-element or None, schema) -> what is validated
CASES = [
    ("host_gpu_numa.xml", None, "host.xsd"),
    ("vm_gpu_pinned.xml", None, "vm.xsd"),
    ("hook_message_state_vm_running.xml", None, "hook_message_state.xsd"),
    ("hook_api_call_info_template_instantiate.xml", None, "api_info.xsd"),
    ("hook_message_api_vm_allocate.xml", None, "hook_message_api.xsd"),
    ("hook_message_api_vm_allocate.xml", "CALL_INFO/EXTRA/VM", "vm.xsd"),
    ("hook_info_with_log.xml", None, "hook.xsd"),
    ("vmm_driver_action_deploy.xml", "VM", "vm.xsd"),
    ("vmm_driver_action_deploy.xml", "DATASTORE", "datastore.xsd"),
]

# Known drift, case by case, as layers: libxml2 reports only the first unexpected element of
# each content model, so each layer lists the element names the validator must name, then the
# edit that removes that drift; after the last layer the document must validate cleanly. A new
# error, or a listed one that no longer appears, fails the test.
Edit = Callable[[etree._Element], None]


def drop(*paths: str) -> Edit:
    def edit(root: etree._Element) -> None:
        for path in paths:
            found = list(root.iterfind(path))
            assert found, f"drift edit: nothing at {path}"
            for element in found:
                element.getparent().remove(element)

    return edit


def add_tm_mad_system(root: etree._Element) -> None:
    vmid = root.find(".//TEMPLATE/VMID")
    marker = etree.Element("TM_MAD_SYSTEM")
    marker.text = "ssh"
    vmid.addprevious(marker)


# 7.0: MONITORING lost its xs:any (GPU_* keys undeclared); TEMPLATE/CPU_MODEL never declared.
_GPU_AND_CPU_MODEL = (
    {"GPU_COUNT", "CPU_MODEL"},
    drop(*(f".//MONITORING/{name}" for name in GPU_MONITORING), ".//TEMPLATE/CPU_MODEL"),
)
# 6.10: MONITORING still has xs:any; HISTORY lacks PLAN_ID/ACTION_ID (7.0 documents).
_CPU_MODEL_AND_PLAN = (
    {"CPU_MODEL", "PLAN_ID"},
    drop(".//TEMPLATE/CPU_MODEL", ".//HISTORY/PLAN_ID", ".//HISTORY/ACTION_ID"),
)
# 6.10 vm.xsd: TEMPLATE/PCI maxOccurs="1" (a VM with a GPU and a VF has two).
_ONE_PCI = ({"PCI"}, drop(".//TEMPLATE/PCI[2]"))
# hook_message_state.xsd includes image.xsd; 7.0 vm.xsd's untyped DISK (xs:anyType, lax) then
# validates DISK/IMAGE (the image *name*) against the global IMAGE object declaration.
_DISK_IMAGE = ({"IMAGE"}, drop(".//TEMPLATE/DISK/IMAGE"))
# A PENDING VM (one.vm.allocate EXTRA) has no TM_MAD_SYSTEM yet; vm.xsd makes it mandatory, so
# libxml2 complains at the element after it, VMID.
_NO_TM_MAD = ({"VMID"}, add_tm_mad_system)

KNOWN_DRIFT: dict[tuple[str, str, str | None], list[tuple[set[str], Edit]]] = {
    ("release-7.0.2", "vm_gpu_pinned.xml", None): [_GPU_AND_CPU_MODEL],
    ("release-7.0.2", "hook_message_state_vm_running.xml", None): [_GPU_AND_CPU_MODEL, _DISK_IMAGE],
    ("release-7.0.2", "vmm_driver_action_deploy.xml", "VM"): [_GPU_AND_CPU_MODEL],
    ("release-7.0.2", "hook_message_api_vm_allocate.xml", "CALL_INFO/EXTRA/VM"): [_NO_TM_MAD],
    ("release-6.10.5", "vm_gpu_pinned.xml", None): [_CPU_MODEL_AND_PLAN, _ONE_PCI],
    ("release-6.10.5", "hook_message_state_vm_running.xml", None): [_CPU_MODEL_AND_PLAN, _ONE_PCI],
    ("release-6.10.5", "vmm_driver_action_deploy.xml", "VM"): [_CPU_MODEL_AND_PLAN, _ONE_PCI],
    ("release-6.10.5", "hook_message_api_vm_allocate.xml", "CALL_INFO/EXTRA/VM"): [_NO_TM_MAD],
}

# 6.10.5 schemas that modern libxml2 cannot compile ("content model is not determinist"),
# directly or through an xs:include.
UPA_SCHEMAS_6_10 = {"host.xsd", "vm.xsd", "hook_message_state.xsd", "hook.xsd", "datastore.xsd"}


def sample_root(name: str, sub: str | None = None) -> etree._Element:
    root = xmlsafe.parse_xml((SAMPLES / name).read_bytes(), name)
    if sub is not None:
        found = root.find(sub)
        assert found is not None, f"{name} has no {sub}"
        return copy.deepcopy(found)
    return root


_XMLLINT_ERROR = re.compile(r"element (\w+): Schemas validity error")


def validate(root: etree._Element, tag: str, schema_name: str) -> set[str]:
    """Validate; return the set of element names the validator complains about."""
    schema_path = XSD / tag / schema_name
    try:
        schema = etree.XMLSchema(etree.parse(str(schema_path)))
    except etree.XMLSchemaParseError as error:
        assert tag == "release-6.10.5" and schema_name in UPA_SCHEMAS_6_10, f"{schema_path}: {error}"
        assert "not determinist" in str(error)
        return _validate_xmllint(root, schema_path)
    document = namespaced(root)
    if schema.validate(document):
        return set()
    names = set()
    for entry in schema.error_log:
        match = re.search(r"Element '\{[^}]*\}(\w+)'", entry.message)
        assert match, entry.message
        names.add(match.group(1))
    return names


def _validate_xmllint(root: etree._Element, schema_path: Path) -> set[str]:
    xmllint = shutil.which("xmllint")
    if xmllint is None:
        pytest.skip(f"{schema_path.name} of 6.10.5 needs a libxml2 < 2.12 (xmllint) to compile")
    data = etree.tostring(namespaced(root))
    result = subprocess.run(
        [xmllint, "--noout", "--nonet", "--schema", str(schema_path), "-"],
        input=data, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    stderr = result.stderr.decode("utf-8", "replace")
    if "failed to compile" in stderr or "WXS schema" in stderr and "failed" in stderr:
        pytest.skip(f"xmllint cannot compile {schema_path}")
    if result.returncode == 0:
        return set()
    names = set(_XMLLINT_ERROR.findall(stderr))
    assert names, stderr
    return names


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize(("sample", "sub", "schema"), CASES)
def test_samples_validate_except_known_drift(tag: str, sample: str, sub: str | None, schema: str) -> None:
    root = sample_root(sample, sub)
    for expected, edit in KNOWN_DRIFT.get((tag, sample, sub), []):
        assert validate(root, tag, schema) == expected
        edit(root)
    assert validate(root, tag, schema) == set()


def test_namespace_injection_is_needed() -> None:
    """Without the namespace every document fails at the root: the injection is not cosmetic."""
    schema = etree.XMLSchema(etree.parse(str(XSD / "release-7.0.2" / "api_info.xsd")))
    root = sample_root("hook_api_call_info_template_instantiate.xml")
    assert not schema.validate(root)
    assert "No matching global declaration" in str(schema.error_log)
    assert schema.validate(namespaced(root))


def test_validation_detects_a_broken_document() -> None:
    root = sample_root("host_gpu_numa.xml")
    assert validate(root, "release-7.0.2", "host.xsd") == set()
    broken = copy.deepcopy(root)
    broken.insert(1, etree.Element("NOT_IN_THE_SCHEMA"))
    assert validate(broken, "release-7.0.2", "host.xsd") == {"NOT_IN_THE_SCHEMA"}


def test_upa_schemas_list_is_exact() -> None:
    """Each listed 6.10.5 schema either compiles (then it is validated by lxml) or fails for UPA;
    no other 6.10.5/7.0.2 schema used here fails to compile."""
    for tag in TAGS:
        for schema_name in {case[2] for case in CASES}:
            try:
                etree.XMLSchema(etree.parse(str(XSD / tag / schema_name)))
            except etree.XMLSchemaParseError as error:
                assert tag == "release-6.10.5" and schema_name in UPA_SCHEMAS_6_10, error
                assert "not determinist" in str(error)


# ---------------------------------------------------------------------------------------------
# The hardened parser.

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE VM [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<VM><ID>1</ID><NAME>&x;</NAME></VM>
"""


def billion_laughs(levels: int = 9) -> bytes:
    lines = ['<?xml version="1.0"?>', "<!DOCTYPE VM [", '<!ENTITY lol0 "lol">']
    for level in range(1, levels + 1):
        lines.append(f'<!ENTITY lol{level} "{f"&lol{level - 1};" * 10}">')
    lines += ["]>", f"<VM><ID>1</ID><NAME>&lol{levels};</NAME></VM>"]
    return "\n".join(lines).encode()


def test_parses_plain_document_and_strips_cdata_and_comments() -> None:
    root = xmlsafe.parse_xml(
        b"<?xml version='1.0' encoding='UTF-8'?><!-- c --><VM><ID><![CDATA[42]]></ID><!-- x --></VM>"
    )
    assert root.tag == "VM"
    assert root.findtext("ID") == "42"
    assert len(root) == 1


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (XXE, "DOCTYPE with entity declarations"),
        (billion_laughs(), "DOCTYPE with entity declarations"),
        (b"<!-- hidden --><?pi x?>\n<!DOCTYPE VM SYSTEM 'http://example.com/x.dtd'><VM/>", "has a DOCTYPE"),
        (b'<!DOCTYPE VM [<!ENTITY % p SYSTEM "http://example.com/p">%p;]><VM/>', "entity declarations"),
        (b"<VM><ID>1</ID>", "not well-formed"),
        (b"<VM>&undefined;</VM>", "not well-formed"),
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"<VM>caf\xe9</VM>", "not UTF-8"),
        (b'<?xml version="1.0" encoding="ISO-8859-1"?><VM/>', "only UTF-8"),
        ("\ufeff<VM/>".encode("utf-16"), "not UTF-8"),
        (b"<A>" * 65 + b"</A>" * 65, "deeper than 64"),
    ],
)
def test_hostile_or_broken_documents_are_refused(data: bytes, fragment: str) -> None:
    with pytest.raises(DocumentError) as caught:
        xmlsafe.parse_xml(data, "doc")
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_depth_limit_is_inclusive_and_configurable() -> None:
    assert xmlsafe.parse_xml(b"<A>" * 64 + b"</A>" * 64).tag == "A"
    with pytest.raises(DocumentError, match="deeper than 3"):
        xmlsafe.parse_xml(b"<A><B><C><D/></C></B></A>", max_depth=3)


def test_size_limit() -> None:
    document = b"<VM><NAME>" + b"a" * 1000 + b"</NAME></VM>"
    assert xmlsafe.parse_xml(document, max_bytes=len(document)).tag == "VM"
    with pytest.raises(DocumentError, match="more than the 1000-byte limit"):
        xmlsafe.parse_xml(document, max_bytes=1000)


def test_fifty_megabytes_refused_before_parsing() -> None:
    big = b"<VM><NAME>" + b"a" * (50 * 1024 * 1024) + b"</NAME></VM>"
    with pytest.raises(DocumentError, match="16777216-byte limit"):
        xmlsafe.parse_xml(big)


def test_tree_check_refuses_doctype_even_without_prolog_check() -> None:
    """Belt and braces: the post-parse check catches a DOCTYPE the prolog scan would miss."""
    root = etree.fromstring(b"<!DOCTYPE VM><VM/>", parser=xmlsafe.make_parser())
    with pytest.raises(DocumentError, match="DOCTYPE"):
        xmlsafe._check_tree(root, "doc", 64)


def test_parser_does_not_expand_entities_or_read_files(tmp_path: Path) -> None:
    """Even if a DOCTYPE got past the guards, the parser itself does not substitute entities."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    document = f'<!DOCTYPE VM [<!ENTITY x SYSTEM "file://{secret}">]><VM><NAME>&x;</NAME></VM>'.encode()
    root = etree.fromstring(document, parser=xmlsafe.make_parser())
    assert b"TOPSECRET" not in etree.tostring(root)


def test_lxml_refuses_billion_laughs_even_unguarded() -> None:
    with pytest.raises(etree.XMLSyntaxError):
        etree.fromstring(billion_laughs(), parser=xmlsafe.make_parser())


# ---------------------------------------------------------------------------------------------
# Base64.


def test_decode_base64_strict() -> None:
    payload = (SAMPLES / "vnm_action_vm.b64").read_text()
    decoded = xmlsafe.decode_base64(payload, "stdin")
    assert decoded.startswith(b"<VM><ID>42</ID>")
    wrapped = base64.encodebytes(decoded).decode()  # Ruby Base64.encode64 style line breaks
    assert "\n" in wrapped.strip()
    assert xmlsafe.decode_base64(wrapped, "stdin") == decoded


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("PFZNPg=*", "invalid base64"),
        ("PFZNPg", "invalid base64"),  # bad padding
        ("PFZN Pg==", "invalid base64"),  # blanks inside
        ("PFZNPg==PFZNPg==", "invalid base64"),  # data after padding
        ("PFZNPg==\u00e9", "non-ASCII"),
        ("PF-_Pg==", "invalid base64"),  # URL-safe alphabet
    ],
)
def test_decode_base64_refuses(text: str, fragment: str) -> None:
    with pytest.raises(DocumentError) as caught:
        xmlsafe.decode_base64(text, "$TEMPLATE")
    assert fragment in str(caught.value)
    assert "$TEMPLATE" in str(caught.value)


def test_decode_base64_size_cap_before_decoding() -> None:
    encoded = base64.b64encode(b"x" * 3000)
    assert len(xmlsafe.decode_base64(encoded, "p", max_bytes=3000)) == 3000
    with pytest.raises(DocumentError, match="limit"):
        xmlsafe.decode_base64(encoded, "p", max_bytes=2999)
    with pytest.raises(DocumentError, match="limit"):
        xmlsafe.decode_base64(b"A" * 10_000_000, "p", max_bytes=1000)


def test_importing_the_package_does_not_import_lxml() -> None:
    code = (
        "import sys; import aifactory_core.one, aifactory_core.one.payload, aifactory_core.one.template, "
        "aifactory_core.cli.cmd_vm; assert 'lxml' not in sys.modules, sorted(m for m in sys.modules if 'lxml' in m)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert result.returncode == 0, result.stderr
