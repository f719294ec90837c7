"""FSDP2 for the trained modules: torch's `fully_shard` on every transformer layer, then on the objective.

Why not accelerate's FSDP plugin: accelerate turns FSDP on only for accelerator processes, so that code path could
not run (or be tested) on CPU processes; `fully_shard` runs on both (gloo on CPU, NCCL on GPU), with the same
mixed precision and checkpoints (`checkpoints.py`). The layers sharded one by one are the classes the models
themselves name as not to be split (`_no_split_modules`: the DiT blocks, the MLLM decoder and vision layers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import MetaCanvasInputError


def layer_classes(module: nn.Module) -> set[str]:
    """Class names of the layers to shard one by one: every `_no_split_modules` inside `module`."""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return names


def shard(module: nn.Module, mixed_precision: str) -> nn.Module:
    """Shard `module` in place over the default process group (FSDP2); `mixed_precision` "bf16" or "no".

    With bf16 the layers are gathered and run in bf16 and gradients reduced in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = mixed_precision == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    classes = layer_classes(module)
    units = [m for m in module.modules() if type(m).__name__ in classes and any(True for _ in m.parameters())]
    for unit in [*units, module]:
        dtypes = {p.dtype for p in unit.parameters()}
        if len(dtypes) > 1 and not bf16:
            raise MetaCanvasInputError(
                f"sharding 'fsdp' gathers each layer in one dtype, but {type(unit).__name__} holds "
                f"{sorted(str(d) for d in dtypes)} parameters: set mixed_precision 'bf16' or frozen_dtype 'fp32'."
            )
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(module, **kwargs)
    return module


@contextmanager
def no_sync(module: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (no reduce-scatter) for the micro-batches before the last."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
