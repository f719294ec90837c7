"""MetaCanvas on ComfyUI's native models, in ComfyUI's own Python (the harness's venv, which has ComfyUI's packages):
native Wan2.2-TI2V-5B (a tiny file read by ComfyUI's loader) and native FLUX (ComfyUI's Flux class at a small width),
sampled by ComfyUI's own samplers; and the planner streamed by ComfyUI's memory manager.

Run from the dev venv, this module runs itself in the harness's Python (one test that reports the others).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.comfyui import HARNESS, SKIP_REASON

ROOT = Path(__file__).resolve().parents[1]
IN_HARNESS = bool(HARNESS) and Path(sys.prefix).resolve() == (Path(HARNESS) / "venv").resolve()
pytestmark = pytest.mark.skipif(not HARNESS, reason=SKIP_REASON)

if HARNESS and not IN_HARNESS:

    def test_in_comfyuis_python():
        """This file's tests, run by the harness's Python (ComfyUI importable, CPU)."""
        python = Path(HARNESS) / "venv" / "bin" / "python"
        env = {**os.environ, "LD_LIBRARY_PATH": str(Path(HARNESS) / "cuda_stubs")}
        cmd = [str(python), "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-s"]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        print(done.stdout[-6000:])
        assert done.returncode == 0, (done.stdout + done.stderr)[-8000:]


if IN_HARNESS:
    sys.path.insert(0, str(Path(HARNESS) / "ComfyUI"))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    import torch
    from safetensors.torch import save_file
    from support.graph import run

    from metacanvas_core.backbones import Branch
    from metacanvas_core.backbones.wan import WanBackbone
    from metacanvas_core.comfy_files import wan_original_state
    from metacanvas_core.injection import CanvasInjection
    from metacanvas_core.text import TextContext
    from metacanvas_core.tiny import tiny_native_wan, tiny_wan_vae

    PROMPT = "a red ball rolls from the left to the right"

    def trained(mc, seed=0):
        """Nonzero canvas projections (a stand-in for a trained connector)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in (mc.canvas_connector.align_out, mc.canvas_connector.out_proj):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.2)
        return mc

    def loaded(pack, mc):
        from metacanvas_pack.nodes.runtime import Loaded

        return Loaded(mc, {"metacanvas": mc})

    # --- native models ------------------------------------------------------------------------------------------
    @pytest.fixture(scope="module")
    def wan(tmp_path_factory):
        """Native Wan2.2-TI2V-5B from a tiny file in ComfyUI's layout, read by ComfyUI's own loader (its detection
        makes it a WAN22 model), and the same weights as a diffusers transformer (the pack's side)."""
        diffusers_wan = tiny_native_wan(seed=3)
        path = tmp_path_factory.mktemp("native") / "tiny-wan2.2_ti2v_5B.safetensors"
        save_file({k: v.contiguous() for k, v in wan_original_state(diffusers_wan.state_dict()).items()}, str(path))
        model = comfy.sd.load_diffusion_model(str(path))
        assert type(model.model).__name__ == "WAN22"
        return model, diffusers_wan

    def native_flux(guidance: bool = True, seed: int = 4):
        """ComfyUI's Flux, configured by its own detection from the weights (one head of 128, one block of each kind),
        weights from a seeded diffusers FluxTransformer2DModel through ComfyUI's own diffusers->BFL key map."""
        from diffusers import FluxTransformer2DModel

        from experiments.native_step import comfy_model_config, flux_from_diffusers

        torch.manual_seed(seed)
        d = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=128,
            num_attention_heads=1,
            joint_attention_dim=4096,
            pooled_projection_dim=32,
            guidance_embeds=guidance,
            axes_dims_rope=(16, 56, 56),
        )
        state = flux_from_diffusers(d)
        model_config = comfy_model_config(state)
        model_config.set_inference_dtype(torch.float32, None)
        base = model_config.get_model({})
        missing, unexpected = base.diffusion_model.load_state_dict(state, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        cpu = torch.device("cpu")
        return comfy.model_patcher.ModelPatcher(base, cpu, cpu)

    @pytest.fixture(scope="module")
    def flux():
        return native_flux()

    # --- graphs ---------------------------------------------------------------------------------------------------
    def plan_for(pack, mllm, mc, height, width, images=None, role="references"):
        nodes = pack.NODE_CLASS_MAPPINGS
        (plan,) = run(
            nodes["MetaCanvasPlan"],
            mllm=mllm,
            metacanvas=mc,
            prompt=PROMPT,
            negative_prompt="blurry",
            width=width,
            height=height,
            images=images,
            image_role=role,
        )
        return plan

    def conditioning(pack, plan, mc, strength=1.0, mask=None):
        nodes = pack.NODE_CLASS_MAPPINGS
        positive, negative = run(nodes["MetaCanvasTextConditioning"], plan=plan, metacanvas=mc)
        kw = {} if mask is None else {"canvas_mask": mask}
        (with_canvas,) = run(
            nodes["MetaCanvasAttachCanvas"],
            conditioning=positive,
            plan=plan,
            metacanvas=mc,
            canvas_strength=strength,
            **kw,
        )
        return positive, with_canvas, negative

    def ksample(model, positive, negative, latent, steps=2, cfg=3.0, noise_mask=None, extra=None):
        if extra is not None:
            positive = [[t, {**d, **extra}] for t, d in positive]
            negative = [[t, {**d, **extra}] for t, d in negative]
        noise = comfy.sample.prepare_noise(latent, 7)
        return comfy.sample.sample(
            model, noise, steps, cfg, "euler", "simple", positive, negative, latent, noise_mask=noise_mask, seed=7
        )

    @pytest.fixture(scope="module", autouse=True)
    def model_folders(models_dir, pack):
        """ComfyUI's folder_paths (importable here) reading the tiny models, as extra_model_paths.yaml would."""
        import folder_paths
        from metacanvas_pack.nodes.runtime import models_dirs

        for kind in ("text_encoders", "LLM", "diffusers", "metacanvas"):
            models_dirs(kind)  # the pack's own kinds registered first
            folder_paths.add_model_folder_path(kind, str(models_dir / kind))

    @pytest.fixture(scope="module")
    def mllm(pack):
        (mllm,) = run(
            pack.NODE_CLASS_MAPPINGS["MetaCanvasMLLMLoader"], mllm_folder="tiny-qwen2_5-vl.safetensors", dtype="fp32"
        )
        return mllm

    def metacanvas(pack, mllm, model, checkpoint_trained: bool):
        (mc,) = run(
            pack.NODE_CLASS_MAPPINGS["MetaCanvasConnectorLoader"],
            mllm=mllm,
            checkpoint="new (untrained)",
            context="mllm",
            model=model,
        )
        if checkpoint_trained:
            trained(mc.model)
        return mc

    def apply(pack, model, mc):
        (patched,) = run(pack.NODE_CLASS_MAPPINGS["MetaCanvasApply"], model=model, metacanvas=mc)
        return patched

    def aligned_plan(pack, mllm, model):
        """A trained (random) checkpoint for `model`, its 64×64 plan, and the plan's aligned canvas."""
        mc = metacanvas(pack, mllm, model, True)
        plan = plan_for(pack, mllm, mc, 64, 64)
        with torch.no_grad():
            aligned = mc.model.align(plan)
        return mc, plan, aligned

    WAN_LATENT = torch.zeros(1, 48, 3, 4, 4)  # 9 frames of 64×64: the canvas grid is 3 keyframes × 1×1
    FLUX_LATENT = torch.zeros(1, 16, 8, 8)  # 64×64

    def kontext(conditioning_, reference):
        return [[t, {**d, "reference_latents": [reference]}] for t, d in conditioning_]

    # --- the tests --------------------------------------------------------------------------------------------------
    def test_untrained_canvas_leaves_native_wan_exact(pack, mllm, wan):
        model, _ = wan
        mc = metacanvas(pack, mllm, model, False)
        positive, with_canvas, negative = conditioning(pack, plan_for(pack, mllm, mc, 64, 64), mc)
        plain = ksample(model, positive, negative, WAN_LATENT)
        patched = ksample(apply(pack, model, mc), with_canvas, negative, WAN_LATENT)
        assert torch.equal(plain, patched)
        assert plain.std() > 0

    def test_untrained_canvas_leaves_native_flux_kontext_exact(pack, mllm, flux):
        mc = metacanvas(pack, mllm, flux, False)
        positive, with_canvas, negative = conditioning(
            pack, plan_for(pack, mllm, mc, 64, 64, torch.rand(1, 64, 64, 3)), mc
        )
        reference = torch.randn(1, 16, 8, 8)
        plain = ksample(flux, kontext(positive, reference), kontext(negative, reference), FLUX_LATENT)
        patched = ksample(
            apply(pack, flux, mc), kontext(with_canvas, reference), kontext(negative, reference), FLUX_LATENT
        )
        assert torch.equal(plain, patched)

    def _first_block_inputs(block, fn):
        seen = []

        def hook(_module, args, kwargs):  # the image stream entering the block (Wan: x; FLUX: img)
            seen.append((args[0] if args else kwargs.get("x", kwargs.get("img"))).clone())

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            fn()
        finally:
            handle.remove()
        return seen

    def changed_row(plain: list, canvas: list):
        """The one batch row (of all model calls, in order) the canvas changed, before and after."""
        assert [x.shape for x in plain] == [x.shape for x in canvas]
        rows = [(a[r], b[r]) for a, b in zip(plain, canvas, strict=True) for r in range(a.shape[0])]
        changed = [(a, b) for a, b in rows if not torch.equal(a, b)]
        assert len(changed) == 1, f"{len(changed)} of {len(rows)} rows changed"
        return changed[0]

    def test_a_trained_canvas_lands_only_on_positive_noisy_tokens_of_wan(pack, mllm, wan):
        """Image-to-video (frame 0 given, timestep 0): with the canvas, the batched positive rows change on frames 1..,
        frame 0's tokens and every negative row stay bit for bit; the sample differs."""
        model, _ = wan
        mc = metacanvas(pack, mllm, model, True)
        plan = plan_for(pack, mllm, mc, 64, 64, torch.rand(1, 64, 64, 3), role="first frame")
        positive, with_canvas, negative = conditioning(pack, plan, mc)
        mask = torch.ones(1, 1, 3, 4, 4)
        mask[:, :, 0] = 0  # Wan22ImageToVideoLatent's noise mask: frame 0 is the given image
        latent = torch.randn(1, 48, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * mask.logical_not()
        blocks = model.model.diffusion_model.blocks[0]
        plain = _first_block_inputs(
            blocks, lambda: ksample(model, positive, negative, latent, steps=1, noise_mask=mask)
        )
        patched_model = apply(pack, model, mc)
        on = _first_block_inputs(
            patched_model.model.diffusion_model.blocks[0],
            lambda: ksample(patched_model, with_canvas, negative, latent, steps=1, noise_mask=mask),
        )
        a, b = changed_row(plain, on)  # the positive row: every negative row (batched or not) stays bit for bit
        per_frame = 2 * 2
        assert torch.equal(a[:per_frame], b[:per_frame])  # the given first frame untouched
        assert not torch.allclose(a[per_frame:], b[per_frame:])
        assert not torch.equal(
            ksample(model, positive, negative, latent, noise_mask=mask),
            ksample(patched_model, with_canvas, negative, latent, noise_mask=mask),
        )

    def test_a_trained_canvas_never_touches_kontext_reference_tokens(pack, mllm, flux):
        mc = metacanvas(pack, mllm, flux, True)
        positive, with_canvas, negative = conditioning(
            pack, plan_for(pack, mllm, mc, 64, 64, torch.rand(1, 64, 64, 3)), mc
        )
        reference = torch.randn(1, 16, 8, 8)
        block = flux.model.diffusion_model.double_blocks[0]
        patched = apply(pack, flux, mc)
        seen = {}
        for name, model, pos in (("plain", flux, positive), ("canvas", patched, with_canvas)):
            seen[name] = _first_block_inputs(
                model.model.diffusion_model.double_blocks[0] if name == "canvas" else block,
                lambda m=model, p=pos: ksample(
                    m, kontext(p, reference), kontext(negative, reference), FLUX_LATENT, steps=1
                ),
            )
        a, b = changed_row(seen["plain"], seen["canvas"])
        n_target = 4 * 4
        assert a.shape[0] == 2 * n_target  # target tokens, then the reference's
        assert not torch.allclose(a[:n_target], b[:n_target]) and torch.equal(a[n_target:], b[n_target:])

    def test_the_residual_equals_the_pack_paths(pack, mllm, wan, tiny):
        """The same plan, latents and timestep: the residual native Wan gets inside ComfyUI equals the one the pack's
        WanBackbone adds to the same weights (diffusers). Both run `add_to_patch_embedding` on patch embeddings of the
        same fp32 Conv3d weights; measured bit-equal here, asserted to 1e-6 (the convolutions are different calls)."""
        model, diffusers_wan = wan
        mc, plan, aligned = aligned_plan(pack, mllm, model)
        mcm = mc.model
        with torch.no_grad():
            x = torch.randn(1, 48, 3, 4, 4, generator=torch.Generator().manual_seed(1))
            sigma = torch.tensor([0.7])
            context = torch.randn(1, 5, 4096, generator=torch.Generator().manual_seed(2))
            # The pack's side: WanBackbone.predict on the diffusers transformer.
            backbone = WanBackbone("tiny", diffusers_wan, tiny_wan_vae(48), {})
            canvas = CanvasInjection.on_tokens(mcm.canvas_connector, aligned, (3, 2, 2), slice(0, 1))
            text = TextContext(context, torch.ones(1, 5, dtype=torch.long))
            block = diffusers_wan.blocks[0]
            pack_on = _first_block_inputs(block, lambda: backbone.predict(x, sigma * 1000, Branch(text, canvas)))
            pack_off = _first_block_inputs(block, lambda: backbone.predict(x, sigma * 1000, Branch(text)))
            # ComfyUI's side: the native model through the patch's wrapper, as a sampler calls it.
            from metacanvas_pack.nodes.model_patch import RUN_KEY, CanvasRun, MetaCanvasPatch, NativeCanvas, native_spec

            patch = MetaCanvasPatch(mcm, native_spec(model))
            uuid = object()
            run_ = CanvasRun({uuid: NativeCanvas(aligned, mcm.name, mcm.identity, (64, 64))}, frames=3)
            dm = model.model.diffusion_model

            def native(with_run):
                options = {"uuids": [uuid], "sigmas": sigma, "wrappers": {}}
                if with_run:
                    options[RUN_KEY] = run_
                executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
                    dm._forward, dm, [patch.diffusion_model]
                )
                with patch.hooked(run_, dm):
                    return executor.execute(x, sigma * 1000, context, None, None, options)

            native_on = _first_block_inputs(dm.blocks[0], lambda: native(True))
            native_off = _first_block_inputs(dm.blocks[0], lambda: native(False))
        assert torch.equal(pack_off[0], native_off[0])  # the same patch embeddings on both sides
        pack_residual, native_residual = pack_on[0] - pack_off[0], native_on[0] - native_off[0]
        assert pack_residual.abs().max() > 0
        torch.testing.assert_close(native_residual, pack_residual, rtol=0, atol=1e-6)
        print(f"residual: max |pack - native| = {(pack_residual - native_residual).abs().max().item():.3g}")

    def test_strength_zero_and_a_zero_mask_are_no_canvas(pack, mllm, wan):
        model, _ = wan
        mc = metacanvas(pack, mllm, model, True)
        plan = plan_for(pack, mllm, mc, 64, 64)
        positive, _, negative = conditioning(pack, plan, mc)
        plain = ksample(model, positive, negative, WAN_LATENT)
        patched = apply(pack, model, mc)
        for kw in ({"strength": 0.0}, {"mask": torch.zeros(1, 64, 64)}):
            _, with_canvas, _ = conditioning(pack, plan, mc, **kw)
            assert torch.equal(ksample(patched, with_canvas, negative, WAN_LATENT), plain), kw
        half = torch.zeros(1, 64, 64)
        half[:, :, :32] = 1
        _, masked, _ = conditioning(pack, plan, mc, mask=half)
        assert not torch.equal(ksample(patched, masked, negative, WAN_LATENT), plain)

    def test_lora_and_fp8_models_take_the_patch(pack, mllm, wan, tmp_path):
        """A LoRA-style weight patch (as core LoRA loaders add) and fp8 weights (weight_dtype): the patched model still
        samples, the canvas still changes the result, and the weights keep their names."""
        model, diffusers_wan = wan
        mc = metacanvas(pack, mllm, model, True)
        positive, with_canvas, negative = conditioning(pack, plan_for(pack, mllm, mc, 64, 64), mc)
        lora = model.clone()
        key = "diffusion_model.blocks.0.self_attn.q.weight"
        lora.add_patches({key: (torch.randn(128, 128) * 0.05,)}, 1.0)
        for variant in (lora,):
            plain = ksample(variant, positive, negative, WAN_LATENT)
            patched = apply(pack, variant, mc)
            assert key in patched.model.state_dict() or key in dict(patched.model.named_parameters())
            assert not torch.equal(ksample(patched, with_canvas, negative, WAN_LATENT), plain)
        path = tmp_path / "wan_fp8.safetensors"
        save_file({k: v.contiguous() for k, v in wan_original_state(diffusers_wan.state_dict()).items()}, str(path))
        fp8 = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float8_e4m3fn})
        assert fp8.model.diffusion_model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
        plain = ksample(fp8, positive, negative, WAN_LATENT)
        assert not torch.equal(ksample(apply(pack, fp8, mc), with_canvas, negative, WAN_LATENT), plain)

    def test_apply_refuses_models_it_cannot_patch(pack, mllm, wan):
        from metacanvas_core.errors import MetaCanvasInputError

        schnell = native_flux(guidance=False)
        model, _ = wan
        mc = metacanvas(pack, mllm, model, False)
        with pytest.raises(MetaCanvasInputError, match=r"this MODEL is Flux \(FluxSchnell\)"):
            apply(pack, schnell, mc)
        flux_mc = metacanvas(pack, mllm, native_flux(), False)
        with pytest.raises(MetaCanvasInputError, match="made for a flux_kontext backbone.*is wan"):
            apply(pack, model, flux_mc)
        with pytest.raises(MetaCanvasInputError, match="already on this model"):
            apply(pack, apply(pack, model, mc), mc)

    def test_flux_canvas_needs_a_reference_image(pack, mllm, flux):
        from metacanvas_core.errors import MetaCanvasInputError

        mc = metacanvas(pack, mllm, flux, True)
        _, with_canvas, negative = conditioning(pack, plan_for(pack, mllm, mc, 64, 64, torch.rand(1, 64, 64, 3)), mc)
        with pytest.raises(
            MetaCanvasInputError, match="no reference image: give it the image to edit with the core ReferenceLatent"
        ):
            ksample(apply(pack, flux, mc), with_canvas, negative, FLUX_LATENT, steps=1)

    def test_the_planner_streams_under_a_tenth_of_its_weights(pack, mllm, wan):
        """ComfyUI's partial loading with a budget of a tenth of the weights: most layers cast their weights at each
        call (the lowvram path), and the plan equals the fully loaded one exactly."""
        mc = metacanvas(pack, mllm, wan[0], True)
        full = plan_for(pack, mllm, mc, 64, 64)
        patcher = mllm.parts("mllm")[0].patcher
        comfy.model_management.unload_all_models()
        budget = patcher.model_size() // 10
        patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=budget)
        try:
            cast = [
                m for m in patcher.model.modules() if getattr(m, "comfy_cast_weights", False) and not any(m.children())
            ]
            assert patcher.model.model_lowvram and len(cast) > 10, len(cast)
            with torch.no_grad():
                streamed = mc.model.plan(mllm.model, PROMPT, 64, 64, negative_prompt="blurry")
        finally:
            patcher.unpatch_model(torch.device("cpu"))
        assert torch.equal(streamed.canvas, full.canvas) and torch.equal(streamed.context, full.context)
        print(f"streamed planner: {len(cast)} layers cast per call under a budget of {budget / 2**20:.2f} MiB")

    def test_the_native_benchmark_measures_both_models():
        """The benchmark's [4] (experiments/native_step.py) runs ComfyUI's sampler with and without MetaCanvas Apply on
        native Wan2.2 and FLUX and prints a ratio per model (figures belong to the benchmark, not to this test)."""
        cmd = [sys.executable, "-m", "experiments.native_step", "--comfyui", str(Path(HARNESS) / "ComfyUI")]
        done = subprocess.run(
            [*cmd, "--steps", "1", "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, done.stderr[-4000:]
        lines = [line for line in done.stdout.splitlines() if "ms/step with" in line]
        assert [line.split()[0] for line in lines] == ["wan", "flux"], done.stdout
        assert all(re.search(r"= \d+\.\d{3}× \(median of 1; min \d+\.\d{3}×\)$", line) for line in lines), done.stdout

    def test_the_interfaces_the_pack_relies_on_are_checked(pack, mllm, wan, monkeypatch, caplog):
        """Every interface of compat.INTERFACES is there on this release; with one taken away, the pack logs one line
        naming the release and the missing name, and its nodes refuse with that line when they run."""
        compat = sys.modules["metacanvas_pack.nodes.compat"]
        assert compat.missing_interfaces() == []
        assert compat.checked(pack.NODE_CLASS_MAPPINGS) is pack.NODE_CLASS_MAPPINGS
        monkeypatch.delattr(comfy.patcher_extension.WrappersMP, "OUTER_SAMPLE")
        with caplog.at_level("WARNING"):
            refusing = compat.checked(pack.NODE_CLASS_MAPPINGS)
        version = compat.comfyui_version()
        line = f"cannot run on ComfyUI {version}: it lacks comfy.patcher_extension.WrappersMP.OUTER_SAMPLE"
        assert [r.getMessage() for r in caplog.records if line in r.getMessage()], caplog.text
        apply = refusing["MetaCanvasApply"]
        assert apply.INPUT_TYPES() == pack.NODE_CLASS_MAPPINGS["MetaCanvasApply"].INPUT_TYPES()
        from metacanvas_core.errors import MetaCanvasInputError

        mc = metacanvas(pack, mllm, wan[0], False)
        with pytest.raises(MetaCanvasInputError, match=line.replace(".", r"\.")):
            run(apply, model=wan[0], metacanvas=mc)

    def test_untrained_on_a_native_model_takes_the_models_own_text(pack, mllm, wan):
        """'new (untrained)' with context 'auto' on a native MODEL (the templates' default): native context; Text
        Conditioning asks for its CLIP inputs (lazily) and passes them through, and Attach Canvas + Apply then sample
        exactly what the plain model samples with that conditioning: the template is the plain native graph. A
        checkpoint with MLLM context never asks for them."""
        from metacanvas_core.errors import MetaCanvasInputError

        model, _ = wan
        nodes = pack.NODE_CLASS_MAPPINGS
        (mc,) = run(
            nodes["MetaCanvasConnectorLoader"], mllm=mllm, checkpoint="new (untrained)", context="auto", model=model
        )
        assert mc.model.config.context_source == "native"
        plan = plan_for(pack, mllm, mc, 64, 64)
        text = nodes["MetaCanvasTextConditioning"]()
        unevaluated = {"clip_positive": None, "clip_negative": None}
        assert text.check_lazy_status(plan, mc, **unevaluated) == ["clip_positive", "clip_negative"]
        mllm_mc = metacanvas(pack, mllm, model, False)
        assert text.check_lazy_status(plan_for(pack, mllm, mllm_mc, 64, 64), mllm_mc, **unevaluated) == []
        g = torch.Generator().manual_seed(8)
        clip_positive, clip_negative = ([[torch.randn(1, 7, 4096, generator=g), {}]] for _ in range(2))
        positive, negative = text.encode(plan, mc, clip_positive, clip_negative)
        assert positive is clip_positive and negative is clip_negative
        (with_canvas,) = run(
            nodes["MetaCanvasAttachCanvas"], conditioning=positive, plan=plan, metacanvas=mc, canvas_strength=1.0
        )
        patched = ksample(apply(pack, model, mc), with_canvas, negative, WAN_LATENT)
        assert torch.equal(patched, ksample(model, clip_positive, clip_negative, WAN_LATENT))
        with pytest.raises(MetaCanvasInputError, match="connect core CLIP Text Encode"):
            text.encode(plan, mc)

    # --- issue 22: context windows, compile, sizes, identity, calling conventions -----------------------------------
    def context_windows(model, length=17, overlap=8, schedule="standard_static"):
        """Core WanContextWindowsManual on `model` (pixel frames 17 / overlap 8 = latent windows of 5, overlap 2 on
        both releases: on 9 latent frames [0-4], [3-7], [4-8])."""
        import inspect

        from comfy_extras.nodes_context_windows import WanContextWindowsManualNode

        node = WanContextWindowsManualNode
        kw = {"freenoise": False} if "freenoise" in inspect.signature(node.execute).parameters else {}
        out = node.execute(
            model=model,
            context_length=length,
            context_overlap=overlap,
            context_schedule=schedule,
            context_stride=1,
            closed_loop=False,
            fuse_method="pyramid",
            **kw,
        )
        return out.args[0]

    def test_context_windows_cut_the_canvas_mask_to_each_window(pack, mllm, wan):
        """A sampled graph with core WanContextWindowsManual (windows [0-4], [3-7], [4-8] of 9 latent frames) and a
        canvas mask on latent frames 0-1: the masked-off windows [3-7] and [4-8] (with 0.33's causal anchor frames
        2 and 3, also masked off) give what the plain windowed graph gives exactly, so frames 5-8, which only they
        make, are bit for bit the plain ones; frames 0-1 change."""
        model, _ = wan
        mc = metacanvas(pack, mllm, model, True)
        plan = plan_for(pack, mllm, mc, 64, 64)
        mask = torch.zeros(33, 64, 64)
        mask[:5] = 1  # pixel frames 0-4: latent frames 0 and 1
        positive, with_canvas, negative = conditioning(pack, plan, mc, mask=mask)
        latent = torch.zeros(1, 48, 9, 4, 4)
        plain = ksample(context_windows(model), positive, negative, latent, steps=1)
        canvas = ksample(context_windows(apply(pack, model, mc)), with_canvas, negative, latent, steps=1)
        assert torch.equal(canvas[:, :, 5:], plain[:, :, 5:])
        assert (canvas[:, :, :2] - plain[:, :, :2]).abs().amax() > 1e-3
        print(f"context windows: frames 5-8 max |diff| {(canvas[:, :, 5:] - plain[:, :, 5:]).abs().max().item():.3g}")

    def _window(indices, total):
        """ComfyUI's own context window object over `indices` of `total` latent frames (as either release builds it)."""
        import inspect

        import comfy.context_windows

        cls = comfy.context_windows.IndexListContextWindow
        kw = {"total_frames": total} if "total_frames" in inspect.signature(cls.__init__).parameters else {}
        return cls(list(indices), dim=2, **kw)

    def _patch_call(patch, dm, run_, x, sigma, context, window=None):
        """One model call of a sampling run, through the patch's DIFFUSION_MODEL wrapper and hook, as a sampler (and
        a context handler, with `window`) makes it: the first block's input rows."""
        options = {"uuids": [0], "sigmas": sigma, "wrappers": {}, RUN_KEY_: run_}  # the run's canvases keyed 0
        if window is not None:
            options["context_window"] = window
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(dm._forward, dm, [patch.diffusion_model])

        def call():
            with patch.hooked(run_, dm):
                executor.execute(x, sigma * 1000, context, None, None, options)

        return _first_block_inputs(dm.blocks[0], call)[0]

    RUN_KEY_ = "metacanvas_run"

    def test_a_window_sees_its_own_frames_of_canvas_and_source(pack, mllm, wan):
        """The patch under a context window: the residual and the condition embedding of a window's call are those
        of the whole video's call at the window's frames (canvas, mask and source video cut, never stretched), for
        a standard, a looped and a full window; reference frames stay before the window's frames."""
        from metacanvas_pack.nodes.model_patch import CanvasRun, MetaCanvasPatch, NativeCanvas, native_spec

        model, _ = wan
        mc, plan, aligned = aligned_plan(pack, mllm, model)
        mcm = mc.model
        with torch.no_grad():
            for p in mcm.condition_embedding.parameters():  # nonzero, as trained
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
            g = torch.Generator().manual_seed(3)
            x = torch.randn(1, 48, 9, 4, 4, generator=g)
            source, reference = torch.randn(1, 48, 9, 4, 4, generator=g), torch.randn(1, 48, 1, 4, 4, generator=g)
            sigma, context = torch.tensor([0.6]), torch.randn(1, 5, 4096, generator=g)
            patch, dm = MetaCanvasPatch(mcm, native_spec(model)), model.model.diffusion_model
            mask = torch.rand(33, 64, 64, generator=g)

            def run_of(with_canvas=True, **wan_inputs):
                canvases = (
                    {0: NativeCanvas(aligned, mcm.name, mcm.identity, (64, 64), 1.0, mask)} if with_canvas else {}
                )
                return CanvasRun(canvases, 9, **wan_inputs)

            for inputs in ({}, {"source": source, "reference": reference}):
                n_ref = 1 if inputs else 0
                full = _patch_call(patch, dm, run_of(**inputs), x, sigma, context)
                plain = _patch_call(patch, dm, run_of(False, **inputs), x, sigma, context)
                full_all = _patch_call(patch, dm, run_of(**inputs), x, sigma, context, _window(range(9), 9))
                assert torch.equal(full_all, full)  # a window over every frame is no window
                per_frame = 4  # 2×2 tokens
                rows = full.reshape(1, n_ref + 9, per_frame, -1)
                plain_rows = plain.reshape(1, n_ref + 9, per_frame, -1)
                for indices in ([3, 4, 5, 6, 7], [7, 8, 0, 1, 2]):  # standard, looped
                    window = _window(indices, 9)
                    got = _patch_call(patch, dm, run_of(**inputs), x[:, :, indices], sigma, context, window)
                    got = got.reshape(1, n_ref + 5, per_frame, -1)
                    want = rows[:, [*range(n_ref), *(n_ref + i for i in indices)]]
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
                    plain_w = _patch_call(patch, dm, run_of(False, **inputs), x[:, :, indices], sigma, context, window)
                    want_plain = plain_rows[:, [*range(n_ref), *(n_ref + i for i in indices)]]
                    torch.testing.assert_close(plain_w.reshape(got.shape), want_plain, rtol=0, atol=1e-5)
                assert (rows - plain_rows).abs().amax() > 1e-3

    def test_a_window_the_patch_does_not_know_is_refused(pack, mllm, wan):
        """A window whose frames are not the call's (guide frames), or per-token timesteps: refused naming the
        ComfyUI version, instead of a canvas silently misplaced."""
        from metacanvas_pack.nodes.compat import comfyui_version
        from metacanvas_pack.nodes.model_patch import CanvasRun, MetaCanvasPatch, NativeCanvas, native_spec

        from metacanvas_core.errors import MetaCanvasInputError

        model, _ = wan
        mc, _, aligned = aligned_plan(pack, mllm, model)
        mcm = mc.model
        patch, dm = MetaCanvasPatch(mcm, native_spec(model)), model.model.diffusion_model
        run_ = CanvasRun({0: NativeCanvas(aligned, mcm.name, mcm.identity, (64, 64))}, 9)
        x, sigma, context = torch.randn(1, 48, 6, 4, 4), torch.tensor([0.5]), torch.randn(1, 5, 4096)
        with pytest.raises(MetaCanvasInputError, match=f"ComfyUI {comfyui_version()} calls Wan2.2 on 6 latent frames"):
            _patch_call(patch, dm, run_, x, sigma, context, _window([3, 4, 5, 6, 7], 9))
        options = {"uuids": [0], "sigmas": sigma, "wrappers": {}, RUN_KEY_: run_}
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(dm._forward, dm, [patch.diffusion_model])
        per_token = torch.full((1, 6 * 4), 500.0)
        with pytest.raises(MetaCanvasInputError, match=r"timesteps of shape \(1, 24\)"):
            executor.execute(x, per_token, context, None, None, options)

    def test_a_plan_of_another_size_is_refused(pack, mllm, wan):
        """A plan made at 64×64 on a 128×64 latent would be stretched: refused naming both sizes and the node."""
        from metacanvas_core.errors import MetaCanvasInputError

        model, _ = wan
        mc = metacanvas(pack, mllm, model, True)
        positive, with_canvas, negative = conditioning(pack, plan_for(pack, mllm, mc, 64, 64), mc)
        with pytest.raises(
            MetaCanvasInputError, match=r"made for 64×64 .* latent is 128×64 \(Wan22ImageToVideoLatent\)"
        ):
            ksample(apply(pack, model, mc), with_canvas, negative, torch.zeros(1, 48, 3, 4, 8), steps=1)

    def test_canvas_and_patch_belong_together_by_content(pack, mllm, wan, tmp_path):
        """Two different checkpoint files of one name (two model folders, or a file replaced under its name): a
        canvas made with one is refused on a model patched with the other; the same content under two names is
        one checkpoint."""
        import shutil

        from metacanvas_pack.nodes.runtime import Loaded

        from metacanvas_core.checkpoint import load_metacanvas, save_metacanvas
        from metacanvas_core.errors import MetaCanvasInputError

        model, _ = wan
        first, second = (tmp_path / d for d in ("a", "b"))
        first.mkdir(), second.mkdir()
        for folder, seed in ((first, 0), (second, 1)):
            save_metacanvas(trained(metacanvas(pack, mllm, model, False).model, seed), folder / "mc.safetensors")
        shutil.copy(first / "mc.safetensors", tmp_path / "copy.safetensors")

        def loaded_from(path):
            mcm = load_metacanvas(path)
            return Loaded(mcm, {"metacanvas": mcm})

        a, b, copy = (
            loaded_from(p) for p in (first / "mc.safetensors", second / "mc.safetensors", tmp_path / "copy.safetensors")
        )
        assert a.model.name == b.model.name and a.model.identity != b.model.identity
        assert copy.model.identity == a.model.identity
        positive, with_canvas, negative = conditioning(pack, plan_for(pack, mllm, a, 64, 64), a)
        with pytest.raises(MetaCanvasInputError, match=r"made with MetaCanvas checkpoint 'mc.safetensors' \(sha256:"):
            ksample(apply(pack, model, b), with_canvas, negative, WAN_LATENT, steps=1)
        ksample(apply(pack, model, copy), with_canvas, negative, WAN_LATENT, steps=1)

    def test_no_graph_break_from_the_patch_under_torch_compile(pack, mllm, wan):
        """Under torch.compile the patch's model-call code (wrapper, hook, canvas, window cut, Wan conditions, the
        I2V frame mask) breaks no graph: torch's own explanation (`torch._dynamo.explain`) of a native Wan call with
        the patch has no break of the pack's code. The breaks it lists are ComfyUI's own, which the plain model has
        as well (on CPU its attention asks psutil for free memory); such a break below the wrapper's call of the
        model also shows at that call site as 'step_unsupported'. Core TorchCompileModel's wrapper (backend eager)
        then samples the patched model to the eager result."""
        import torch._dynamo
        from comfy_api.torch_helpers import set_torch_compile_wrapper
        from metacanvas_pack.nodes.model_patch import CanvasRun, MetaCanvasPatch, NativeCanvas, native_spec

        model, _ = wan
        mc, plan, aligned = aligned_plan(pack, mllm, model)
        mcm = mc.model
        patch, dm = MetaCanvasPatch(mcm, native_spec(model)), model.model.diffusion_model
        g = torch.Generator().manual_seed(0)
        x, context = torch.randn(2, 48, 5, 4, 4, generator=g), torch.randn(2, 5, 4096, generator=g)
        timestep = torch.full((2, 5), 600.0)
        timestep[:, 0] = 0  # image-to-video: frame 0 given
        mask = torch.rand(9, 64, 64, generator=g)
        canvas = NativeCanvas(aligned, mcm.name, mcm.identity, (64, 64), 0.7, mask)
        wan_inputs = {"source": torch.randn(1, 48, 9, 4, 4, generator=g), "reference": torch.randn(1, 48, 1, 4, 4)}
        pack_files = ("/nodes/", "/metacanvas_core/")
        reasons = {}
        for name in ("plain", "patched"):
            run_ = CanvasRun({0: canvas}, 9, **wan_inputs)
            wrappers = {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"metacanvas": [patch.diffusion_model]}}
            options = {"uuids": [0, 1], "sigmas": torch.tensor([0.6]), "context_window": _window([2, 3, 4, 5, 6], 9)}
            if name == "patched":
                options |= {"wrappers": wrappers, RUN_KEY_: run_}
            torch._dynamo.reset()
            with torch.no_grad(), patch.hooked(run_, dm):
                explained = torch._dynamo.explain(dm)(x, timestep, context, transformer_options=options)
            where = [b.user_stack[-1] for b in explained.break_reasons if b.user_stack]
            reasons[name] = sorted({f"{f.filename.split('/')[-1]}:{f.lineno}" for f in where})
            print(
                f"torch._dynamo.explain {name}: {explained.graph_count} graphs, {explained.graph_break_count} breaks at {reasons[name]}"
            )
            own = [
                (b.user_stack[-1], str(b.reason))
                for b in explained.break_reasons
                if b.user_stack
                and any(p in b.user_stack[-1].filename for p in pack_files)
                and str(b.reason) != "step_unsupported"  # a break below (ComfyUI's) passing through the call site
            ]
            assert not own, own
        torch._dynamo.reset()
        positive, with_canvas, negative = conditioning(pack, plan, mc)
        compiled = apply(pack, model, mc).clone()
        set_torch_compile_wrapper(compiled, backend="eager")
        eager = ksample(apply(pack, model, mc), with_canvas, negative, WAN_LATENT, steps=2)
        torch.testing.assert_close(ksample(compiled, with_canvas, negative, WAN_LATENT, steps=2), eager)

    # --- the trained DiT as ComfyUI's own single file ---------------------------------------------------------------
    def test_a_trained_dit_exported_by_training_loads_in_comfyuis_core_loader(tmp_path):
        """Training's export of a trained Wan2.2 / FLUX.1-Kontext DiT writes a single file ComfyUI's own loader
        (`comfy.sd.load_diffusion_model`, what core Load Diffusion Model calls) reads as the right model with the
        trained weights. Wan2.2 at ComfyUI's narrowest width (all DiT trained, as wan_s3): a WAN22 model whose
        every weight equals the trained one under its original name. FLUX.1-Kontext at the width ComfyUI 0.3.64
        fixes (3072, 24 heads; one double block; its image stream trained, as flux_kontext_edit): detected as Flux
        with guidance from the diffusers layout, and ComfyUI's forward equals diffusers' on the same inputs, far from
        diffusers' forward of the untrained weights. Their RoPE and attention code differ: measured (CPU, fp32)
        7.1e-7 (ComfyUI 0.3.64) and 8.7e-7 (0.33.0) of the output's largest value apart; the training moved it by
        1.5 of it; allowed 1e-5."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import FluxKontextPipeline

        from metacanvas_core import realconfigs
        from metacanvas_core.training.config import DIT_PATTERNS
        from metacanvas_core.training.export import export_backbone

        source = tmp_path / "source"  # the pipeline folder training read (the export links its other parts)
        source.mkdir()
        (source / "model_index.json").write_text("{}")

        def stand_in_training(model, part, seed):
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if re.search(DIT_PATTERNS[part], name):
                        p.add_(torch.randn(p.shape, generator=g) * 0.05)
            return model

        def exported(model, kind, run):
            path = export_backbone(model.state_dict(), model, source, tmp_path / run / "backbone", None, kind, run)
            assert path.parent == tmp_path / run / "diffusion_models"
            return path

        # Wan2.2-TI2V-5B
        untrained = tiny_native_wan(seed=5).state_dict()
        wan_dit = stand_in_training(tiny_native_wan(seed=5), "dit", 1)
        path = exported(wan_dit, "wan", "wan-run")
        assert path.name == "wan-run_wan2.2_ti2v_5B_fp32.safetensors"
        native = comfy.sd.load_diffusion_model(str(path))
        assert type(native.model).__name__ == "WAN22"
        comfy_state = native.model.diffusion_model.state_dict()
        trained = wan_original_state(wan_dit.state_dict())
        assert comfy_state.keys() == trained.keys(), sorted(comfy_state.keys() ^ trained.keys())[:5]
        for key, value in trained.items():
            assert comfy_state[key].dtype == torch.float32 and torch.equal(comfy_state[key], value), key
        assert all(not torch.equal(untrained[k], v) for k, v in wan_dit.state_dict().items())  # all trained
        del native, comfy_state

        # FLUX.1-Kontext
        flux_dit = realconfigs.build("flux_1_kontext_dev/transformer", "cpu", num_layers=1, num_single_layers=0)
        flux_dit.eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, 8, 12, generator=g)  # a latent of 8x12: 4x6 tokens
        context, pooled = torch.randn(1, 7, 4096, generator=g), torch.randn(1, 768, generator=g)
        t, guidance = torch.tensor([0.7]), torch.tensor([2.5])
        diffusers_inputs = {
            "hidden_states": FluxKontextPipeline._pack_latents(x, 1, 16, 8, 12),
            "encoder_hidden_states": context,
            "pooled_projections": pooled,
            "timestep": t,
            "guidance": guidance,
            "img_ids": FluxKontextPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32),
            "txt_ids": torch.zeros(7, 3),
            "return_dict": False,
        }
        with torch.no_grad():
            before = flux_dit(**diffusers_inputs)[0]
            stand_in_training(flux_dit, "dit_image_stream", 2)
            after = flux_dit(**diffusers_inputs)[0]
        path = exported(flux_dit, "flux_kontext", "flux-run")
        assert path.name == "flux-run_flux1-dev-kontext_fp32.safetensors"
        del flux_dit
        native = comfy.sd.load_diffusion_model(str(path))
        config = native.model.model_config.unet_config
        assert type(native.model).__name__ == "Flux" and config["image_model"] == "flux" and config["guidance_embed"]
        dm = native.model.diffusion_model
        assert {p.dtype for p in dm.parameters()} == {torch.float32}
        with torch.no_grad():
            comfy_out = dm(x, t, context, y=pooled, guidance=guidance)
        comfy_out = FluxKontextPipeline._pack_latents(comfy_out, 1, 16, 8, 12)
        scale = after.abs().max()
        gap, moved = (comfy_out - after).abs().max() / scale, (before - after).abs().max() / scale
        print(f"FLUX.1-Kontext single file: ComfyUI vs diffusers {gap:.1e}, trained vs untrained {moved:.1e} (of max)")
        assert gap < 1e-5 and moved > 1e-2, (gap, moved)
