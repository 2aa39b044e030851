"""Fine-tuned derivatives of the embedded defaults: the base trained further on a shifted distribution
(the boldest or thinnest third of each digit class), either every weight (a full fine-tune) or a
LoRA on the attention projections (with ``peft``) merged into the weights. The derivative is a base
folder of the same architecture, so adapters trained on the original load into it unchanged (with
the warning that the weights differ): the fine-tuned-derivatives experiments measure how well they
still reproduce the derivative's own CFG, against adapters retrained on it.

The class default (data/base) is fine-tuned with its own training loop; a text default
(data/text/<family>/base) with the loop and captions text_base trained it with, on the training
digits whose stroke weight its captions call bold (or thin). The derivative's holdout.npz (and the
class default's train.npz) hold the shifted subset only, so its FID is measured against the
distribution it was fine-tuned on; the evaluation classifier (and a text default's prompt sets) are
the original's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from defaults.config import FinetuneConfig
from agd_pipeline.errors import ConfigError, ModelError, command_line, require
from agd_pipeline.models import load_base_model, save_dit_folder
from agd_pipeline.outputs import check_replaceable, staging_folder, swap_in
from defaults.toy import CLASSIFIER_DIR, HOLDOUT_FILE, NUM_CLASSES, TRAIN_FILE, fit_class_denoiser

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' attention projections
DESCRIPTION = "fine-tuned derivative"
# what a finetune output folder holds; a folder with anything else is not replaced
DERIVATIVE_ENTRIES = {"model_index.json", "agd_base.json", "resolved_config.json", "transformer", "scheduler",
                      CLASSIFIER_DIR, HOLDOUT_FILE, TRAIN_FILE,
                      # a text default's derivative: the family's pipeline folder
                      "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "prompts"}


def ink(images: np.ndarray) -> np.ndarray:
    """Total ink per image (pixels in [-1, 1], background -1): how bold a digit is drawn."""
    return (images.reshape(len(images), -1) + 1.0).sum(1)


def shifted_subset(images: np.ndarray, labels: np.ndarray, subset: str) -> np.ndarray:
    """Indices of the boldest (or thinnest) third of every class."""
    weight = ink(images)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(weight[members], kind="stable")]
        third = max(1, len(order) // 3)
        keep.append(order[-third:] if subset == "bold" else order[:third])
    return np.sort(np.concatenate(keep))


def _read_split(folder: Path, name: str, images_key: str, shape: tuple[int, ...],
                num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The base's images (or latents) of ``shape`` each and their labels in [0, num_classes), checked
    before any training: a damaged, truncated or mismatched file is one ModelError naming it."""
    import zipfile

    path = folder / name
    rebuild = f"finetune works on the embedded default (`{command_line('base')}` writes it)"
    try:
        with np.load(path) as data:
            images, labels = data[images_key], data["labels"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
        reason = f"no array {err}" if isinstance(err, KeyError) else " ".join(str(err).split()) or type(err).__name__
        raise ModelError(f"{path}: cannot read the base's {name} ({reason}); {rebuild}") from None
    problem = None
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape) or not len(images):
        problem = f"{images_key} has shape {tuple(images.shape)}; the base takes (N, {', '.join(map(str, shape))})"
    elif labels.shape != (len(images),):
        problem = f"labels has shape {tuple(labels.shape)} for {len(images)} {images_key}: one label per item needed"
    elif not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_classes:
        problem = f"labels must be integers in [0, {num_classes})"
    elif not np.issubdtype(images.dtype, np.number) or not np.isfinite(images).all():
        problem = f"{images_key} holds {int((~np.isfinite(images)).sum()):,} values that are NaN or infinite" if \
            np.issubdtype(images.dtype, np.number) else f"{images_key} is not numeric ({images.dtype})"
    if problem:
        raise ModelError(f"{path}: {problem}; nothing was trained. {rebuild}")
    return images.astype(np.float32), labels.astype(np.int64)


def _trainable(net, config: FinetuneConfig):
    """(the parameters a fine-tune of ``config.mode`` trains, a function that returns the denoiser with
    plain weights afterwards): every weight, or a LoRA (peft) injected into the attention projections
    and merged into them at the end."""
    torch.manual_seed(config.seed)
    if config.mode == "lora":
        peft = require("peft", "finetune.mode lora")

        lora = peft.LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, target_modules=list(LORA_TARGETS),
                               init_lora_weights=True)
        wrapped = peft.get_peft_model(net, lora)  # injects the LoRA layers into net's modules
        return [p for p in wrapped.parameters() if p.requires_grad], wrapped.merge_and_unload
    net.requires_grad_(True)
    return list(net.parameters()), lambda: net


