"""Fine-tuned derivatives of the embedded default: the base trained further on a shifted distribution
(the boldest or thinnest third of each digit class), either every weight (a full fine-tune) or a
LoRA on the attention projections (with ``peft``) merged into the weights. The derivative is a base
folder of the same architecture, so adapters trained on the original load into it unchanged (with
the warning that the weights differ): the fine-tuned-derivatives experiment measures how well they
still reproduce the derivative's own CFG, against adapters retrained on it.

The derivative's holdout.npz and train.npz hold the shifted subset only, so its FID is measured
against the distribution it was fine-tuned on; the evaluation classifier is the original's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from .config import FinetuneConfig
from .errors import ConfigError, ModelError
from .models import load_base_model, save_dit_folder
from .outputs import check_replaceable, staging_folder, swap_in
from .toy import CLASSIFIER_DIR, HOLDOUT_FILE, NUM_CLASSES, TRAIN_FILE, fit_class_denoiser

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' attention projections
DESCRIPTION = "fine-tuned derivative"
# what a finetune output folder holds; a folder with anything else is not replaced
DERIVATIVE_ENTRIES = {"model_index.json", "agd_base.json", "resolved_config.json", "transformer", "scheduler",
                      CLASSIFIER_DIR, HOLDOUT_FILE, TRAIN_FILE}


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


def _read_split(folder: Path, name: str, images_key: str) -> tuple[np.ndarray, np.ndarray]:
    path = folder / name
    try:
        with np.load(path) as data:
            return data[images_key].astype(np.float32), data["labels"].astype(np.int64)
    except (OSError, KeyError, ValueError) as err:
        raise ModelError(f"{path}: cannot read the base's {name} ({err}); finetune works on the embedded default "
                         "(`python -m stages.base` writes it)") from None


def finetune(config: FinetuneConfig, progress: bool = True) -> dict:
    """Write the derivative to ``config.out_dir`` (assembled next to it, then moved in)."""
    source, out = Path(config.base_model), Path(config.out_dir)
    check_replaceable(out, "finetune.out_dir", DESCRIPTION, DERIVATIVE_ENTRIES, "a finetune output")
    base = load_base_model(str(source))
    if base.family != "dit" or base.conditioning != "class":
        raise ConfigError(f"finetune.base_model: {source} is a {base.family} {base.conditioning} model; finetune "
                          "derives from the class-conditional embedded default (data/base)")
    x_train, y_train = _read_split(source, TRAIN_FILE, "latents")
    x_hold, y_hold = _read_split(source, HOLDOUT_FILE, "images")
    train_idx = shifted_subset(x_train, y_train, config.subset)
    hold_idx = shifted_subset(x_hold, y_hold, config.subset)
    parent = base.weights_fingerprint()  # before training changes them
    net = base.net
    torch.manual_seed(config.seed)
    if config.mode == "lora":
        import peft

        lora = peft.LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, target_modules=list(LORA_TARGETS),
                               init_lora_weights=True)
        wrapped = peft.get_peft_model(net, lora)  # injects the LoRA layers into net's modules
        parameters = [p for p in wrapped.parameters() if p.requires_grad]
    else:
        net.requires_grad_(True)
        parameters = list(net.parameters())
    trained = sum(p.numel() for p in parameters)
    losses = fit_class_denoiser(net, parameters, torch.from_numpy(x_train[train_idx]),
                                torch.from_numpy(y_train[train_idx]), base.scheduler, steps=config.steps,
                                batch_size=config.batch_size, learning_rate=config.learning_rate,
                                label_dropout=config.label_dropout, ema_decay=config.ema_decay, seed=config.seed,
                                desc=f"finetune: {config.mode} on {config.subset} digits", progress=progress)
    if config.mode == "lora":
        net = wrapped.merge_and_unload()  # plain weights again: the same architecture as the original
    net.requires_grad_(False).eval()

    staging = staging_folder(out)
    meta = {"description": f"{DESCRIPTION} ({config.mode}) of the embedded default on its {config.subset} digits",
            "derived_from": str(source), "derived_from_weights": parent, "mode": config.mode,
            "subset": config.subset, "trained_parameters": trained, "final_loss": float(np.mean(losses[-50:])),
            "training_images": int(len(train_idx)), "id2label": {str(i): str(i) for i in range(NUM_CLASSES)}}
    save_dit_folder(staging, net, base.scheduler, meta=meta)
    shutil.copytree(source / CLASSIFIER_DIR, staging / CLASSIFIER_DIR)
    np.savez_compressed(staging / HOLDOUT_FILE, images=x_hold[hold_idx], labels=y_hold[hold_idx])
    np.savez_compressed(staging / TRAIN_FILE, latents=x_train[train_idx], labels=y_train[train_idx])
    swap_in(staging, out)  # a killed run leaves the previous derivative whole
    return meta
