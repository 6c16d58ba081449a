"""The real-oned tier's own fixture: a fresh oned answers in time, and upstream's CLI works as oneadmin."""

from __future__ import annotations

import pytest
from realone import READY_BUDGET_S, RealOne

pytestmark = pytest.mark.realone


def test_fresh_oned_answers_within_budget_on_an_empty_database(real_one: RealOne) -> None:
    assert 0 < real_one.started_s < READY_BUDGET_S
    client = real_one.client()
    assert client.user.info(0).NAME == "oneadmin"
    assert client.system.version() == "7.0.2"
    listed = real_one.run("onehost", "list", "--csv")  # upstream's Ruby CLI, as oneadmin
    assert listed.stdout.splitlines()[0].startswith("ID,"), listed.stdout
