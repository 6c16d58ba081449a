"""The suite's lean XML-RPC transport against pyone's, both talking to a real oned.

The lean transport (hooks use it: no pyone import on their start-up path) must read oned's
documents and errors exactly as pyone does, and what it sends must reach oned unchanged.
"""

from __future__ import annotations

import pytest
from lxml import etree
from realone import RealOne

from aifactory_core.policy.oned import Oned, OnedError

pytestmark = pytest.mark.realone


@pytest.fixture(scope="module")
def vm(real_one: RealOne) -> int:
    """A VM on hold (no host needed) owned by oneadmin, which the admission hook leaves alone."""
    return int(real_one.client().vm.allocate('NAME="transport" CPU="1" MEMORY="64" AIFACTORY_KEEP_HOLD="YES"', True))


def _both(one: RealOne) -> tuple[Oned, Oned]:
    session = f"oneadmin:{one.password}"
    return Oned(one.endpoint, session), Oned(one.endpoint, session, transport="pyone")


def _normal(document: etree._Element) -> bytes:
    """The document minus what changes between two reads (monitoring and log timestamps)."""
    for tag in ("MONITORING", "LAST_POLL"):
        for element in document.iter(tag):
            element.clear()
    return etree.tostring(document)


def test_documents_are_identical_through_both_transports(real_one: RealOne, vm: int) -> None:
    lean, pyone = _both(real_one)
    for call in (("one.vm.info", vm, False), ("one.vmpool.infoextended", -2, -1, -1, -1),
                 ("one.grouppool.info",), ("one.acl.info",)):
        assert _normal(lean.document(*call)) == _normal(pyone.document(*call)), call[0]
    assert lean.document("one.vm.info", vm, False).findtext("ID") == str(vm)


def test_text_with_markup_and_unicode_reaches_oned_unchanged(real_one: RealOne, vm: int) -> None:
    lean, pyone = _both(real_one)
    text = "a <b> & c \u00e9\u4e2d"
    lean.call("one.vm.update", vm, f'AIFACTORY_NOTE="{text}"', 1)
    assert pyone.document("one.vm.info", vm, False).findtext("USER_TEMPLATE/AIFACTORY_NOTE") == text


def test_oned_refusal_is_the_same_one_line_error_through_both(real_one: RealOne) -> None:
    messages = []
    for oned in _both(real_one):
        with pytest.raises(OnedError) as caught:
            oned.call("one.vm.info", 987654, False)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith("one.vm.info: [one.vm.info]") and "987654" in messages[0]
    assert "\n" not in messages[0]
