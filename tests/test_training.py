"""The trainer on the tiny models (CPU): loss falls, four samples overfit, exact resume, frozen parts
stay frozen, and an exported checkpoint loads through the Connector Loader and changes the output."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.graph import run

from metacanvas_core.train import main as train_main
from metacanvas_core.training.config import TrainConfig, load_config
from metacanvas_core.training.trainer import Trainer


def chain(loaded, checkpoint):
    """Connector Loader -> Plan -> Project -> Sampler -> Decode, as in test_nodes."""
    m, mllm, backbone = loaded
    (mc,) = run(m["MetaCanvasConnectorLoader"], mllm=mllm, backbone=backbone, checkpoint=checkpoint)
    kw = dict(width=64, height=64)
    (plan,) = run(
        m["MetaCanvasPlan"], mllm=mllm, metacanvas=mc, prompt="a red circle at the top left", negative_prompt="", **kw
    )
    (cond,) = run(m["MetaCanvasProject"], plan=plan, metacanvas=mc, backbone=backbone)
    (latent,) = run(
        m["MetaCanvasSampler"],
        backbone=backbone,
        cond=cond,
        seed=0,
        steps=2,
        cfg=4.5,
        scheduler="dpm_solver_flow",
        use_canvas=True,
        **kw,
    )
    return run(m["MetaCanvasDecode"], backbone=backbone, latent=latent)[0]


RECIPES = Path(__file__).resolve().parents[1] / "metacanvas_core" / "recipes"


def make_config(tiny, **overrides) -> TrainConfig:
    base = dict(
        name="test-run",
        mllm=str(tiny["mllm"]),
        backbone=str(tiny["sana"]),
        trainable=["canvas", "canvas_connector", "dit"],
        lr=1e-3,
        max_steps=4,
        batch_size=2,
        buckets=[[64, 64]],
        data=[{"synthetic": {"kind": "t2i", "count": 4, "seed": 0}}],
        eval_samples=0,
    )
    base.update(overrides)
    config = TrainConfig(**base)
    config.validate()
    return config


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def losses(folder) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(folder) if "loss" in r}


def eval_losses(folder) -> list[float]:
    return [r["eval_loss"] for r in metrics(folder) if "eval_loss" in r]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A short run on the synthetic shapes: canvas + canvas connector + DiT."""
    out = tmp_path_factory.mktemp("trained")
    config = make_config(
        tiny,
        max_steps=30,
        batch_size=4,
        data=[{"synthetic": {"kind": "t2i", "count": 8, "sizes": [[64, 64], [48, 80]], "seed": 1}}],
        buckets=[[64, 64], [48, 80]],
        eval_samples=8,
        latent_cache="latents",
    )
    Trainer(config, out, progress=False).train()
    return out


def test_loss_falls_on_the_synthetic_set(trained):
    start, end = eval_losses(trained)
    assert end < 0.8 * start, (start, end)
    record = metrics(trained)[1]
    assert set(record) >= {"step", "loss", "lr", "samples_per_s"} and record["step"] == 1
    assert any((trained / "latents").rglob("*.safetensors"))  # the latent cache was built and used


def test_four_samples_overfit(tiny, tmp_path):
    config = make_config(
        tiny,
        max_steps=25,
        batch_size=4,
        lr=5e-3,
        cond_dropout=0.0,
        eval_samples=4,
        trainable=["canvas_connector", "dit"],  # no gradient through the MLLM: half the step time
        latent_cache="latents",
    )
    Trainer(config, tmp_path, progress=False).train()
    start, end = eval_losses(tmp_path)
    assert end < 0.35 * start, (start, end)


def test_resume_reproduces_the_uninterrupted_loss_trace(tiny, tmp_path):
    lora = {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.05,
        "target_modules": r"model\.language_model.*\.(q_proj|v_proj)",
    }
    kw = dict(
        max_steps=6,
        save_every=3,
        cond_dropout=0.5,
        trainable=["canvas", "canvas_connector", "mllm_lora", "dit"],
        mllm_lora=lora,
        init_checkpoint=str(tiny["sana_metacanvas"]),
    )
    Trainer(make_config(tiny, **kw), tmp_path / "full", progress=False).train()
    Trainer(make_config(tiny, **kw), tmp_path / "part", max_steps=3, progress=False).train()
    Trainer(make_config(tiny, **kw), tmp_path / "part", resume=tmp_path / "part", progress=False).train()
    full, part = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert list(full) == list(part) == [1, 2, 3, 4, 5, 6]
    assert full == part  # bit-exact
    assert len(set(full.values())) == 6


