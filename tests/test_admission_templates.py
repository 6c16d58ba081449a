"""The hook templates register through pyone against the XML-RPC test server (real HTTP; its
``one.hook.info``/``one.hookpool.info`` answers validated against OpenNebula 7.0.2's hook XSDs),
and each follows the hook contract: stdin payload, the right variable, an existing executable."""

from __future__ import annotations

from pathlib import Path

import pyone
import pytest

from aifactory_core.one.template import parse_template
from aifactory_core.policy.admission import HOOKED_CALLS

HOOKS = Path(__file__).parent.parent / "hooks"
TEMPLATES = sorted((HOOKS / "templates").glob("*.tmpl"))


def attributes(path: Path) -> dict[str, str]:
    return {key: value for key, value in parse_template(path.read_text(), path.name) if isinstance(value, str)}


@pytest.mark.parametrize("path", TEMPLATES, ids=[path.stem for path in TEMPLATES])
def test_template_follows_the_hook_contract(path: Path) -> None:
    values = attributes(path)
    assert values["NAME"] == path.stem
    assert values["ARGUMENTS_STDIN"] == "YES"  # any other value means argv to the hook manager
    executable = HOOKS / Path(values["COMMAND"]).name
    assert values["COMMAND"].startswith("aifactory/") and executable.exists() and executable.stat().st_mode & 0o111
    if values["TYPE"] == "api":
        assert values["ARGUMENTS"] == f"$API {values['CALL']}" and values["CALL"] in HOOKED_CALLS
    else:
        assert values["TYPE"] == "state" and values["RESOURCE"] == "VM" and values["ARGUMENTS"] == "$TEMPLATE"
        assert values["ON"] == "CUSTOM" and values["STATE"] and values["LCM_STATE"]


def test_every_hooked_call_has_a_template() -> None:
    calls = {attributes(path).get("CALL") for path in TEMPLATES}
    assert set(HOOKED_CALLS) <= calls


def test_templates_register_through_pyone(one_server) -> None:
    client = pyone.OneServer(one_server.endpoint, session="oneadmin:secret")
    ids = [client.hook.allocate(path.read_text()) for path in TEMPLATES]
    pool = client.hookpool.info(-2, -1, -1)
    assert sorted(hook.NAME for hook in pool.HOOK) == sorted(path.stem for path in TEMPLATES)
    info = client.hook.info(ids[0])
    assert info.TEMPLATE["ARGUMENTS_STDIN"] == "YES"  # pyone maps the template to a dict
