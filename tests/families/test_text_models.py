"""Text-to-image families (SD 1.x/2.x, SDXL, SD3) on tiny random-init pipelines built from config:
our CFG loop against each family's own diffusers pipeline, adapters on the real architectures,
and generate -> train -> sample from the command line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import agd_pipeline.models as models
from agd_pipeline.adapters import (PLACEMENTS, AdaptedModel, AdapterConfig, adapter_targets, load_adapted_model,
                                   save_adapters)
from agd_pipeline.errors import ModelError
from agd_pipeline.models import encode_prompts, load_base_model
from agd_pipeline.sampling import CFG, generators_for, initial_noise, sample

from conftest import read_all_shards, run_main
from tiny_pipelines import TEXT_BUILDERS, TEXT_FAMILY_NAMES, null_component_kwargs

PROMPTS = ["a red cat", "blue sky", "an old oak"]
BUILDERS = TEXT_BUILDERS
FAMILIES = TEXT_FAMILY_NAMES  # the registered text-to-image families


@pytest.fixture(scope="module")
def pipeline_dirs(text_pipeline_dirs):
    return text_pipeline_dirs


@pytest.fixture(scope="module")
def bases(pipeline_dirs):
    return {family: load_base_model(str(folder)) for family, folder in pipeline_dirs.items()}


@pytest.fixture(scope="module")
def encoded(bases):
    return {family: encode_prompts(base, PROMPTS, "blurry") for family, base in bases.items()}


def test_families_are_detected_with_their_prediction_types(bases):
    assert {f: b.family for f, b in bases.items()} == {"sd": "sd", "sdxl": "sdxl", "sd3": "sd3"}
    assert bases["sd"].prediction_type == "v_prediction"
    assert bases["sdxl"].prediction_type == "epsilon"
    assert bases["sd3"].prediction_type == "flow"
    for base in bases.values():
        assert base.conditioning == "text" and base.vae is not None and not base.learned_sigma


# ------------------------------------------------------------------------------- fidelity

CASES = [  # (family, scheduler to swap in; "" keeps the pipeline's own)
    ("sd", ""),  # DDIM, v-prediction
    ("sd", "DDPMScheduler"),  # stochastic: per-sample generators must match
    ("sd", "EulerDiscreteScheduler"),
    ("sd", "DPMSolverMultistepScheduler"),
    ("sdxl", ""),  # Euler
    ("sdxl", "DDIMScheduler"),
    ("sd3", ""),  # flow-match Euler
]


@pytest.mark.parametrize("family,scheduler", CASES)
def test_cfg_loop_reproduces_the_diffusers_pipeline(pipeline_dirs, family, scheduler):
    """The pipeline encodes the prompt strings itself; we encode with encode_prompts and run our loop."""
    import diffusers

    folder = pipeline_dirs[family]
    base = load_base_model(str(folder), scheduler=scheduler)
    cond, uncond = encode_prompts(base, PROMPTS, "blurry")
    seeds = [11, 12, 13]
    noise = initial_noise(base, generators_for(seeds))
    ours = sample(base, cond, noise, 4, CFG(base, 4.5, uncond), generators=generators_for(seeds))

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), **null_component_kwargs(folder))
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt=PROMPTS, negative_prompt=["blurry"] * len(PROMPTS), latents=noise.clone(),
                    num_inference_steps=4, guidance_scale=4.5, output_type="latent",
                    generator=generators_for(seeds)).images
    assert expected.abs().mean() > 0.1
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4), (ours - expected).abs().max()
    # and guidance matters on these models: w = 1 gives another result
    plain = sample(base, cond, noise, 4, CFG(base, 1.0, uncond), generators=generators_for(seeds))
    assert (plain - ours).abs().max() > 1e-2


def test_default_negative_prompt_matches_the_pipeline_default(bases, pipeline_dirs):
    """Empty negative prompt: SD encodes "", SDXL uses zeros (force_zeros_for_empty_prompt)."""
    _, sdxl_uncond = encode_prompts(bases["sdxl"], PROMPTS[:1])
    assert torch.count_nonzero(sdxl_uncond["prompt_embeds"]) == 0
    assert torch.count_nonzero(sdxl_uncond["pooled_prompt_embeds"]) == 0
    _, sd_uncond = encode_prompts(bases["sd"], PROMPTS[:1])
    assert sd_uncond["prompt_embeds"].abs().sum() > 0


def test_sdxl_time_ids_are_the_native_resolution(encoded):
    cond, uncond = encoded["sdxl"]
    side = 8 * 8  # latent 8 x vae_scale_factor 8
    assert cond["add_time_ids"].tolist() == [[side, side, 0, 0, side, side]] * len(PROMPTS)
    assert torch.equal(uncond["add_time_ids"], cond["add_time_ids"][:1])


# ------------------------------------------------------------------------------- adapters

def adapter_config(base, kind, placement="auto", condition_on=None):
    from agd_pipeline.adapters import default_condition_on, resolve_placement

    cond, _ = encode_prompts(base, PROMPTS[:1])
    pooled = cond.get("pooled_prompt_embeds")
    return AdapterConfig(kind=kind, placement=resolve_placement(base.family, placement), width=8, embed_dim=16,
                         condition_on=condition_on or default_condition_on("text"),
                         text_dim=cond["prompt_embeds"].shape[-1],
                         pooled_dim=0 if pooled is None else pooled.shape[-1])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["offset", "cross_attention", "bottleneck"])
def test_fresh_adapters_reproduce_the_base_exactly(bases, encoded, family, kind):
    base = bases[family]
    cond, _ = encoded[family]
    x = torch.randn(len(PROMPTS), *base.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900, 500, 20])
    w = torch.tensor([1.0, 3.0, 7.5])
    with torch.no_grad():
        reference = base.predict(x, t, cond)
    for placement in PLACEMENTS[family]:
        for condition_on in (None, ["guidance", "text_tokens"]):
            model = AdaptedModel(base, adapter_config(base, kind, placement, condition_on))
            try:
                with torch.no_grad():
                    assert torch.equal(model(x, t, cond, w), reference), (placement, condition_on)
                # the adapters are really in the graph: a nudge to every output layer changes the output
                with torch.no_grad():
                    for adapter in model.adapters:
                        last = [m for m in adapter.modules() if isinstance(m, torch.nn.Linear)][-1]
                        last.weight.add_(0.05)
                    assert not torch.allclose(model(x, t, cond, w), reference)
            finally:
                model.remove()


def test_unet_placement_wraps_every_cross_attention(bases):
    from diffusers.models.attention import BasicTransformerBlock

    for family in ("sd", "sdxl"):
        net = bases[family].net
        blocks = [n for n, m in net.named_modules() if isinstance(m, BasicTransformerBlock)]
        names = [name for name, *_ in adapter_targets(bases[family], "cross_attention")]
        assert names == [f"{n}.attn2" for n in blocks]
        # every up block's every attention group (the reference skipped the third of each)
        for i, up in enumerate(net.up_blocks):
            for j, _ in enumerate(getattr(up, "attentions", [])):
                assert any(n.startswith(f"up_blocks.{i}.attentions.{j}.") for n in names), (family, i, j)
        assert any(n.startswith("mid_block.") for n in names)
    sd3_names = [name for name, *_ in adapter_targets(bases["sd3"], "attention")]
    assert sd3_names == [f"transformer_blocks.{i}.attn" for i in range(len(bases["sd3"].net.transformer_blocks))]
    with pytest.raises(ModelError, match="not defined for the 'sd' family.*cross_attention"):
        adapter_targets(bases["sd"], "attention+output")


def test_unet_output_placement_adapts_every_pixel_of_conv_out(bases, encoded):
    """"+output" on a UNet wraps conv_out last; its adapter acts on each pixel's features as a token
    and adds exactly its (gated) residual to that pixel of the UNet's output."""
    for family in ("sd", "sdxl"):
        base = bases[family]
        cond, _ = encoded[family]
        names = [name for name, *_ in adapter_targets(base, "cross_attention+output")]
        assert names == [name for name, *_ in adapter_targets(base, "cross_attention")] + ["conv_out"]
        assert [n for n, *_ in adapter_targets(base, "block+output")][-1] == "conv_out"
        # "+resnet" adds every ResNet block; the targets keep the UNet's module order
        from diffusers.models.resnet import ResnetBlock2D

        resnets = [n for n, m in base.net.named_modules() if isinstance(m, ResnetBlock2D)]
        with_resnets = [n for n, *_ in adapter_targets(base, "cross_attention+resnet+output")]
        assert resnets and [n for n in with_resnets if n in resnets] == resnets
        assert [n for n in with_resnets if n not in resnets] == names
        module_order = [n for n, _ in base.net.named_modules()]
        assert with_resnets[:-1] == sorted(with_resnets[:-1], key=module_order.index) and with_resnets[-1] == "conv_out"
        model = AdaptedModel(base, adapter_config(base, "bottleneck", "cross_attention+output"))
        captured = {}
        handle = base.net.conv_out.register_forward_pre_hook(
            lambda module, args, store=captured: store.update(x=args[0]))
        try:
            x = torch.randn(len(PROMPTS), *base.latent_shape, generator=torch.Generator().manual_seed(1))
            t, w = torch.tensor([900, 500, 20]), torch.tensor([2.0, 3.0, 7.5])
            output_adapter = model.adapters[-1]
            with torch.no_grad():
                torch.nn.init.normal_(output_adapter.up.weight, std=0.1)
                torch.nn.init.normal_(output_adapter.up.bias, std=0.1)
                condition, cond_on_device = model.embed(x, t, cond, w)
                with model.conditioned(condition):
                    adapted = base.predict(x, t, cond_on_device)
                reference = base.predict(x, t, cond_on_device)  # outside conditioned(): the base alone
                features = captured["x"]
                assert features.dim() == 4 and features.shape[0] == len(PROMPTS)
                for i in range(features.shape[2]):
                    for j in range(features.shape[3]):
                        pixel = features[:, :, i, j][:, None, :]  # [B, 1, C]: one token
                        expected = (output_adapter(pixel, condition) * condition.gate)[:, 0]
                        torch.testing.assert_close(adapted[:, :, i, j] - reference[:, :, i, j], expected,
                                                   atol=1e-5, rtol=1e-4)
                assert not torch.allclose(adapted, reference)
        finally:
            handle.remove()
            model.remove()