def test_frozen_parts_get_no_update(tiny, tmp_path):
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": r"model\.language_model.*\.(q_proj|v_proj)"}
    config = make_config(
        tiny,
        max_steps=2,
        cond_dropout=0.0,
        trainable=["canvas_connector", "dit_cross_attention", "mllm_lora"],
        mllm_lora=lora,
        init_checkpoint=str(tiny["sana_metacanvas"]),  # nonzero projections: gradients reach everything at once
    )
    trainer = Trainer(config, tmp_path, progress=False)
    named = {
        **{f"mc.{n}": p for n, p in trainer.mc.named_parameters()},
        **{f"dit.{n}": p for n, p in trainer.backbone.transformer.named_parameters()},
        **{f"mllm.{n}": p for n, p in trainer.planner.model.named_parameters()},
        **{f"vae.{n}": p for n, p in trainer.backbone.vae.named_parameters()},
    }
    before = {n: p.detach().clone() for n, p in named.items()}
    trainer.train()
    changed = {n for n, p in named.items() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n in named if n.startswith("mc.canvas_connector.") or ".attn2." in n or "lora_" in n}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    assert any(n.startswith("mc.canvas_connector.") for n in changed)
    assert any(".attn2." in n for n in changed)
    assert any("lora_B" in n for n in changed)
    assert not any(n.startswith(("mc.canvas.", "vae.")) for n in changed)


@pytest.mark.parametrize(
    "recipe, backbone, parts",
    [
        ("tiny_flux_kontext_edit", "flux_kontext", {"lora", "context"}),  # edits: reference image into the DiT
        ("tiny_wan_s2", "wan", {"context"}),  # video: images and 9-frame clips, context MLP + cross-attention
        ("tiny_wan_s3", "wan", {"lora", "context"}),  # every parameter: all DiT, context MLP, canvas LoRA, canvas
    ],
)
def test_tiny_recipes_of_the_other_backbones(tiny, tmp_path, recipe, backbone, parts):
    from metacanvas_core.backbones import load_backbone
    from metacanvas_core.checkpoint import load_metacanvas
    from metacanvas_core.planner import Planner

    overrides = [f"mllm={tiny['mllm']}", f"backbone={tiny[backbone]}", "max_steps=3", "eval_samples=0"]
    config = load_config(RECIPES / f"{recipe}.json", overrides)
    trainer = Trainer(config, tmp_path, progress=False)
    assert all(math.isfinite(x) for x in trainer.train())
    mc = load_metacanvas(tmp_path / f"{config.name}.safetensors")
    exported = load_backbone(tmp_path / "backbone")
    mc.check_compatible(Planner.from_folder(tiny["mllm"]).hidden_size, "mllm", exported.spec, "backbone", True)
    assert (mc.lora is not None) == ("lora" in parts)
    assert (mc.context_connector is not None) == ("context" in parts)
    assert mc.config.lora == (config.mllm_lora if "lora" in parts else None)


# One batch of 4 and two accumulated micro-batches of 2 run the same samples with the same draws (seeded by each
# sample's place in the step) through other matrix shapes, so their gradients agree to rounding, not bit for bit.
# Measured on this CPU (Intel Xeon, torch 2.13, 1 and 2 threads; this test's tiny SANA, canvas + connector + DiT): the
# losses bit-equal, the gradients at most 3.0e-7 apart at a largest gradient of 0.82, i.e. 3.1 ulp of it. Allowed: 8
# ulp, of the loss and of the largest gradient.
ACCUM_ULPS = 8


def test_accumulated_micro_batches_give_the_update_of_one_batch(tiny, tmp_path):
    """Gradient accumulation: two micro-batches of 2 (global_batch 4, batch_size 2) give the gradient of one batch
    of 4 (the optimizer's input for the step), and the same loss."""
    kw = dict(max_steps=1, cond_dropout=0.5, data=[{"synthetic": {"kind": "t2i", "count": 4, "seed": 3}}])
    one = Trainer(make_config(tiny, batch_size=4, **kw), tmp_path / "one", progress=False)
    two = Trainer(make_config(tiny, batch_size=2, global_batch=4, **kw), tmp_path / "two", progress=False)
    assert (one.accum, two.accum) == ([1], [2])
    source = one.mix.sources[0]
    items = source.take(1)[0]
    assert len(items) == 4
    loss_one = one.accumulate(source, [(0, items)])
    loss_two = two.accumulate(two.mix.sources[0], [(0, items[:2]), (1, items[2:])])
    grads = [
        (a.grad, b.grad)
        for a, b in zip(one.module.parameters(), two.module.parameters(), strict=True)
        if a.grad is not None
    ]
    largest = max(float(a.abs().max()) for a, _ in grads)
    ulp = torch.finfo(torch.float32).eps
    assert largest > 0 and len(grads) == len(one.params)
    for a, b in grads:
        torch.testing.assert_close(b, a, rtol=0, atol=ACCUM_ULPS * ulp * largest)
    torch.testing.assert_close(loss_two, loss_one, rtol=ACCUM_ULPS * ulp, atol=0)


