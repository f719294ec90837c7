"""The size rules' one message: a width, height or length that a stride does not divide, why, and the two nearest
values that work. Every check of a size (the backbones, the canvas, the native patch, the nodes' validation) says it
this way."""

from __future__ import annotations

from .errors import MetaCanvasInputError


def size_problem(name: str, value: int, step: int, why: str, setting: str = "", offset: int = 0) -> str | None:
    """None when `value` is `offset` + a multiple of `step` (positive: at least `step` when `offset` is 0, else at
    least `offset`); else the message. `why`: the rule's reason; `setting`: where to change it (default: `name`).
    Video lengths are 4k+1 frames: `step` 4, `offset` 1."""
    least = offset or step
    if value >= least and (value - offset) % step == 0:
        return None
    below = max(least, offset + (value - offset) // step * step)
    above = max(below + step, offset + ((value - offset) // step + 1) * step)
    rule = f"a positive multiple of {step}" if not offset else f"{step}k+{offset}"
    return f"{name} {value} is not {rule} ({why}): set {setting or name} to {below} or {above}."


def check_size(name: str, value: int, step: int, why: str, setting: str = "", offset: int = 0) -> None:
    """Raise `size_problem`'s message, if any."""
    problem = size_problem(name, value, step, why, setting, offset)
    if problem:
        raise MetaCanvasInputError(problem)
