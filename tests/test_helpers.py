"""The test helpers' waiting rule: a wait ends on a real result, never on an empty one."""

from __future__ import annotations

import pytest

from tests.helpers import wait_until


def test_wait_until_treats_an_empty_list_as_not_yet() -> None:
    answers = iter([[], [], ["delivery"]])
    assert wait_until(lambda: next(answers), 5, "a delivery", interval=0.001) == ["delivery"]


@pytest.mark.parametrize("empty", [None, False, [], {}, ""])
def test_wait_until_times_out_on_an_empty_result(empty: object) -> None:
    with pytest.raises(AssertionError, match="waiting for a delivery"):
        wait_until(lambda: empty, 0.01, "a delivery", interval=0.001)
