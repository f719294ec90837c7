"""Weights that live in another dtype or on another device than the computation.

- `ScaledFP8Linear`: a Linear stored in float8 with a per-tensor scale, as in ComfyUI's `*_fp8_scaled` files
  (the real weight is `weight.float() * scale_weight`); made in the input's dtype at each forward.
- `make_castable`: a loaded model's modules learn ComfyUI's lowvram protocol, each as ComfyUI's own ops would
  build it: a layer holding a `weight` (and `bias`) gets the `comfy_cast_weights` flag, which ComfyUI's memory
  manager turns on for layers it leaves on the offload device (and reads `<layer>.weight` / `.bias` of to plan
  the load); with it on, the weights are cast to the input's device at each forward instead of being moved once.
  So a model larger than the free VRAM is streamed layer by layer by ComfyUI's own manager. Any other module
  with weights of its own (a canvas's tokens, a block's modulation table) carries no flag, since the manager has
  no `weight` to read there; it casts its own weights at every call, as ComfyUI's models cast such tensors
  themselves. The flag is a plain attribute: this module never imports ComfyUI; with the flag off a layer
  computes exactly as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MetaCanvasInputError
from .inputs import WeightDtype

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_WEIGHT_DTYPES = {
    WeightDtype.DEFAULT: None,
    WeightDtype.FP8_E4M3FN: torch.float8_e4m3fn,
    WeightDtype.FP8_E5M2: torch.float8_e5m2,
}


def fp8_dtype(weight_dtype: WeightDtype | str) -> torch.dtype | None:
    """The float8 dtype a `weight_dtype` choice keeps Linear weights in (None: as stored); refuses other names."""
    try:
        return _WEIGHT_DTYPES[WeightDtype(weight_dtype)]
    except ValueError:
        raise MetaCanvasInputError(f"weight_dtype '{weight_dtype}' is not one of {WeightDtype.values()}.") from None


class ScaledFP8Linear(nn.Linear):
    """A Linear whose weight is float8 with a scalar `scale_weight`; computes with weight·scale in the input dtype."""

    comfy_cast_weights = True  # its weight is always made at forward, wherever it lives

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_dtype: torch.dtype, device=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=weight_dtype, device=device), False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device), False) if bias else None
        self.register_buffer("scale_weight", torch.ones((), device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_dtype: torch.dtype = torch.float8_e4m3fn) -> ScaledFP8Linear:
        """`linear` quantised to `weight_dtype` with scale 1 (ComfyUI's weight_dtype fp8 for a bf16 file)."""
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, weight_dtype, linear.weight.device
        )
        layer.weight.data = linear.weight.data.to(weight_dtype)
        if linear.bias is not None:
            layer.bias.data = linear.bias.data
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.device).float() * self.scale_weight.to(x.device).float()
        for fn in getattr(self, "weight_function", ()):
            w = fn(w)
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
        return F.linear(x, w.to(x.dtype), bias)


def keep_linears_in_fp8(model: nn.Module, weight_dtype: torch.dtype, skip: tuple[str, ...] = ()) -> None:
    """Every plain Linear of a loaded model (but those named in `skip`) becomes a ScaledFP8Linear with scale 1, in
    place: ComfyUI's weight_dtype fp8 for a model loaded in bf16/fp16."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name not in skip:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ScaledFP8Linear.from_linear(module, weight_dtype))


def _cast_own_weights(module: nn.Module, forward, args: tuple, kwargs: dict, always: bool):
    """Run `forward` (the module's own) with its own weights cast to its first tensor input's device (fp8 to the input's dtype)
    and passed through ComfyUI's weight patches of lowvram layers (`<name>_function`); as is without a tensor input
    or when not `always` and the flag is off."""
    x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if x is None or not (always or module.comfy_cast_weights):
        return forward(*args, **kwargs)
    own = dict(module._parameters)
    try:
        for name, p in own.items():
            if p is not None:
                value = p.to(x.device, x.dtype if p.dtype in FP8_DTYPES else p.dtype)
                for fn in getattr(module, f"{name}_function", None) or ():
                    value = fn(value)
                module._parameters[name] = value
        return forward(*args, **kwargs)
    finally:
        module._parameters.update(own)


class _CastOnForward:
    """Mixin of a layer whose weights are `weight` and `bias` (bias None if it has none, as ComfyUI's ops have it):
    with `comfy_cast_weights` on, they are cast to the input's device for the call."""

    comfy_cast_weights = False

    def forward(self, *args, **kwargs):
        return _cast_own_weights(self, super().forward, args, kwargs, always=False)


class _CastAlways:
    """Mixin of a module with weights the memory manager does not read (no flag): cast to the input's device at every
    call, a no-op once they are there."""

    def forward(self, *args, **kwargs):
        return _cast_own_weights(self, super().forward, args, kwargs, always=True)


_CASTABLE: dict[tuple[type, type], type] = {}
_LAYER_WEIGHTS = {"weight", "bias"}


def _castable(cls: type, mixin: type) -> type:
    if (cls, mixin) not in _CASTABLE:
        _CASTABLE[cls, mixin] = type(f"Castable{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _CASTABLE[cls, mixin]


def make_castable(model: nn.Module) -> nn.Module:
    """Give every module that holds weights of its own a cast-on-forward (in place; names, weights and, with the flag
    off, results unchanged): a leaf layer whose weights are `weight`/`bias` the flag the memory manager drives, any
    other (other names, or children too: modules ComfyUI's partial loading never moves) a cast at every call."""
    for module in model.modules():
        own = {name for name, _ in module.named_parameters(recurse=False)}
        if isinstance(module, (_CastOnForward, _CastAlways, ScaledFP8Linear)) or not own:
            continue
        layer = "weight" in own and own <= _LAYER_WEIGHTS and not any(True for _ in module.children())
        module.__class__ = _castable(type(module), _CastOnForward if layer else _CastAlways)
        if layer and not hasattr(module, "bias"):
            module.bias = None  # the manager reads `<layer>.bias` of every flagged layer
    return model


def set_cast(model: nn.Module, on: bool) -> None:
    """Turn the cast-on-forward of every flagged layer on or off (what ComfyUI's lowvram loading does)."""
    for module in model.modules():
        if isinstance(module, _CastOnForward):
            module.comfy_cast_weights = on
