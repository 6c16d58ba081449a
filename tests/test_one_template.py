"""aifactory_core.one.template: OpenNebula template syntax, written and read back."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aifactory_core.errors import DocumentError
from aifactory_core.one import template as tpl

SAMPLES = Path(__file__).parent / "fixtures" / "opennebula" / "samples" / "synthesized"


# ---------------------------------------------------------------------------------------------
# Writer.


def test_render_single_and_vector() -> None:
    text = tpl.render_template(
        [("NAME", "gpu vm"), ("CPU", 4), ("PCI", {"VENDOR": "10de", "CLASS": "0302"}), ("EMPTY", {})]
    )
    assert text == 'NAME="gpu vm"\nCPU="4"\nPCI=[ VENDOR="10de", CLASS="0302" ]\nEMPTY=[ ]\n'


def test_quote_escapes_only_double_quotes() -> None:
    # Backslash is not an escape character in OpenNebula's lexer: it is written as is.
    assert tpl.quote('say "hi"') == '"say \\"hi\\""'
    assert tpl.quote("a\\b") == '"a\\b"'
    assert tpl.quote('\\"') == '"\\\\""'


@pytest.mark.parametrize("key", ["name", "A-B", "A B", "", "A=", "Ä", "A\n", "A]"])
def test_bad_keys_refused(key: str) -> None:
    with pytest.raises(DocumentError, match="invalid template attribute name"):
        tpl.render_attribute(key, "x")
    with pytest.raises(DocumentError, match="invalid template attribute name"):
        tpl.render_attribute("V", {key: "x"})


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("ends with a backslash\\", "backslash"),
        ("a]]>b", "']]>'"),
        ("nul\x00", "U+0000"),
        ("bell\x07", "U+0007"),
        ("\ud800", "U+D800"),
        ("\uffff", "U+FFFF"),
    ],
)
def test_unrepresentable_values_refused(value: str, fragment: str) -> None:
    with pytest.raises(DocumentError) as caught:
        tpl.quote(value, "KEY")
    assert fragment in str(caught.value)


@pytest.mark.parametrize("value", [True, None, b"bytes", ["x"]])
def test_non_text_values_refused(value: object) -> None:
    with pytest.raises(DocumentError, match="text or a number"):
        tpl.render_attribute("K", value)


# ---------------------------------------------------------------------------------------------
# Reader: OpenNebula's lexer rules.


def test_reads_probe_syntax() -> None:
    text = (
        "# comment\n"
        "HYPERVISOR=kvm\n"
        'MODELNAME="Intel(R) Xeon(R) Platinum 8480+"\n'
        "EMPTY=\n"
        'HUGEPAGE = [ NODE_ID = "0", SIZE = "2048", PAGES = "0" ]\n'
        "DS = [ ID = 0, USED_MB = 313330 ]\n"
        "PCI = [\n TYPE = \"10de:2330:0302\" ,\n  # inner comment\n ADDRESS = \"0000:17:00:0\"\n]\n"
        "V=[]\n"
    )
    assert tpl.parse_template(text) == [
        ("HYPERVISOR", "kvm"),
        ("MODELNAME", "Intel(R) Xeon(R) Platinum 8480+"),
        ("EMPTY", ""),
        ("HUGEPAGE", {"NODE_ID": "0", "SIZE": "2048", "PAGES": "0"}),
        ("DS", {"ID": "0", "USED_MB": "313330"}),
        ("PCI", {"TYPE": "10de:2330:0302", "ADDRESS": "0000:17:00:0"}),
        ("V", {}),
    ]


def test_vector_names_upper_cased_and_first_duplicate_wins() -> None:
    assert tpl.parse_template('V=[ a="1", A="2", b_c="3" ]') == [("V", {"A": "1", "B_C": "3"})]


def test_quoted_values_carry_structure_characters() -> None:
    text = 'A="x ] , = # [\ny"\nB="caf\u00e9 \u2603"\nC="q\\"q"\nD="back\\\\slash"\n'
    assert tpl.parse_template(text) == [
        ("A", "x ] , = # [\ny"),
        ("B", "caf\u00e9 \u2603"),
        ("C", 'q"q'),
        ("D", "back\\\\slash"),  # no backslash unescaping: two stay two
    ]


def test_trailing_backslash_swallows_text_like_oned() -> None:
    """Why the writer refuses a trailing backslash: flex's longest match runs past the quote."""
    # Alone at the end of the text the value reads back...
    assert tpl.parse_template('A="x\\"') == [("A", "x\\")]
    # ...but followed by another quoted value, the first string swallows text up to the next
    # unescaped quote and the rest no longer parses.
    with pytest.raises(DocumentError, match="expected ',' or ']'"):
        tpl.parse_template('V=[ A="x\\", B="y" ]')
    with pytest.raises(DocumentError, match="expected '='"):
        tpl.parse_template('A="x\\"\nB="y"\n')


