"""Zero-init identity, gradients, and the canvas reaching only the conditional rows."""

from __future__ import annotations

import torch

from metacanvas_core.backbones import Branch
from metacanvas_core.conditioning import project
from metacanvas_core.injection import CanvasInjection
from metacanvas_core.metacanvas import new_metacanvas
from metacanvas_core.text import TextContext


def _plan(planner, mc, prompt="a red circle at the top left"):
    return mc.plan(planner, prompt, 64, 64, negative_prompt="blurry")


def _predict(sana, cond, canvas_on: bool, rows=slice(1, 2)):
    latents = sana.initial_noise(0, 2, 64, 64)
    t = torch.tensor(700.0)
    canvas = CanvasInjection(cond.connector, cond.canvas, rows) if canvas_on else None
    return sana.predict(latents, t, Branch(TextContext.cat([cond.negative, cond.positive]), canvas))


def test_fresh_connector_is_exactly_the_plain_backbone(planner, sana):
    mc = new_metacanvas(planner.hidden_size, sana.spec, "native")
    cond = project(_plan(planner, mc), mc, sana)
    assert torch.equal(_predict(sana, cond, True), _predict(sana, cond, False))


def test_canvas_changes_only_the_conditional_rows(planner, sana):
    mc = new_metacanvas(planner.hidden_size, sana.spec, "native")
    for layer in (mc.canvas_connector.align_out, mc.canvas_connector.out_proj):
        torch.nn.init.normal_(layer.weight, std=0.3)
    cond = project(_plan(planner, mc), mc, sana)
    on, off = _predict(sana, cond, True), _predict(sana, cond, False)
    assert torch.equal(on[0], off[0])  # unconditional branch: never the canvas
    assert not torch.allclose(on[1], off[1])


def test_gradients_reach_canvas_and_connector(planner, sana):
    mc = new_metacanvas(planner.hidden_size, sana.spec, "native")
    sana.transformer.requires_grad_(False)

    def loss():
        plan = mc.plan(planner, "two dogs", 64, 64)  # grad mode on: differentiable in the canvas
        canvas = mc.align(plan)
        inj = CanvasInjection(mc.canvas_connector, canvas, slice(0, 1))
        branch = Branch(sana.encode_prompt(["two dogs"]), inj)
        v = sana.predict(sana.initial_noise(0, 1, 64, 64), torch.tensor(500.0), branch)
        return v.pow(2).mean()

    loss().backward()
    assert mc.canvas_connector.out_proj.weight.grad.abs().sum() > 0  # zero-init: only the last layer learns first
    assert mc.canvas.tokens.grad is None or mc.canvas.tokens.grad.abs().sum() == 0
    mc.zero_grad()
    with torch.no_grad():  # after a step the zero layers are nonzero and the signal flows back to the canvas
        mc.canvas_connector.out_proj.weight.normal_(std=0.1)
        mc.canvas_connector.align_out.weight.normal_(std=0.1)
    loss().backward()
    for name in (
        "canvas.tokens",
        "canvas.start",
        "canvas_connector.align_in.weight",
        "canvas_connector.fuse_block.attn1.to_q.weight",
        "canvas_connector.time_embed.linear.weight",
    ):
        grad = dict(mc.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
