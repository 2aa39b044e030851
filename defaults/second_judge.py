"""A second judge for the embedded defaults: another architecture, trained on other data.

The first judge (the base folder's digit classifier, a small CNN) was trained on the same training
digits as the base model, and it is also the feature space of the FID and the measure of fidelity.
A result that holds only under one judge may be that judge's blind spot. The second judge is a
pixel MLP (no convolution) trained here on one half of the held-out digits, which neither the base
nor the first judge saw; the other half is the reference set of FID in its features. It is trained
by a fixed recipe at evaluation time (a few seconds on a CPU), so it needs no stage of its own and
serves every base folder that carries held-out digits.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agd_pipeline.optim import check_finite
from defaults.textdigits import PooledClassifier

SIDE = 8  # the judge sees 8x8 grey images (16x16 text-default digits are average-pooled)
TRAIN_STEPS = 1500
SEED = 20
grey8 = PooledClassifier.prepare  # [B, 1 or 3, H, W] in [-1, 1] -> [B, 1, 8, 8], as the first judge sees them


class PixelMLP(nn.Module):
    """Flattened pixels -> 128 -> 48 features -> 10 classes; ``features`` is its FID space."""

    def __init__(self, feature_dim: int = 48):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 128), nn.ReLU(), nn.Dropout(0.1),
                                  nn.Linear(128, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(grey8(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def split_holdout(labels: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the held-out digits the second judge trains on, and of those it is measured on
    (and that serve as its FID reference): half of each digit's examples each, drawn by ``seed``."""
    rng = np.random.default_rng(seed)
    train, reference = [], []
    for digit in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == digit))
        train.append(members[: len(members) // 2])
        reference.append(members[len(members) // 2:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(reference))


def train_second_judge(images: np.ndarray, labels: np.ndarray, steps: int = TRAIN_STEPS, seed: int = SEED):
    """The judge, trained on half the held-out digits (random shifts of up to a pixel, as the
    first judge), its accuracy on the other half, and the indices of that half."""
    train, reference = split_holdout(labels, seed)
    x = grey8(torch.from_numpy(np.asarray(images, dtype=np.float32)))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    torch.manual_seed(seed)
    model = PixelMLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    gen = torch.Generator().manual_seed(seed)
    xs, ys = x[train], y[train]
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(xs), (64,), generator=gen)
        batch = F.pad(xs[idx], (1, 1, 1, 1), value=-1.0)
        dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
        loss = F.cross_entropy(model(batch[:, :, dy:dy + SIDE, dx:dx + SIDE]), ys[idx])
        check_finite(loss, "evaluate: train the second judge", step, optimizer.param_groups[0]["lr"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x[reference]).argmax(1) == y[reference]).float().mean())
    return model, accuracy, reference
