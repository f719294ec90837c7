"""The layout experiment (issue 7): deterministic data, a judge that is right on ground truth and at chance on
shuffled images, the Table 3 connector ablations, and a very short end-to-end run of every arm."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from experiments import layout
from metacanvas_core.connectors import CanvasConnector


def test_data_is_deterministic_and_held_out():
    a, b = layout.make_data(0), layout.make_data(0)
    assert a.train == b.train and a.test == b.test and a.jitter == b.jitter
    assert layout.make_data(1).train != a.train
    train_prompts = {layout.prompt_of(s) for s in a.train}
    assert not any(layout.prompt_of(s) in train_prompts for s in a.test)
    held = set(a.held_out)
    assert not any(held.intersection(s) for s in a.train)
    assert sum(bool(held.intersection(s)) for s in a.test) == len(a.test) // 2
    assert {len(s) for s in a.train} == {1, 2, 3}
    assert layout.prompt_of([("circle", "red", 0), ("square", "blue", 4)]) == (
        "a red circle at the top left and a blue square in the center"
    )
    im = np.asarray(layout.draw(a.train[0], jitter=a.jitter[0]))
    assert np.array_equal(im, np.asarray(layout.draw(b.train[0], jitter=b.jitter[0])))


def test_judge_ground_truth_and_shuffled():
    data = layout.make_data(0)
    raw = [np.asarray(layout.draw(s, jitter=j)) for s, j in zip(data.train[:200], data.jitter, strict=False)]
    assert layout.judge_all(raw, data.train[:200])["all"] >= 0.99
    gt, shuffled = layout.judge_sanity(data)  # through the pixel autoencoder
    assert gt["object"] >= 0.99 and gt["cell"] >= 0.99 and gt["count"] >= 0.99 and gt["all"] >= 0.99
    assert shuffled["object"] < 0.15 and shuffled["cell"] < 0.4 and shuffled["all"] < 0.1
    blank = np.full((layout.SIZE, layout.SIZE, 3), 245, np.uint8)
    assert layout.judge(blank, data.test[0])["object"] == 0.0 and layout.judge(blank, data.test[0])["cell"] == 0.0


def test_judge_reads_shades_by_hue_and_placement_without_colour():
    scene = [("circle", "blue", 0), ("square", "yellow", 4)]
    image = np.asarray(layout.draw(scene)).astype(np.float32)
    dark = (image * 0.55).astype(np.uint8)  # a darker shade of every colour (and a grey background)
    assert layout.judge(dark, scene)["all"] == 1.0
    swapped = [("circle", "yellow", 0), ("square", "blue", 4)]  # right cells, colours bound the wrong way
    score = layout.judge(np.asarray(layout.draw(scene)), swapped)
    assert score["object"] == 0.0 and score["colour"] == 0.0 and score["cell"] == 1.0 and score["count"] == 1.0


def test_pixel_autoencoder_round_trip():
    x = torch.rand(2, 48, 48, 3)
    z = layout.PIXELS.encode(x)
    assert z.shape == (2, 4, 12, 12)
    assert torch.allclose(layout.PIXELS.encode(layout.PIXELS.decode(z)), z, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [{}, {"timestep_cond": False}, {"fuse": "none"}, {"fuse": "none", "inject": "latent", "latent_channels": 4}],
)
def test_connector_ablations_start_at_zero(options):
    torch.manual_seed(0)
    c = CanvasConnector(mllm_dim=8, dit_dim=16, num_heads=2, head_dim=8, **options)
    aligned = c.align(torch.randn(2, 9, 8))
    assert aligned.shape == (2, 9, options.get("latent_channels", 16))
    assert aligned.abs().max() == 0
    if options.get("inject") != "latent":
        r = c.fuse(torch.randn(2, 9, 16), torch.randn(2, 9, 16), torch.tensor([10.0, 500.0]), 3, 3)
        assert r.shape == (2, 9, 16)
    if options.get("fuse") == "none":
        assert not hasattr(c, "fuse_block")
    with pytest.raises(ValueError):
        CanvasConnector(mllm_dim=8, dit_dim=16, num_heads=2, head_dim=8, inject="latent")


def test_default_connector_config_unchanged(tiny):
    from metacanvas_core.backbones import load_backbone
    from metacanvas_core.metacanvas import new_metacanvas
    from metacanvas_core.planner import Planner

    hidden, spec = Planner.from_folder(tiny["mllm"]).hidden_size, load_backbone(tiny["sana"]).spec
    mc = new_metacanvas(hidden, spec, "mllm")
    assert set(mc.config.canvas_connector) == {"mllm_dim", "dit_dim", "num_heads", "head_dim", "attention_bias"}
    assert set(dict(mc.canvas_connector.state_dict())) >= {"time_embed.linear.weight", "out_proj.weight"}
    # An ablation arm shares the paper's canvas tokens and context connector; only its connector differs.
    arm = new_metacanvas(hidden, spec, "mllm", {"fuse": "none"})
    assert arm.config.canvas_connector["fuse"] == "none" and not hasattr(arm.canvas_connector, "fuse_block")
    for part in ("canvas", "context_connector"):
        for a, b in zip(getattr(mc, part).parameters(), getattr(arm, part).parameters(), strict=True):
            assert torch.equal(a, b), part


def test_every_arm_trains_and_evaluates(tmp_path):
    s = layout.Settings(
        steps=1,
        batch_size=2,
        sample_steps=2,
        test_prompts=2,
        grid_prompts=2,
        threads=2,
        eval_at_start=False,
        mllm_steps=2,
    )
    r = layout.run_experiment(tmp_path, seeds=1, settings=s, arms=list(layout.ARMS), workers=1, n_train=16)
    assert {x["arm"] for x in r["results"]} == set(layout.ARMS)
    for x in r["results"]:
        assert [p["step"] for p in x["curve"]] == [1]
        assert all(0 <= p["object"] <= 1 for p in x["curve"]) and np.isfinite(x["final_loss"])
        assert len(x["samples"]) == 2 and x["samples"][0].shape == (48, 48, 3)
    for name in ("layout_report.md", "layout_plot.png", "layout_samples.png", "results.json"):
        assert (tmp_path / name).is_file()
    assert "| canvas |" in (tmp_path / "layout_report.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["table"]) == set(layout.ARMS)
    assert results["mllm"]["kind"] == "language" and results["mllm"]["grounding"]["steps"] == 2
    assert "trained on the toy language" in (tmp_path / "layout_report.md").read_text()


def test_random_mllm_option(tmp_path):
    data = layout.make_data(0, n_train=16)
    models = layout.write_models(tmp_path, [0], data, mllm="random")
    assert models["mllm"].name == "mllm-random" and models["grounding"] is None
    assert (models["mllm"] / "model.safetensors").is_file() and (models["dits"][0] / "transformer").is_dir()
    with pytest.raises(ValueError, match="mllm must be one of"):
        layout.write_models(tmp_path, [0], data, mllm="pretrained")