def test_unquoted_value_with_quotes_longest_match() -> None:
    # An unterminated quote is not an error for the lexer: the unquoted STRING rule takes it.
    assert tpl.parse_template('A="unterminated\nB=1') == [("A", '"unterminated'), ("B", "1")]
    # '"abc"def' is longer as an unquoted STRING than as a quoted one: oned keeps the quotes.
    assert tpl.parse_template('A="abc"def\n') == [("A", '"abc"def')]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('A="x]]>"\n', "']]>'"),
        ('V=[ A="1", B="]]>" ]\n', "']]>'"),
        ("A", "expected '='"),
        ("A=", "expected a value"),
        ("=x", "expected an attribute name"),
        ('V=[ A="1" B="2" ]', "expected ',' or ']'"),
        ('V=[ A="1"', "expected ',' or ']'"),
        ("V=[ A=\n ]", "empty value"),
        ('V=[ A=[ B="1" ] ]', "nested vector"),
        ("A=,", "expected a value"),
    ],
)
def test_syntax_errors(text: str, fragment: str) -> None:
    with pytest.raises(DocumentError) as caught:
        tpl.parse_template(text, "probe output")
    message = str(caught.value)
    assert fragment in message
    assert message.startswith("probe output: ")
    assert " at line " in message


def test_error_names_the_line() -> None:
    with pytest.raises(DocumentError, match="at line 3"):
        tpl.parse_template('A="1"\nB="2"\nC\n')


@pytest.mark.parametrize(
    "name", ["im_probe_output_host_system.txt", "im_probe_output_host_monitor.txt", "im_probe_output_vm_monitor.txt"]
)
def test_reads_probe_samples(name: str) -> None:
    attributes = tpl.parse_template((SAMPLES / name).read_text())
    assert attributes
    grouped = tpl.template_to_dict(attributes)
    if name == "im_probe_output_host_system.txt":
        assert grouped["MODELNAME"] == ["Intel(R) Xeon(R) Platinum 8480+"]
        assert grouped["KVM_MACHINES"] == ["pc-i440fx-8.2 pc pc-q35-8.2 q35"]
        assert len(grouped["PCI"]) == 2
        gpu = grouped["PCI"][0]
        assert isinstance(gpu, dict)
        assert gpu["ADDRESS"] == "0000:17:00:0"
        assert gpu["DEVICE_NAME"] == "NVIDIA Corporation GH100 [H100 SXM5 80GB]"
        assert len(grouped["CORE"]) == 8
        assert grouped["DS"] == [{"ID": "0", "USED_MB": "313330", "TOTAL_MB": "3815447", "FREE_MB": "3502117"}]
    elif name == "im_probe_output_host_monitor.txt":
        assert grouped["FREEMEMORY"] == ["431210496"]
        assert {"NODE_ID": "1", "FREE": "250986496", "USED": "12869632"} in grouped["MEMORY_NODE"]
    else:
        assert [key for key, _ in attributes] == ["VM"]


