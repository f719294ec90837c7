"""Sharded training for real: the tiny T2I recipe under FSDP2 on two CPU processes (gloo) against one process
that runs the same global batch as two micro-batches, and its state resumed on one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_training import RECIPES, losses

from metacanvas_core.training.config import load_config
from metacanvas_core.training.trainer import Trainer

# Two processes reduce gradients in another order than one process summing two micro-batches: the traces agree
# to float32 rounding, not bit for bit.
TOLERANCE = dict(rtol=1e-4, atol=1e-6)


def overrides(tiny) -> list[str]:
    data = json.dumps([{"synthetic": {"kind": "t2i", "count": 8, "sizes": [[64, 64], [48, 80]], "seed": 0}}])
    return [f"mllm={tiny['mllm']}", f"backbone={tiny['sana']}", f"data={data}", "batch_size=2", "eval_samples=0"]


def test_fsdp_on_two_processes_matches_one_process_and_resumes_on_one(tiny, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523"]
    cmd += ["-m", "metacanvas_core.train", "tiny_sana_t2i", "--output-dir", str(tmp_path / "fsdp"), "--max-steps", "3"]
    for item in [*overrides(tiny), "sharding=fsdp"]:
        cmd += ["--set", item]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    one = load_config(RECIPES / "tiny_sana_t2i.json", [*overrides(tiny), "grad_accum=2"])
    Trainer(one, tmp_path / "one", max_steps=4, progress=False).train()
    sharded, single = losses(tmp_path / "fsdp"), losses(tmp_path / "one")
    assert list(sharded) == [1, 2, 3]
    torch.testing.assert_close(torch.tensor(list(sharded.values())), torch.tensor([single[s] for s in (1, 2, 3)]),
                               **TOLERANCE)  # fmt: skip
    assert len(set(single.values())) == 4  # the model learns: no two steps alike

    # The state two processes saved (each its shards) resumes on one: step 4 as the one-process run's.
    Trainer(one, tmp_path / "fsdp", max_steps=4, resume=tmp_path / "fsdp", progress=False).train()
    torch.testing.assert_close(losses(tmp_path / "fsdp")[4], single[4], **TOLERANCE)

    # The export is gathered from the shards: the same checkpoint and backbone folder as an unsharded run's.
    from metacanvas_core.checkpoint import load_metacanvas

    assert load_metacanvas(tmp_path / "fsdp" / "tiny-sana-t2i.safetensors").config.backbone == "sana"
    assert (tmp_path / "fsdp" / "backbone" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("value, message", [("fsdp2", "sharding is 'ddp' or 'fsdp'")])
def test_sharding_option_is_checked(tiny, value, message):
    from metacanvas_core.errors import MetaCanvasInputError

    with pytest.raises(MetaCanvasInputError, match=message):
        load_config(RECIPES / "tiny_sana_t2i.json", [*overrides(tiny), f"sharding={value}"])
