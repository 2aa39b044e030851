"""The embedded default: a small class-conditional DiT trained here on scikit-learn's 8x8 digits.

Nothing is downloaded: the digits ship inside scikit-learn. The stage writes a diffusers-style
folder (model_index.json, transformer/, scheduler/) that ``load_base_model`` reads like any other
DiT, plus a small classifier whose accuracy measures class fidelity and whose penultimate features
are the feature space of this default's FID, and the held-out real digits as FID reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from defaults.config import BaseStageConfig
from agd_pipeline.optim import check_finite, cosine_with_warmup, descent_step
from agd_pipeline.errors import ModelError, require
from agd_pipeline.models import save_dit_folder

IMAGE_SIZE = 8
NUM_CLASSES = 10
CLASSIFIER_DIR = "classifier"
HOLDOUT_FILE = "holdout.npz"
# The digits the base trained on, as its latents (the DiT is pixel-space: [N, 1, 8, 8] in [-1, 1])
# with their labels: the real data of generate.source forward_noised (the paper's ablation).
TRAIN_FILE = "train.npz"


def load_digits_split(seed: int, holdout_fraction: float):
    """Digits scaled to [-1, 1] as [N, 1, 8, 8], split into train and held-out, stratified."""
    load_digits = require("sklearn.datasets", "the embedded default's digits").load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0) * 2.0 - 1.0
    images = images[:, None]
    labels = digits.target.astype(np.int64)
    x_train, x_hold, y_train, y_hold = train_test_split(
        images, labels, test_size=holdout_fraction, random_state=seed, stratify=labels)
    return x_train, y_train, x_hold, y_hold


def build_dit(config: BaseStageConfig):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=1,
        out_channels=1,
        num_layers=config.num_layers,
        sample_size=IMAGE_SIZE,
        patch_size=config.patch_size,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_num_groups=1,
    )


def build_scheduler(config: BaseStageConfig):
    from diffusers import DDIMScheduler

    # clip_sample=False: clipping x0 to [-1, 1] wrecks CFG at high w. "leading" spacing: "trailing"
    # with the cosine schedule starts at a timestep whose alpha is ~0 and blows up.
    return DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def train_base(config: BaseStageConfig, progress: bool = True) -> dict:
    """Train the default base model and its evaluation classifier; write them to config.out_dir."""
    torch.manual_seed(config.seed)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_hold, y_hold = load_digits_split(config.seed, config.holdout_fraction)
    images = torch.from_numpy(x_train)
    labels = torch.from_numpy(y_train)
    net = build_dit(config)
    scheduler = build_scheduler(config)
    losses = fit_class_denoiser(net, list(net.parameters()), images, labels, scheduler, steps=config.train_steps,
                                batch_size=config.batch_size, learning_rate=config.learning_rate,
                                label_dropout=config.label_dropout, ema_decay=config.ema_decay, seed=config.seed,
                                desc="base: train DiT", progress=progress)

    save_dit_folder(out, net, scheduler, meta={
        "description": "embedded default: class-conditional DiT on scikit-learn 8x8 digits",
        "id2label": {str(i): str(i) for i in range(NUM_CLASSES)},
        "final_loss": float(np.mean(losses[-100:])),
        "parameters": sum(p.numel() for p in net.parameters()),
    })
    np.savez_compressed(out / HOLDOUT_FILE, images=x_hold, labels=y_hold)
    np.savez_compressed(out / TRAIN_FILE, latents=x_train, labels=y_train)

    classifier, accuracy = train_classifier(x_train, y_train, x_hold, y_hold, config, progress)
    save_classifier(classifier, out / CLASSIFIER_DIR, {"holdout_accuracy": accuracy})
    return {"final_loss": float(np.mean(losses[-100:])), "classifier_holdout_accuracy": accuracy,
            "parameters": sum(p.numel() for p in net.parameters())}


def fit_class_denoiser(net, parameters: list, images: torch.Tensor, labels: torch.Tensor, scheduler, *, steps: int,
                       batch_size: int, learning_rate: float, label_dropout: float, ema_decay: float, seed: int,
                       desc: str, progress: bool = True) -> list[float]:
    """Epsilon-prediction training of a class-conditional DiT on (image, label) pairs, the label
    dropped to the null class with ``label_dropout`` (what CFG needs). Only ``parameters`` are
    optimised (all of the net's for the base, LoRA's for a LoRA fine-tune); they end as their
    exponential moving average. Returns the loss per step."""
    from diffusers.training_utils import EMAModel

    # Diffusers' DiT drops labels independently in every block in train mode; keep it in eval()
    # (it has no dropout) and drop the label once, here, to the null class.
    net.eval()
    ema = EMAModel(parameters, decay=ema_decay)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, steps, max(1, steps // 20)))
    alphas = scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step")
    for step in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        drop = torch.rand(batch_size, generator=gen) < label_dropout
        y[drop] = NUM_CLASSES
        t = torch.randint(0, len(alphas), (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = net(x_t, timestep=t, class_labels=y).sample
        losses.append(descent_step(F.mse_loss(pred, noise), parameters, optimizer, lr_schedule, ema, what=desc,
                                   step=step))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    ema.copy_to(parameters)
    return losses


# ---------------------------------------------------------------------------- classifier


class DigitClassifier(nn.Module):
    """A small CNN; ``features`` (its penultimate layer) is the FID feature space of the default."""

    def __init__(self, feature_dim: int = 32):
        super().__init__()
        self.feature_dim = feature_dim
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.GELU(),
            nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.GELU(),
        )
        self.fc = nn.Linear(64 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel: the classifier should not key on exact positions."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + IMAGE_SIZE, dx:dx + IMAGE_SIZE]


def train_classifier(x_train, y_train, x_hold, y_hold, config: BaseStageConfig, progress=True):
    torch.manual_seed(config.seed + 1)
    model = DigitClassifier(config.classifier_features)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    images, labels = torch.from_numpy(x_train), torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(config.seed + 1)
    model.train()
    for step in tqdm(range(config.classifier_steps), desc="base: train classifier", disable=not progress,
                     unit="step"):
        idx = torch.randint(0, len(images), (128,), generator=gen)
        loss = F.cross_entropy(model(_augment(images[idx], gen)), labels[idx])
        check_finite(loss, "base: train classifier", step, optimizer.param_groups[0]["lr"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x_hold)).argmax(1).numpy() == y_hold).mean()
    return model, float(accuracy)


def save_classifier(model: DigitClassifier, folder: Path, extra: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"feature_dim": model.feature_dim, **extra}, indent=2))


def load_classifier(base_dir: str | Path) -> DigitClassifier | None:
    """The evaluation classifier shipped with the embedded default, or None for other models."""
    folder = Path(base_dir) / CLASSIFIER_DIR
    if not (folder / "config.json").exists():
        return None
    config = json.loads((folder / "config.json").read_text())
    model = DigitClassifier(config["feature_dim"])
    try:
        model.load_state_dict(load_file(folder / "model.safetensors"))
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"{folder}: cannot load the evaluation classifier ({err}); re-run the base stage") from None
    return model.eval()


def load_holdout(base_dir: str | Path):
    path = Path(base_dir) / HOLDOUT_FILE
    if not path.exists():
        return None
    data = np.load(path)
    return data["images"], data["labels"]