def test_every_task_kind_trains_on_wan(tiny, tmp_path):
    """One loss and backward per kind of the S3 mix; the condition channels learn from source and references."""
    kinds = ["t2i", "recon", "edit", "t2v", "i2v", "video_edit", "ref2v"]
    data = [{"synthetic": {"kind": k, "count": 1, "seed": i, "frames": 5}} for i, k in enumerate(kinds)]
    config = make_config(
        tiny,
        backbone=str(tiny["wan"]),
        trainable=["dit", "canvas", "canvas_connector", "context_connector", "condition_embedding"],
        batch_size=1,
        frames=5,
        data=data,
        init_checkpoint=None,
    )
    trainer = Trainer(config, tmp_path, progress=False)
    conv = trainer.mc.condition_embedding
    for source, kind in zip(trainer.mix.sources, kinds, strict=True):
        loss = trainer.objective(trainer.batches.make(source, [0]), 0)
        assert math.isfinite(loss.item()), kind
        conv.zero_grad()
        loss.backward()
        grad = sum(p.grad.abs().sum() for p in conv.parameters() if p.grad is not None)
        assert (float(grad) > 0) == (kind in ("edit", "video_edit", "ref2v")), kind


def test_exported_checkpoint_loads_in_the_node_and_changes_the_output(trained, pack, models_dir, tiny):
    from metacanvas_core.backbones import load_backbone
    from metacanvas_core.checkpoint import load_metacanvas

    m = pack.NODE_CLASS_MAPPINGS
    shutil.copy(trained / "test-run.safetensors", models_dir / "metacanvas" / "trained-tiny.safetensors")
    assert load_metacanvas(models_dir / "metacanvas" / "trained-tiny.safetensors").config.backbone == "sana"
    (mllm,) = run(m["MetaCanvasMLLMLoader"], mllm_folder="tiny-qwen2_5-vl", dtype="fp32")
    (backbone,) = run(m["MetaCanvasBackboneLoader"], backbone_folder="tiny-sana", dtype="fp32")
    loaded = (m, mllm, backbone)
    assert not torch.equal(chain(loaded, "trained-tiny.safetensors"), chain(loaded, "new (untrained)"))
    # The trained DiT: a pipeline folder the Backbone Loader reads, with the trained weights.
    (models_dir / "diffusers" / "trained-tiny-sana").symlink_to(trained / "backbone", target_is_directory=True)
    (trained_backbone,) = run(m["MetaCanvasBackboneLoader"], backbone_folder="trained-tiny-sana", dtype="fp32")
    assert not torch.equal(
        chain((m, mllm, trained_backbone), "trained-tiny.safetensors"), chain(loaded, "trained-tiny.safetensors")
    )
    original = load_backbone(tiny["sana"]).transformer.state_dict()
    exported = load_backbone(trained / "backbone").transformer.state_dict()
    assert original.keys() == exported.keys()
    assert any(not torch.equal(original[k], exported[k]) for k in original)


def test_cli_runs_a_recipe_on_two_processes_and_names_a_bad_record(tiny, tmp_path, capsys):
    data = json.dumps([{"synthetic": {"kind": "t2i", "count": 2, "seed": 0}}])
    # Two processes (DDP over gloo on CPU), as accelerate launch / torchrun start them on GPUs.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    cmd += ["-m", "metacanvas_core.train", "tiny_sana_t2i", "--output-dir", str(tmp_path / "cli")]
    cmd += ["--max-steps", "2", "--set", f"mllm={tiny['mllm']}", "--set", f"backbone={tiny['sana']}"]
    cmd += ["--set", f"data={data}", "--set", "eval_samples=0", "--set", "batch_size=2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "cli" / "tiny-sana-t2i.safetensors").is_file()
    assert (tmp_path / "cli" / "backbone" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert [r["step"] for r in metrics(tmp_path / "cli")] == [1, 2]  # one writer; losses averaged over processes
    written = [p for p in (tmp_path / "cli").rglob("*") if p.is_file() and not p.is_symlink()]
    assert written and {oct(p.stat().st_mode & 0o777) for p in written} == {"0o644"}
    assert done.stdout.count("\n") == 4 and "samples.png" in done.stdout  # quiet: where the results are, only

    (tmp_path / "bad.jsonl").write_text('{"kind": "t2i", "image": "nowhere.png", "prompt": "x"}\n')
    args = ["tiny_sana_t2i", "--output-dir", str(tmp_path / "bad"), "--set", f"mllm={tiny['mllm']}"]
    args += [
        "--set",
        f"backbone={tiny['sana']}",
        "--set",
        "data=" + json.dumps([{"manifest": str(tmp_path / "bad.jsonl")}]),
    ]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "record 1 (line 1), field 'image'" in err and "nowhere.png" in err
