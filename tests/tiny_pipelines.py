"""Tiny random-init diffusers text-to-image pipelines (SD, SDXL, SD3), saved as real pipeline folders.

Each builder constructs every component from config (nothing from the Hub), gives every weight a small
seeded perturbation so that no layer is trivially zero (zero-initialised output layers would make
classifier-free guidance vacuous), and writes the pipeline with ``save_pretrained``. The folders reload
offline with ``DiffusionPipeline.from_pretrained(folder)`` or with the concrete pipeline class; the SD3
folder (no T5) also needs ``text_encoder_3=None, tokenizer_3=None``, i.e. ``**null_component_kwargs(folder)``.

Sizes are CPU-tiny but keep the real architecture: 8x8 latents, cross-attention transformer blocks in
every down and up block of the UNets (several per up block), a joint-attention MMDiT for SD3, and a
four-level VAE so that ``vae_scale_factor`` is 8 as in the real checkpoints (64x64 images).

Running this file builds all three pipelines in a temporary folder and smoke-tests them.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import tempfile
from pathlib import Path

import torch

from agd_pipeline.families import FAMILIES

TOKENIZER_MAX_LENGTH = 16  # real CLIP uses 77; short keeps every text tensor tiny
LATENT_SIZE = 8  # latent height/width; images are LATENT_SIZE * 8 = 64 pixels square
WEIGHT_PERTURBATION = 0.02

# The noise schedule of the real SD 1.x/2.x/XL checkpoints (scheduler_config.json); keys a given
# scheduler class does not take are dropped.
SD_SCHEDULER_SETTINGS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                             steps_offset=1, timestep_spacing="leading", skip_prk_steps=True)


def make_clip_tokenizer(folder, pad_token: str = "<|endoftext|>"):
    """An offline CLIPTokenizer whose vocab.json/merges.txt are written to ``folder``.

    The vocabulary is the 256 byte-level characters, each also with the ``</w>`` end-of-word suffix,
    then ``<|startoftext|>`` and ``<|endoftext|>`` (the highest ids, as in real CLIP). With no merges
    every word is spelled out character by character, so any text encodes without unknown tokens.
    ``pad_token`` defaults to ``<|endoftext|>`` (SD, SD3, SDXL's first tokenizer); SDXL's second
    tokenizer pads with ``"!"`` in the real checkpoints.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    characters = sorted(ByteLevel.alphabet(), key=ord)
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=TOKENIZER_MAX_LENGTH, pad_token=pad_token)


def _build_perturbed(build, seed: int):
    """``build()`` under ``torch.manual_seed(seed)``, then every parameter plus seeded noise, in eval mode.

    The global RNG state is restored afterwards, so building a pipeline never disturbs the caller's.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
    noise = torch.Generator().manual_seed(seed + 10_000)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(WEIGHT_PERTURBATION * torch.randn(parameter.shape, generator=noise))
    return module.eval()


def _clip_text_encoder(tokenizer, hidden_size: int, seed: int, with_projection: bool = False):
    """A two-layer CLIP text encoder matching ``tokenizer`` (projection_dim = hidden_size when projected)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            projection_dim=hidden_size, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=TOKENIZER_MAX_LENGTH, hidden_act="gelu",
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _build_perturbed(lambda: model_class(config), seed)


def _cross_attention_unet(cross_attention_dim: int, seed: int, **extra_config):
    """A UNet2DConditionModel with cross-attention in both down blocks, the mid block and both up blocks.

    Two levels of (8, 16) channels, two layers per block (so three cross-attention layers per up block).
    """
    from diffusers import UNet2DConditionModel

    config = dict(sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(8, 16), norm_num_groups=4,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=(2, 4), use_linear_projection=True,
                  cross_attention_dim=cross_attention_dim, **extra_config)
    return _build_perturbed(lambda: UNet2DConditionModel(**config), seed)