@pytest.mark.bad_input
def test_adapters_refuse_another_architecture_and_warn_on_other_weights(bases, pipeline_dirs, tmp_path):
    sd = bases["sd"]
    model = AdaptedModel(sd, adapter_config(sd, "offset"))
    save_adapters(model, tmp_path / "adapters")
    model.remove()
    with pytest.raises(ModelError, match=r"UNet2DConditionModel .*sd.*but the base given is .*sdxl"):
        load_adapted_model(tmp_path / "adapters", bases["sdxl"])
    finetune = load_base_model(str(BUILDERS["sd"](tmp_path / "finetune", seed=5)))
    with pytest.warns(UserWarning, match="different weights"):
        load_adapted_model(tmp_path / "adapters", finetune).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapted_model(tmp_path / "adapters", sd).remove()


# ------------------------------------------------------------------- from the command line


def write_params(path, family, folder, store, adapters):
    path.write_text(json.dumps({  # YAML is a superset of JSON
        "generate": {"base_model": str(folder), "out_dir": str(store), "prompts_file": str(path.parent / "p.txt"),
                     "negative_prompt": "blurry", "trajectories_per_prompt": 2, "guidance_min": 1.0,
                     "guidance_max": 12.0, "num_steps": 3, "batch_size": 4, "shard_size": 4,
                     "device": "cpu"},
        "train": {"store": str(store), "out_dir": str(adapters), "steps": 6, "batch_size": 8, "width": 8,
                  "embed_dim": 16, "checkpoint_every": 3, "device": "cpu"},
    }))
    (path.parent / "p.txt").write_text("\n".join(PROMPTS) + "\n\n")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_train_sample_from_the_command_line(pipeline_dirs, bases, encoded, family, tmp_path):
    folder, store, adapters = pipeline_dirs[family], tmp_path / "store", tmp_path / "adapters"
    params = tmp_path / "params.yaml"
    write_params(params, family, folder, store, adapters)

    result = run_main("stages.generate", "--params", params, "--no-progress")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["conditioning"] == "text" and manifest["prompts"] == PROMPTS
    assert manifest["num_trajectories"] == 6 and manifest["base_model"]["family"] == family
    shards = read_all_shards(store)
    assert len(shards) == 2
    data = {k: np.concatenate([s[k] for s in shards.values()]) for k in next(iter(shards.values()))}
    assert data["prompt_index"].tolist() == [0, 1, 2, 0, 1, 2]
    # the stored embeddings are the pipeline encoder's, row by prompt
    cond, _ = encoded[family]
    for name, table in cond.items():
        assert name in data, name
        np.testing.assert_allclose(data[name], table[data["prompt_index"]].numpy(), rtol=1e-3, atol=1e-3)
    assert data["model_input"].shape == (6, 3, *bases[family].latent_shape)
    assert np.isfinite(data["guided_output"]).all() and data["guidance_scale"].max() > 1.0

    result = run_main("stages.train", "--params", params, "--no-progress")
    assert result.returncode == 0, result.stderr
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["adapter"]["placement"] == PLACEMENTS[family][0]
    pooled = ["text_mean"] if family in ("sdxl", "sd3") else []  # the token mean beside a pooled embedding
    assert config["adapter"]["condition_on"] == ["guidance", "timestep", "text", *pooled]
    assert config["negative_prompt"] == "blurry"

    for extra in ([], ["--cfg"]):
        out = tmp_path / ("cfg" if extra else "agd")
        result = run_main("stages.sample", "--adapters", adapters, "-w", "5", "--prompt", "a red cat",
                         "--prompt", "green", "--per-class", "2", "--out-dir", out, "--device", "cpu", *extra)
        assert result.returncode == 0, result.stderr
        pngs = sorted(p.name for p in out.glob("0*.png"))
        assert pngs == ["00000_prompt0.png", "00001_prompt0.png", "00002_prompt1.png", "00003_prompt1.png"]
        assert (out / "grid.png").exists()
        record = json.loads((out / "samples.json").read_text())
        assert record["nfe_per_image"] == (6 if extra else 3)
        assert record["prompts"] == ["a red cat", "green"]


