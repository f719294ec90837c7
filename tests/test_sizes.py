"""The size rules' one message (`sizes.py`): which values pass, and the two nearest valid values it offers."""

from __future__ import annotations

import pytest

from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.sizes import check_size, size_problem


@pytest.mark.parametrize(
    ("value", "step", "offset", "nearest"),
    [
        (48, 32, 0, (32, 64)),
        (20, 32, 0, (32, 64)),  # below the least: the least and the next
        (0, 16, 0, (16, 32)),
        (-8, 16, 0, (16, 32)),
        (8, 4, 1, (5, 9)),  # Wan2.2 lengths: 4k+1
        (0, 4, 1, (1, 5)),
    ],
)
def test_a_size_off_the_rule_names_the_two_nearest(value, step, offset, nearest):
    message = size_problem("width", value, step, "why", offset=offset)
    rule = f"a positive multiple of {step}" if not offset else f"{step}k+{offset}"
    assert message == f"width {value} is not {rule} (why): set width to {nearest[0]} or {nearest[1]}."
    for valid in nearest:
        assert size_problem("width", valid, step, "why", offset=offset) is None


def test_the_setting_is_named_and_check_raises():
    assert size_problem("height", 64, 32, "why") is None and size_problem("length", 1, 4, "why", offset=1) is None
    with pytest.raises(MetaCanvasInputError, match=r"^height 40 .*: set the height of X to 32 or 64\.$"):
        check_size("height", 40, 32, "why", "the height of X")