def _tiny_vae(seed: int, latent_channels: int = 4, **extra_config):
    """A four-level AutoencoderKL (vae_scale_factor 8, like the real ones) with a few channels per level."""
    from diffusers import AutoencoderKL

    config = dict(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=1,
                  block_out_channels=(4, 8, 8, 8), norm_num_groups=4, sample_size=LATENT_SIZE * 8,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  **extra_config)
    return _build_perturbed(lambda: AutoencoderKL(**config), seed)


def _scheduler(name: str, **settings):
    """The diffusers scheduler class ``name`` built from ``settings`` (keys it does not take are dropped)."""
    import diffusers

    scheduler_class = getattr(diffusers, name)
    accepted = inspect.signature(scheduler_class.__init__).parameters
    return scheduler_class(**{key: value for key, value in settings.items() if key in accepted})


def make_sd_pipeline(folder, prediction_type: str = "epsilon", scheduler: str = "DDIMScheduler",
                     seed: int = 0) -> Path:
    """A tiny StableDiffusionPipeline (SD 2.x style: one CLIPTextModel, linear-projection attention).

    ``scheduler`` names a diffusers scheduler class; it gets the real SD noise schedule plus
    ``prediction_type`` ("epsilon" or "v_prediction"). No safety checker. Returns ``folder``.
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = make_clip_tokenizer(scratch)
        text_encoder = _clip_text_encoder(tokenizer, hidden_size=16, seed=seed + 1)
        pipeline = StableDiffusionPipeline(
            vae=_tiny_vae(seed + 2, scaling_factor=0.18215),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=_cross_attention_unet(cross_attention_dim=16, seed=seed),
            scheduler=_scheduler(scheduler, **SD_SCHEDULER_SETTINGS, prediction_type=prediction_type),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(folder)
    return folder


def make_sdxl_pipeline(folder, scheduler: str = "EulerDiscreteScheduler", seed: int = 0) -> Path:
    """A tiny StableDiffusionXLPipeline: CLIPTextModel (hidden 16) + CLIPTextModelWithProjection (hidden and
    projection 24), whose penultimate hidden states concatenate to the UNet's cross_attention_dim 40.

    The UNet takes the "text_time" added conditioning: six time ids embedded with
    addition_time_embed_dim 8 plus the 24-dim pooled embedding of the second encoder (6 * 8 + 24 = 72).
    The second tokenizer pads with "!" as in the real checkpoint. Returns ``folder``.
    """
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    addition_time_embed_dim, hidden_size, hidden_size_2 = 8, 16, 24
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = make_clip_tokenizer(Path(scratch) / "tokenizer")
        tokenizer_2 = make_clip_tokenizer(Path(scratch) / "tokenizer_2", pad_token="!")
        text_encoder = _clip_text_encoder(tokenizer, hidden_size=hidden_size, seed=seed + 1)
        text_encoder_2 = _clip_text_encoder(tokenizer_2, hidden_size=hidden_size_2, seed=seed + 3,
                                            with_projection=True)
        unet = _cross_attention_unet(
            cross_attention_dim=hidden_size + hidden_size_2, seed=seed, transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=6 * addition_time_embed_dim + text_encoder_2.config.projection_dim)
        pipeline = StableDiffusionXLPipeline(
            vae=_tiny_vae(seed + 2, scaling_factor=0.13025),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=_scheduler(scheduler, **SD_SCHEDULER_SETTINGS, prediction_type="epsilon"),
            add_watermarker=False,
        )
        pipeline.save_pretrained(folder)
    return folder


def make_sd3_pipeline(folder, seed: int = 0) -> Path:
    """A tiny StableDiffusion3Pipeline: a two-block SD3Transformer2DModel (16 latent channels, patch 2),
    two CLIPTextModelWithProjection (hidden/projection 16 and 24) and no T5 (``text_encoder_3`` and
    ``tokenizer_3`` are None, so the pipeline uses zeros for the T5 part of the prompt embedding).

    The CLIP hidden states (16 + 24 = 40) are zero-padded to joint_attention_dim 48; the pooled
    projections concatenate to pooled_projection_dim 40. The VAE carries SD3's scaling_factor 1.5305
    and shift_factor 0.0609 and no quant convs. FlowMatchEulerDiscreteScheduler with shift 3.0, as in
    the real checkpoint. Returns ``folder``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = Path(folder)
    hidden_size, hidden_size_2, latent_channels = 16, 24, 16
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = make_clip_tokenizer(Path(scratch) / "tokenizer")
        tokenizer_2 = make_clip_tokenizer(Path(scratch) / "tokenizer_2")
        text_encoder = _clip_text_encoder(tokenizer, hidden_size=hidden_size, seed=seed + 1, with_projection=True)
        text_encoder_2 = _clip_text_encoder(tokenizer_2, hidden_size=hidden_size_2, seed=seed + 3,
                                            with_projection=True)
        transformer = _build_perturbed(lambda: SD3Transformer2DModel(
            sample_size=LATENT_SIZE, patch_size=2, in_channels=latent_channels, out_channels=latent_channels,
            num_layers=2, num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16,
            joint_attention_dim=48, pooled_projection_dim=hidden_size + hidden_size_2, pos_embed_max_size=16),
            seed)
        vae = _tiny_vae(seed + 2, latent_channels=latent_channels, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False)
        pipeline = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=None,
            tokenizer_3=None,
        )
        # save_pretrained warns that the None components "cannot be saved"; model_index.json still
        # records them as [null, null], which is all a reload needs (see null_component_kwargs).
        with _diffusers_log_level(logging.ERROR):
            pipeline.save_pretrained(folder)
    return folder