def test_training_never_loads_text_encoders(pipeline_dirs, tmp_path, monkeypatch):
    """Stage two reads conditions from the store only."""
    from agd_pipeline.config import GenerateConfig, TrainConfig, load_config
    from agd_pipeline.generation import generate
    from agd_pipeline.training import train

    params = tmp_path / "params.yaml"
    write_params(params, "sd", pipeline_dirs["sd"], tmp_path / "store", tmp_path / "adapters")
    generate(load_config(GenerateConfig, params), progress=False, log=lambda *a: None)

    def forbidden(*args, **kwargs):
        raise AssertionError("stage two loaded a text encoder")

    monkeypatch.setattr(models, "encode_prompts", forbidden)
    import diffusers
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", forbidden)
    # the validation grid, a picture made once training is over, is the one part that encodes prompts
    import agd_pipeline.training as training

    grids = []
    monkeypatch.setattr(training, "_validation_grid", lambda *args: grids.append(args[2]))
    summary = train(load_config(TrainConfig, params), progress=False, log=lambda *a: None)
    assert np.isfinite(summary["final_loss"])
    assert grids == [load_config(TrainConfig, params).steps]


@pytest.mark.bad_input
def test_text_models_need_prompts_and_class_models_refuse_them(pipeline_dirs, tiny_base_dir, tmp_path):
    from agd_pipeline.config import GenerateConfig, load_config
    from agd_pipeline.errors import ConfigError
    from agd_pipeline.generation import generate

    quiet = dict(progress=False, log=lambda *a: None)
    config = load_config(GenerateConfig, {"base_model": str(pipeline_dirs["sd"]), "out_dir": str(tmp_path / "a"),
                                          "device": "cpu"})
    with pytest.raises(ConfigError, match="text-to-image sd model: set generate.prompts_file"):
        generate(config, **quiet)
    config = load_config(GenerateConfig, {"base_model": str(pipeline_dirs["sd"]), "out_dir": str(tmp_path / "b"),
                                          "device": "cpu", "prompts_file": str(tmp_path / "missing.txt")})
    with pytest.raises(ModelError, match="missing.txt.*not found"):
        generate(config, **quiet)
    (tmp_path / "p.txt").write_text("a cat\n")
    config = load_config(GenerateConfig, {"base_model": str(tiny_base_dir), "out_dir": str(tmp_path / "c"),
                                          "device": "cpu", "prompts_file": str(tmp_path / "p.txt")})
    with pytest.raises(ConfigError, match="class-conditional dit model"):
        generate(config, **quiet)
