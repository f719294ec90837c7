"""Number widgets refused at validation, as ComfyUI calls VALIDATE_INPUTS: NaN and ±inf (which pass ComfyUI's own
min/max) and, for every input VALIDATE_INPUTS declares (ComfyUI then skips its min/max), values out of range."""

from __future__ import annotations

import inspect
import math

import pytest


def _float_inputs(pack) -> list[tuple[str, type, str, dict]]:
    """(node name, class, input, options) of every FLOAT widget of every node."""
    found = []
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        for section in cls.INPUT_TYPES().values():
            for input_name, spec in section.items():
                if spec[0] == "FLOAT":
                    found.append((name, cls, input_name, spec[1]))
    return found


def test_every_float_widget_is_validated(pack):
    floats = _float_inputs(pack)
    assert {(n, i) for n, _, i, _ in floats} >= {
        ("MetaCanvasSampler", "canvas_strength"),
        ("MetaCanvasAttachCanvas", "canvas_strength"),
        ("MetaCanvasPlanPreview", "blend"),
    }
    for name, cls, input_name, options in floats:
        validate = getattr(cls, "VALIDATE_INPUTS", None)
        assert validate is not None and input_name in inspect.signature(validate).parameters, (name, input_name)
        low, high = options["min"], options["max"]
        for bad in (math.nan, math.inf, -math.inf):
            message = validate(**{input_name: bad})
            assert isinstance(message, str) and message.startswith(f"{input_name} is {bad!r}, not a finite"), message
            assert f"from {low} to {high}" in message, message
        for bad in (low - 0.5, high + 0.5):
            message = validate(**{input_name: bad})
            assert isinstance(message, str) and message.startswith(f"{input_name} {bad} is out of range"), message
        for good in (low, options["default"], high):
            assert validate(**{input_name: good}) is True, (name, input_name, good)


def test_linked_or_missing_inputs_are_left_to_run_time(pack):
    """ComfyUI hands VALIDATE_INPUTS None for a linked input (its value is not known yet) and leaves out a missing one."""
    sampler = pack.NODE_CLASS_MAPPINGS["MetaCanvasSampler"]
    assert sampler.VALIDATE_INPUTS() is True
    assert sampler.VALIDATE_INPUTS(cfg=None, width=None, height=None, length=None, canvas_strength=None) is True


@pytest.mark.parametrize(
    "values, words",
    [
        ({"width": 8208, "height": 512}, "width 8208 is out of range: give a number from 16 to 8192"),
        ({"width": 512, "height": 0}, "height 0 is out of range: give a number from 16 to 8192"),
        ({"length": 1029}, "length 1029 is out of range: give a number from 1 to 1025"),
        ({"cfg": 31.0}, "cfg 31.0 is out of range: give a number from 0.0 to 30.0 (default 4.5)"),
        ({"frame_rate": "fast"}, "frame_rate is 'fast', not a finite number"),
    ],
)
def test_the_sampler_checks_the_range_comfyui_skips(pack, values, words):
    """Its declared ints too: ComfyUI does not check the range of width, height and length once they are declared."""
    message = pack.NODE_CLASS_MAPPINGS["MetaCanvasSampler"].VALIDATE_INPUTS(**values)
    assert isinstance(message, str) and words in message, message