def null_component_kwargs(folder) -> dict:
    """``{name: None}`` for every component that ``folder``'s model_index.json records as null.

    diffusers' ``from_pretrained`` only fills in null components listed in the pipeline's
    ``_optional_components``; others (SD3's ``text_encoder_3``/``tokenizer_3``) must be passed as None
    explicitly, so reload with ``from_pretrained(folder, **null_component_kwargs(folder))``.
    """
    model_index = json.loads((Path(folder) / "model_index.json").read_text())
    return {name: None for name, value in model_index.items()
            if isinstance(value, list) and len(value) == 2 and value[0] is None}


@contextlib.contextmanager
def _diffusers_log_level(level: int):
    """Temporarily set the diffusers logging verbosity."""
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(level)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(previous)


# ---------------------------------------------------------------------------------------------------
# Self-check: python tests/tiny_pipelines.py


def _encode(pipeline, prompts, negative_prompts) -> dict:
    """The pipeline's own encode_prompt, as the keyword arguments its __call__ takes."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    if isinstance(pipeline, StableDiffusion3Pipeline):
        embeds = pipeline.encode_prompt(prompts, None, None, negative_prompt=negative_prompts, max_sequence_length=8)
    elif isinstance(pipeline, StableDiffusionXLPipeline):
        embeds = pipeline.encode_prompt(prompts, negative_prompt=negative_prompts)
    else:
        embeds = pipeline.encode_prompt(prompts, "cpu", 1, True, negative_prompt=negative_prompts)
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    return dict(zip(names, embeds))


def _denoiser_output(pipeline, latents, embeds: dict, negative: bool) -> torch.Tensor:
    """One denoiser call at t=500 with the conditional (or unconditional) text embeddings."""
    prefix = "negative_" if negative else ""
    text, pooled = embeds[prefix + "prompt_embeds"], embeds.get(prefix + "pooled_prompt_embeds")
    timestep = torch.full((latents.shape[0],), 500.0)
    if getattr(pipeline, "transformer", None) is not None:
        return pipeline.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                                    pooled_projections=pooled).sample
    added = None
    if pooled is not None:  # SDXL: (original size, crop top-left, target size) of a 64x64 image
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(latents.shape[0], 1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
    return pipeline.unet(latents, timestep, encoder_hidden_states=text, added_cond_kwargs=added).sample


def _smoke_test(build, pipeline_class, folder: Path) -> None:
    """Build, reload (by class and generically), encode, check CFG is not vacuous, sample; print timings."""
    import time

    from diffusers import DiffusionPipeline

    start = time.perf_counter()
    build(folder)
    built = time.perf_counter()
    pipeline = pipeline_class.from_pretrained(folder, **null_component_kwargs(folder))
    pipeline.set_progress_bar_config(disable=True)
    assert type(DiffusionPipeline.from_pretrained(folder, **null_component_kwargs(folder))) is pipeline_class
    loaded = time.perf_counter()
    with torch.no_grad():
        embeds = _encode(pipeline, ["a photo of a cat", "a red car"], ["blurry", "blurry"])
        denoiser = getattr(pipeline, "transformer", None) or pipeline.unet
        latents = torch.randn(2, denoiser.config.in_channels, LATENT_SIZE, LATENT_SIZE,
                              generator=torch.Generator().manual_seed(0))
        guidance_gap = (_denoiser_output(pipeline, latents, embeds, negative=False)
                        - _denoiser_output(pipeline, latents, embeds, negative=True)).abs().mean().item()
        assert guidance_gap > 1e-3, guidance_gap
        run = dict(**embeds, latents=latents, num_inference_steps=3, guidance_scale=4.0)
        sampled = pipeline(**run, output_type="latent").images
        images = pipeline(**run, output_type="np").images
    assert sampled.shape == latents.shape and torch.isfinite(sampled).all()
    assert images.shape == (2, LATENT_SIZE * 8, LATENT_SIZE * 8, 3) and 0.0 <= images.min() <= images.max() <= 1.0
    done = time.perf_counter()
    print(f"{pipeline_class.__name__}: |cond - uncond| = {guidance_gap:.4f}; "
          f"build {built - start:.2f}s, reload x2 {loaded - built:.2f}s, encode + 2 runs {done - loaded:.2f}s")


if __name__ == "__main__":
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # with 2+ threads OpenMP hand-offs make these tiny models ~50x slower
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    with tempfile.TemporaryDirectory() as root:
        for name, build, pipeline_class in [
            ("sd", make_sd_pipeline, StableDiffusionPipeline),
            ("sd_v", lambda folder: make_sd_pipeline(folder, prediction_type="v_prediction",
                                                     scheduler="EulerDiscreteScheduler"), StableDiffusionPipeline),
            ("sdxl", make_sdxl_pipeline, StableDiffusionXLPipeline),
            ("sd3", make_sd3_pipeline, StableDiffusion3Pipeline),
        ]:
            _smoke_test(build, pipeline_class, Path(root) / name)


# The tiny text pipelines the suite shares (conftest's session fixture text_pipeline_dirs builds them
# once): SD with v-prediction (DDIM), SDXL (Euler), SD3 (flow-match Euler).
TEXT_BUILDERS = {
    "sd": lambda folder, seed=0: make_sd_pipeline(folder, prediction_type="v_prediction", seed=seed),
    "sdxl": lambda folder, seed=0: make_sdxl_pipeline(folder, seed=seed),
    "sd3": lambda folder, seed=0: make_sd3_pipeline(folder, seed=seed),
}


def make_dit_folder(folder, seed: int = 0) -> Path:
    """The tiny class DiT (conftest's TINY_DIT), written as the embedded class default writes its base:
    the same folder as conftest's session fixture tiny_base_dir for seed 0."""
    from conftest import make_base_folder

    return make_base_folder(Path(folder), seed=seed)


# The registered families (agd_pipeline.families.FAMILIES, in their order) and a tiny model of each,
# looked up by family name: the per-family tests are parametrized from these, so a family added to
# the registry is tested like the others, and tests/families/test_families.py fails naming a family
# that has no tiny builder here.
FAMILY_NAMES = tuple(family.name for family in FAMILIES)
TEXT_FAMILY_NAMES = tuple(family.name for family in FAMILIES if family.conditioning == "text")
TINY_BUILDERS = {"dit": make_dit_folder, **TEXT_BUILDERS}


def tiny_builder(family: str):
    """The builder (folder, seed=0) -> model folder of the tiny model of a registered family."""
    try:
        return TINY_BUILDERS[family]
    except KeyError:
        raise LookupError(f"the registered family '{family}' has no tiny model builder: add one to "
                          "TINY_BUILDERS in tests/tiny_pipelines.py") from None