def finetune(config: FinetuneConfig, progress: bool = True) -> dict:
    """Write the derivative to ``config.out_dir`` (assembled next to it, then moved in)."""
    source, out = Path(config.base_model), Path(config.out_dir)
    check_replaceable(out, "finetune.out_dir", DESCRIPTION, DERIVATIVE_ENTRIES, "a finetune output")
    base = load_base_model(str(source))
    parent = base.weights_fingerprint()  # before training changes them
    if base.conditioning == "text":
        return _finetune_text(config, source, out, parent, progress)
    if base.family != "dit" or base.conditioning != "class":
        raise ConfigError(f"finetune.base_model: {source} is a {base.family} {base.conditioning} model; finetune "
                          "derives from the embedded defaults (data/base, or data/text/<family>/base)")
    latent = (base.latent_channels, base.sample_size, base.sample_size)
    x_train, y_train = _read_split(source, TRAIN_FILE, "latents", latent, base.num_classes)
    x_hold, y_hold = _read_split(source, HOLDOUT_FILE, "images", latent, base.num_classes)
    train_idx = shifted_subset(x_train, y_train, config.subset)
    hold_idx = shifted_subset(x_hold, y_hold, config.subset)
    parameters, plain = _trainable(base.net, config)
    losses = fit_class_denoiser(base.net, parameters, torch.from_numpy(x_train[train_idx]),
                                torch.from_numpy(y_train[train_idx]), base.scheduler, steps=config.steps,
                                batch_size=config.batch_size, learning_rate=config.learning_rate,
                                label_dropout=config.label_dropout, ema_decay=config.ema_decay, seed=config.seed,
                                desc=f"finetune: {config.mode} on {config.subset} digits", progress=progress)
    net = plain()  # a merged LoRA: the same architecture as the original
    net.requires_grad_(False).eval()

    staging = staging_folder(out)
    meta = _meta(config, source, parent, parameters, losses, len(train_idx), "the embedded default")
    meta["id2label"] = {str(i): str(i) for i in range(NUM_CLASSES)}
    save_dit_folder(staging, net, base.scheduler, meta=meta)
    shutil.copytree(source / CLASSIFIER_DIR, staging / CLASSIFIER_DIR)
    np.savez_compressed(staging / HOLDOUT_FILE, images=x_hold[hold_idx], labels=y_hold[hold_idx])
    np.savez_compressed(staging / TRAIN_FILE, latents=x_train[train_idx], labels=y_train[train_idx])
    swap_in(staging, out)  # a killed run leaves the previous derivative whole
    return meta


def _meta(config: FinetuneConfig, source: Path, parent: str, parameters, losses, images: int, what: str) -> dict:
    return {"description": f"{DESCRIPTION} ({config.mode}) of {what} on its {config.subset} digits",
            "derived_from": str(source), "derived_from_weights": parent, "mode": config.mode,
            "subset": config.subset, "trained_parameters": sum(p.numel() for p in parameters),
            "final_loss": float(np.mean(losses[-50:])), "training_images": int(images)}


def _finetune_text(config: FinetuneConfig, source: Path, out: Path, parent: str, progress: bool) -> dict:
    """An embedded text default (SD, SDXL, SD3) fine-tuned on its bold (or thin) training digits, with
    captions made as text_base makes them (so "bold" and "thin" prompts keep their meaning), by the
    training loop text_base trained it with; written as the family's pipeline folder."""
    from defaults import textdigits

    recipe = textdigits.base_recipe(source)
    shared = textdigits.load_shared(config.shared or recipe["shared"])
    weight = textdigits.WEIGHTS.index(config.subset)  # the stroke-weight third the captions call so
    train_idx = np.flatnonzero(shared["w_train"] == weight)
    hold_idx = np.flatnonzero(shared["w_hold"] == weight)
    pipe = textdigits.load_pipeline(source)
    parameters, plain = _trainable(textdigits.denoiser_of(pipe), config)
    settings = SimpleNamespace(seed=config.seed, captions_per_image=recipe["captions_per_image"],
                               agnostic_share=recipe["agnostic_share"], train_steps=config.steps,
                               batch_size=config.batch_size, learning_rate=config.learning_rate,
                               caption_dropout=config.label_dropout, ema_decay=config.ema_decay,
                               flow_shift=recipe["flow_shift"])
    losses, _, _ = textdigits.fit_on_digits(
        recipe["family"], pipe, shared["x_train"][train_idx], shared["y_train"][train_idx],
        shared["w_train"][train_idx], settings, progress, parameters,
        desc=f"finetune: {config.mode} on {config.subset} digits")
    net = plain().requires_grad_(False).eval()
    if textdigits.denoiser_of(pipe) is not net:  # peft hands back the module it wrapped, LoRA merged
        raise ModelError("finetune: the merged LoRA is not the pipeline's denoiser (a peft change?)")

    staging = staging_folder(out)
    pipe.save_pretrained(staging)
    for name in (CLASSIFIER_DIR, textdigits.PROMPTS_DIR):
        shutil.copytree(source / name, staging / name)
    np.savez_compressed(staging / HOLDOUT_FILE, images=shared["x_hold"][hold_idx], labels=shared["y_hold"][hold_idx])
    meta = _meta(config, source, parent, parameters, losses, len(train_idx),
                 f"the embedded {recipe['family']} default")
    original = json.loads((source / "agd_base.json").read_text())
    if "max_sequence_length" in original:  # SD3 without T5: its prompt length carries over
        meta["max_sequence_length"] = original["max_sequence_length"]
    (staging / "agd_base.json").write_text(json.dumps(meta, indent=2) + "\n")
    swap_in(staging, out)
    return meta
