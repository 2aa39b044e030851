"""The settings of the embedded defaults' recipes (stages base, text_data, text_base and finetune):
stage configs of the repository's own, built on :class:`agd_pipeline.config.StageConfig` and its
``option`` helper like the library's, and registered with it (:func:`agd_pipeline.config.register_config`)
so that the settings and the family guard know their params.yaml sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from agd_pipeline.config import StageConfig, option, register_config
from agd_pipeline.errors import ConfigError


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
    seed: int = option(0, "seed for the data split, initialisation and training")
    holdout_fraction: float = option(0.2, "share of the digits kept out of training (FID reference)")
    num_layers: int = option(4, "DiT blocks")
    num_heads: int = option(4, "attention heads per block")
    head_dim: int = option(16, "channels per attention head")
    patch_size: int = option(2, "DiT patch size (8x8 images -> (8/p)^2 tokens)")
    train_steps: int = option(2000, "optimiser steps for the diffusion model")
    batch_size: int = option(256, "images per training step")
    learning_rate: float = option(2e-3, "peak AdamW learning rate (cosine decay, short warm-up)")
    label_dropout: float = option(0.15, "probability of replacing the label by the null class")
    ema_decay: float = option(0.998, "decay of the exponential moving average of the weights")
    num_train_timesteps: int = option(1000, "diffusion timesteps of the noise schedule")
    beta_schedule: str = option(
        "squaredcos_cap_v2", "noise schedule", ("squaredcos_cap_v2", "linear", "scaled_linear")
    )
    classifier_steps: int = option(800, "training steps of the evaluation classifier")
    classifier_features: int = option(32, "width of the classifier's penultimate layer (FID features)")

    def check(self) -> None:
        super().check()
        if not 0.05 <= self.holdout_fraction <= 0.5:
            self.fail("holdout_fraction", "must lie in [0.05, 0.5]")
        if self.patch_size not in (1, 2, 4, 8):
            self.fail("patch_size", "must divide the image size 8: one of 1, 2, 4, 8")
        if not 0 < self.learning_rate <= 1:
            self.fail("learning_rate", "must lie in (0, 1]")
        for name, most in (("num_layers", 64), ("num_heads", 64), ("head_dim", 1024),
                           ("classifier_features", 4096)):
            if getattr(self, name) > most:
                self.fail(name, f"must be at most {most} (the embedded default is a small model)")
        if self.num_heads * self.head_dim % 4:
            raise ConfigError(f"{self.key('num_heads')} x {self.key('head_dim')} = {self.num_heads * self.head_dim} "
                              "must be divisible by 4 (DiT's 2-D sine-cosine position embedding)")
        if self.num_train_timesteps < 2:
            self.fail("num_train_timesteps", "must be at least 2")
        if not 0.0 < self.label_dropout < 1.0:
            self.fail("label_dropout", "must lie in (0, 1): the null class is what CFG needs")
        if not 0.0 <= self.ema_decay < 1.0:
            self.fail("ema_decay", "must lie in [0, 1)")
        self.require_positive("num_layers", "num_heads", "head_dim", "train_steps", "batch_size", "classifier_steps",
                              "classifier_features", "num_train_timesteps")


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
    steps: int = option(400, "optimiser steps")
    batch_size: int = option(256, "images per step")
    learning_rate: float = option(5e-4, "peak AdamW learning rate (cosine decay, short warm-up)")
    lora_rank: int = option(8, "mode lora: rank (and alpha) of the LoRA matrices")
    label_dropout: float = option(0.15, "probability of replacing the label by the null class (a text default: the "
                                  "caption by the empty prompt); keeps CFG working")
    ema_decay: float = option(0.99, "decay of the exponential moving average of the trained weights")
    seed: int = option(0, "seed of the training batches and the LoRA initialisation")

    def check(self) -> None:
        super().check()
        self.check_folder("base_model")
        self.require_positive("steps", "batch_size", "lora_rank")
        if not 0 < self.learning_rate <= 1:
            self.fail("learning_rate", "must lie in (0, 1]")
        if not 0.0 < self.label_dropout < 1.0:
            self.fail("label_dropout", "must lie in (0, 1): the null class is what CFG needs")
        if not 0.0 <= self.ema_decay < 1.0:
            self.fail("ema_decay", "must lie in [0, 1)")


@dataclass
class TextDataConfig(StageConfig):
    """Stage `text_data`: what the embedded text-to-image defaults share (VAE, classifier, prompts)."""

    section: ClassVar[str] = "text_data"
    own_marker: ClassVar[str] = "digits.npz"
    out_dir: str = option("data/text/shared", "folder to write the VAE, classifier, digits and prompt sets to")
    seed: int = option(0, "seed for the data split, captions and training")
    holdout_fraction: float = option(0.2, "share of the digits kept out of training (FID reference, eval prompts)")
    vae_channels: int = option(32, "channels of the VAE's first level (the second has twice as many)")
    vae_steps: int = option(1500, "VAE training steps")
    vae_batch_size: int = option(64, "images per VAE training step")
    vae_learning_rate: float = option(2e-3, "VAE AdamW learning rate")
    vae_kl_weight: float = option(1e-3, "weight of the KL term per latent value")
    classifier_steps: int = option(800, "training steps of the evaluation classifier")
    classifier_features: int = option(32, "width of the classifier's penultimate layer (FID features)")
    generate_prompts: int = option(1500, "training prompts written for stage one (prompts/train.txt)")
    eval_prompts_per_digit: int = option(30, "held-out prompts per digit written for evaluate (prompts/eval.tsv)")
    agnostic_share: float = option(0.15, "share of captions and prompts that name no digit")

    def check(self) -> None:
        super().check()
        if not 0.05 <= self.holdout_fraction <= 0.5:
            self.fail("holdout_fraction", "must lie in [0.05, 0.5]")
        if not 0.0 <= self.agnostic_share < 1.0:
            self.fail("agnostic_share", "must lie in [0, 1)")
        if self.vae_channels % 8 or not 8 <= self.vae_channels <= 512:
            self.fail("vae_channels", "must be a multiple of 8 (group norm) in [8, 512]")
        if not 0 < self.vae_learning_rate <= 1:
            self.fail("vae_learning_rate", "must lie in (0, 1]")
        if self.vae_kl_weight < 0:
            self.fail("vae_kl_weight", "must be >= 0")
        self.require_positive("vae_steps", "vae_batch_size", "classifier_steps", "classifier_features",
                              "generate_prompts", "eval_prompts_per_digit")


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
    seed: int = option(0, "seed for initialisation, captions and training")
    channels: int = option(32, "UNet: channels of the first level (the second has twice as many); SD3: token width")
    head_dim: int = option(8, "channels per attention head")
    num_layers: int = option(4, "SD3: joint-attention blocks (the UNets have one block per level)")
    cross_attention_levels: int = option(1, "SD, SDXL: UNet levels with cross-attention blocks besides the mid "
                                         "block: 1 (the 8x8 level) or 2 (also the 4x4 level)", (1, 2))
    text_hidden: int = option(32, "width of each frozen CLIP text encoder")
    flow_shift: float = option(3.0, "SD3: timestep shift of the flow-matching schedule (SD3's own is 3)")
    captions_per_image: int = option(4, "captions generated per training image")
    agnostic_share: float = option(0.15, "share of training captions that name no digit")
    caption_dropout: float = option(0.1, "probability of training on the empty prompt (what CFG needs)")
    train_steps: int = option(1200, "optimiser steps for the denoiser")
    batch_size: int = option(256, "(image, caption) pairs per step")
    learning_rate: float = option(2e-3, "peak AdamW learning rate (cosine decay, short warm-up)")
    ema_decay: float = option(0.995, "decay of the exponential moving average of the weights")

    def check(self) -> None:
        super().check()
        self.check_folder("shared")
        self.require_positive("head_dim", "num_layers", "text_hidden", "captions_per_image", "train_steps",
                              "batch_size")
        if self.channels % 8 or not 8 <= self.channels <= 1024:
            self.fail("channels", "must be a multiple of 8 (group norm) in [8, 1024]")
        if self.channels % self.head_dim:
            self.fail("head_dim", f"must divide channels ({self.channels})")
        if not 0.0 < self.caption_dropout < 1.0:
            self.fail("caption_dropout", "must lie in (0, 1): the empty prompt is what CFG needs")
        if not 0.0 <= self.agnostic_share < 1.0:
            self.fail("agnostic_share", "must lie in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            self.fail("ema_decay", "must lie in [0, 1)")
        if not 0 < self.learning_rate <= 1:
            self.fail("learning_rate", "must lie in (0, 1]")
        if not 0.1 <= self.flow_shift <= 100:
            self.fail("flow_shift", "must lie in [0.1, 100]")
        if self.text_hidden % 2:
            self.fail("text_hidden", "must be even (two attention heads)")


register_config(BaseStageConfig)
register_config(FinetuneConfig)
register_config(TextDataConfig, "the text defaults' shared data")
register_config(TextBaseConfig)