# ---------------------------------------------------------------------------------------------
# vm/monitor lines.


def test_vm_monitor_sample_decodes() -> None:
    (record,) = tpl.parse_vm_monitor((SAMPLES / "im_probe_output_vm_monitor.txt").read_text())
    assert record.vm_id == 42
    assert record.deploy_id == "6f1c2c1e-5d0a-4d43-9a53-7d0c6f1b2a42"
    monitor = dict(record.monitor)
    assert monitor["CPU"] == "398.5"
    assert monitor["GPU_UTILIZATION"] == "97.0"
    assert len(monitor) == 13


def test_vm_monitor_line_matches_domain_rb_format() -> None:
    line = tpl.vm_monitor_line(42, "6f1c2c1e-5d0a-4d43-9a53-7d0c6f1b2a42", {"AIF_GPU_XID": 0, "AIF_NOTE": 'a "b"'})
    assert line.startswith('VM = [ ID="42", DEPLOY_ID="6f1c2c1e-5d0a-4d43-9a53-7d0c6f1b2a42", MONITOR="')
    assert "\n" not in line
    encoded = line.split('MONITOR="')[1].split('"')[0]
    assert base64.b64decode(encoded, validate=True).decode() == 'AIF_GPU_XID="0"\nAIF_NOTE="a \\"b\\""\n'
    (record,) = tpl.parse_vm_monitor(line + "\n")
    assert record.vm_id == 42
    assert dict(record.monitor) == {"AIF_GPU_XID": "0", "AIF_NOTE": 'a "b"'}


@pytest.mark.parametrize(("vm_id", "attributes"), [(-1, {}), ("x", {}), (1, {"bad key": "1"}), (1, {"K": "a\\"})])
def test_vm_monitor_line_refuses(vm_id: object, attributes: dict[str, str]) -> None:
    with pytest.raises(DocumentError):
        tpl.vm_monitor_line(vm_id, "one-1", attributes)  # type: ignore[arg-type]


def test_parse_vm_monitor_refuses_bad_base64() -> None:
    with pytest.raises(DocumentError, match="invalid base64"):
        tpl.parse_vm_monitor('VM = [ ID="1", DEPLOY_ID="d", MONITOR="@@@" ]')


# ---------------------------------------------------------------------------------------------
# Property: whatever the writer accepts, the reader returns unchanged.

_ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"))
_TRICKY = st.sampled_from(
    ['"', "\\", "]", "[", ",", "=", "#", "\n", "\r", "\t", " ", "é", "雪", "🦉", "]]", ">", '\\"', "\x01"]
)
values = st.lists(st.one_of(_TRICKY, st.text(_ALPHABET, max_size=5)), max_size=12).map("".join)
keys = st.from_regex(r"[A-Z0-9_]{1,12}", fullmatch=True)


def _representable(value: str) -> bool:
    try:
        tpl.check_value(value)
    except DocumentError:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(keys, st.one_of(values, st.dictionaries(keys, values, max_size=4))), max_size=6))
def test_round_trip(attributes: list[tuple[str, str | dict[str, str]]]) -> None:
    flat = [v for _, item in attributes for v in (item.values() if isinstance(item, dict) else [item])]
    if not all(_representable(v) for v in flat):
        with pytest.raises(DocumentError):
            tpl.render_template(attributes)
        return
    text = tpl.render_template(attributes)
    assert tpl.parse_template(text) == attributes


@settings(max_examples=300, deadline=None)
@given(values)
def test_round_trip_single_value(value: str) -> None:
    if _representable(value):
        assert tpl.parse_template(tpl.render_attribute("K", value)) == [("K", value)]
        assert tpl.parse_template(tpl.render_attribute("V", {"A": value, "B": value})) == [
            ("V", {"A": value, "B": value})
        ]
    else:
        assert (
            value.endswith("\\")
            or "]]>" in value
            or any((ord(c) < 32 and c not in "\t\n\r") or c in "\ufffe\uffff" for c in value)
        )
