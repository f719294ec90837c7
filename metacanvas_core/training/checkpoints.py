"""Resumable training states through torch.distributed.checkpoint (DCP).

One format for one process, DDP and FSDP: the trained weights and the optimizer state are saved by name with their
global shapes, each process writing its own shards, so a state saved by N processes loads on M (DCP reshards).
Only trained weights are saved (frozen ones come from the model folders); the LR scheduler is one small file.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

SCHEDULER = "scheduler.pt"


def _trained(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model, optim = get_state_dict(module, optimizer)
    names = {n for n, p in _unwrapped(module).named_parameters() if p.requires_grad}
    return {"model": {k: v for k, v in model.items() if k in names}, "optim": optim}


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


@contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns that it runs without a process group: in a one-process run that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def save(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler, main: bool) -> None:
    """Write the trained weights, optimizer and scheduler of every process into `folder` (all processes call it)."""
    with _quiet():
        dcp.save(_trained(module, optimizer), checkpoint_id=str(folder))
    if main:
        torch.save(scheduler.state_dict(), folder / SCHEDULER)


def load(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Load a state written by `save`, whatever the number of processes that wrote it."""
    state = _trained(module, optimizer)
    with _quiet():
        dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        module,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(strict=False),
    )
    scheduler.load_state_dict(torch.load(folder / SCHEDULER, weights_only=True))


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the main process (gathered from shards), on CPU; empty on the others."""
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in _unwrapped(module).state_dict().items()}
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
