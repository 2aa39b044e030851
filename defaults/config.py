"""The settings of the embedded defaults' recipes (stages base, text_data, text_base and finetune):
stage configs of the repository's own, built on :class:`agd_pipeline.config.StageConfig` and its
``option`` helper like the library's, and registered with it (:func:`agd_pipeline.config.register_config`)
so that the settings and the family guard know their params.yaml sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from agd_pipeline.config import NON_NEGATIVE, POSITIVE, SEEDS, Range, StageConfig, option, register_config
from agd_pipeline.errors import ConfigError

# the ranges several recipes share
HOLDOUT = Range(0.05, 0.5)
RATE = Range(0, 1, low_open=True)
DROPOUT = Range(0, 1, low_open=True, high_open=True, note="the null class is what CFG needs")
EMA = Range(0, 1, high_open=True)
SHARE = Range(0, 1, high_open=True)
# the embedded defaults are small models
SMALL_64, SMALL_1024, SMALL_4096 = (Range(1, most, note="the embedded default is a small model")
                                    for most in (64, 1024, 4096))


@dataclass
class BaseStageConfig(StageConfig):
    """Stage `base`: train the embedded default model (a tiny class-conditional DiT on 8x8 digits)."""

    section: ClassVar[str] = "base"
    own_marker: ClassVar[str] = "model_index.json"
    writes: ClassVar[str] = "base"

    @classmethod
    def family_written(cls, values: dict) -> str | None:
        return "dit"
    out_dir: str = option("data/base", "folder to write the model, scheduler and classifier to (the recipe of "
                          "the shipped pretrained/toy-dit; `make bases` copies it there)")
    seed: int = option(0, "seed for the data split, initialisation and training", bounds=SEEDS)
    holdout_fraction: float = option(0.2, "share of the digits kept out of training (FID reference)", bounds=HOLDOUT)
    num_layers: int = option(4, "DiT blocks", bounds=SMALL_64)
    num_heads: int = option(4, "attention heads per block", bounds=SMALL_64)
    head_dim: int = option(16, "channels per attention head", bounds=SMALL_1024)
    patch_size: int = option(2, "DiT patch size (8x8 images -> (8/p)^2 tokens)")
    train_steps: int = option(2000, "optimiser steps for the diffusion model", bounds=POSITIVE)
    batch_size: int = option(256, "images per training step", bounds=POSITIVE)
    learning_rate: float = option(2e-3, "peak AdamW learning rate (cosine decay, short warm-up)", bounds=RATE)
    label_dropout: float = option(0.15, "probability of replacing the label by the null class", bounds=DROPOUT)
    ema_decay: float = option(0.998, "decay of the exponential moving average of the weights", bounds=EMA)
    num_train_timesteps: int = option(1000, "diffusion timesteps of the noise schedule", bounds=Range(2))
    beta_schedule: str = option(
        "squaredcos_cap_v2", "noise schedule", ("squaredcos_cap_v2", "linear", "scaled_linear")
    )
    classifier_steps: int = option(800, "training steps of the evaluation classifier", bounds=POSITIVE)
    classifier_features: int = option(32, "width of the classifier's penultimate layer (FID features)",
                                      bounds=SMALL_4096)

    def check(self) -> None:
        super().check()
        if self.patch_size not in (1, 2, 4, 8):
            self.fail("patch_size", "must divide the image size 8: one of 1, 2, 4, 8")
        if self.num_heads * self.head_dim % 4:
            raise ConfigError(f"{self.key('num_heads')} x {self.key('head_dim')} = {self.num_heads * self.head_dim} "
                              "must be divisible by 4 (DiT's 2-D sine-cosine position embedding)")


@dataclass
class FinetuneConfig(StageConfig):
    """Stage `finetune`: a derivative of the embedded default, fine-tuned on a shifted distribution
    (fully, or with a LoRA merged into its weights), for the fine-tuned-derivatives experiment."""

    section: ClassVar[str] = "finetune"
    own_marker: ClassVar[str] = "model_index.json"
    # its derivative replaces out_dir, another pipeline's base if of its family
    inputs: ClassVar[dict[str, str]] = {"base_model": "base"}
    writes: ClassVar[str] = "base"
    base_model: str = option("pretrained/toy-dit", "an embedded default's base folder: the class default (its "
                             "train.npz, holdout.npz and classifier come along) or a text default, "
                             "pretrained/text-<family> (its text_base settings are read from its resolved_config.json)")
    shared: str = option("", "a text default only: the text defaults' shared data (digits, VAE, judge); empty: the "
                         "folder the base's recipe recorded (pretrained/text-shared for the shipped bases)")
    out_dir: str = option("data/derived/full/base", "folder to write the derivative to")
    mode: str = option("full", "full: every weight trained; lora: a LoRA (peft) on the attention projections, "
                       "merged into the weights afterwards", ("full", "lora"))
    subset: str = option("bold", "the shifted distribution: bold (the third of each class with the most ink) or "
                         "thin (the third with the least)", ("bold", "thin"))
    steps: int = option(400, "optimiser steps", bounds=POSITIVE)
    batch_size: int = option(256, "images per step", bounds=POSITIVE)
    learning_rate: float = option(5e-4, "peak AdamW learning rate (cosine decay, short warm-up)", bounds=RATE)
    lora_rank: int = option(8, "mode lora: rank (and alpha) of the LoRA matrices", bounds=POSITIVE)
    label_dropout: float = option(0.15, "probability of replacing the label by the null class (a text default: the "
                                  "caption by the empty prompt); keeps CFG working", bounds=DROPOUT)
    ema_decay: float = option(0.99, "decay of the exponential moving average of the trained weights", bounds=EMA)
    seed: int = option(0, "seed of the training batches and the LoRA initialisation", bounds=SEEDS)

    def check(self) -> None:
        super().check()
        self.check_folder("base_model")


@dataclass
class TextDataConfig(StageConfig):
    """Stage `text_data`: what the embedded text-to-image defaults share (VAE, classifier, prompts)."""

    section: ClassVar[str] = "text_data"
    own_marker: ClassVar[str] = "digits.npz"
    out_dir: str = option("data/text/shared", "folder to write the VAE, classifier, digits and prompt sets to")
    seed: int = option(0, "seed for the data split, captions and training", bounds=SEEDS)
    holdout_fraction: float = option(0.2, "share of the digits kept out of training (FID reference, eval prompts)",
                                     bounds=HOLDOUT)
    vae_channels: int = option(32, "channels of the VAE's first level (the second has twice as many)",
                               bounds=Range(8, 512, note="a multiple of 8, for group norm"))
    vae_steps: int = option(1500, "VAE training steps", bounds=POSITIVE)
    vae_batch_size: int = option(64, "images per VAE training step", bounds=POSITIVE)
    vae_learning_rate: float = option(2e-3, "VAE AdamW learning rate", bounds=RATE)
    vae_kl_weight: float = option(1e-3, "weight of the KL term per latent value", bounds=NON_NEGATIVE)
    classifier_steps: int = option(800, "training steps of the evaluation classifier", bounds=POSITIVE)
    classifier_features: int = option(32, "width of the classifier's penultimate layer (FID features)", bounds=POSITIVE)
    generate_prompts: int = option(1500, "training prompts written for stage one (prompts/train.txt)", bounds=POSITIVE)
    eval_prompts_per_digit: int = option(30, "held-out prompts per digit written for evaluate (prompts/eval.tsv)",
                                         bounds=POSITIVE)
    agnostic_share: float = option(0.15, "share of captions and prompts that name no digit", bounds=SHARE)

    def check(self) -> None:
        super().check()
        if self.vae_channels % 8:
            self.fail("vae_channels", "must be a multiple of 8 (group norm)")


@dataclass
class TextBaseConfig(StageConfig):
    """Stage `text_base`: train one embedded text-to-image default (SD, SDXL or SD3 in tiny form)."""

    section: ClassVar[str] = "text_base"
    own_marker: ClassVar[str] = "model_index.json"
    writes: ClassVar[str] = "base"

    @classmethod
    def family_written(cls, values: dict) -> str | None:
        return str(values.get("family") or "") or None
    family: str = option("sd", "architecture to build and train", ("sd", "sdxl", "sd3"))
    shared: str = option("data/text/shared", "the text_data stage's output folder")
    out_dir: str = option("data/text/sd/base", "folder to write the pipeline to")
    seed: int = option(0, "seed for initialisation, captions and training", bounds=SEEDS)
    channels: int = option(32, "UNet: channels of the first level (the second has twice as many); SD3: token width",
                           bounds=Range(8, 1024, note="a multiple of 8, for group norm"))
    head_dim: int = option(8, "channels per attention head", bounds=POSITIVE)
    num_layers: int = option(4, "SD3: joint-attention blocks (the UNets have one block per level)", bounds=POSITIVE)
    cross_attention_levels: int = option(1, "SD, SDXL: UNet levels with cross-attention blocks besides the mid "
                                         "block: 1 (the 8x8 level) or 2 (also the 4x4 level)", (1, 2))
    text_hidden: int = option(32, "width of each frozen CLIP text encoder", bounds=POSITIVE)
    flow_shift: float = option(3.0, "SD3: timestep shift of the flow-matching schedule (SD3's own is 3)",
                               bounds=Range(0.1, 100))
    captions_per_image: int = option(4, "captions generated per training image", bounds=POSITIVE)
    agnostic_share: float = option(0.15, "share of training captions that name no digit", bounds=SHARE)
    caption_dropout: float = option(0.1, "probability of training on the empty prompt (what CFG needs)",
                                    bounds=Range(0, 1, low_open=True, high_open=True,
                                                 note="the empty prompt is what CFG needs"))
    train_steps: int = option(1200, "optimiser steps for the denoiser", bounds=POSITIVE)
    batch_size: int = option(256, "(image, caption) pairs per step", bounds=POSITIVE)
    learning_rate: float = option(2e-3, "peak AdamW learning rate (cosine decay, short warm-up)", bounds=RATE)
    ema_decay: float = option(0.995, "decay of the exponential moving average of the weights", bounds=EMA)

    def check(self) -> None:
        super().check()
        self.check_folder("shared")
        if self.channels % 8:
            self.fail("channels", "must be a multiple of 8 (group norm)")
        if self.channels % self.head_dim:
            self.fail("head_dim", f"must divide channels ({self.channels})")
        if self.text_hidden % 2:
            self.fail("text_hidden", "must be even (two attention heads)")


register_config(BaseStageConfig)
register_config(FinetuneConfig)
register_config(TextDataConfig, "the text defaults' shared data")
register_config(TextBaseConfig)
