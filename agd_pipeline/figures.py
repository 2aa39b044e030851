"""Images as people look at them: [-1, 1] tensors to uint8 arrays, and the side-by-side sample
grids of evaluate and sample (unguided | CFG | AGD, one row per class or digit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [B, C, H, W] -> uint8 [B, H, W] (grey) or [B, H, W, C]."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)


MAX_GRID_ROWS = 16  # classes shown in a grid (ImageNet has 1,000)


def grid_figure(panels: dict[str, np.ndarray], labels: np.ndarray, columns: int, title: str, path: Path):
    """One PNG: a block per method (rows = classes, columns = samples), side by side."""
    from .errors import require

    matplotlib = require("matplotlib", f"the sample grid {path.name}")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(set(labels.tolist()))[:MAX_GRID_ROWS]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (name, images) in zip(np.atleast_1d(axes), panels.items()):
        rows = []
        border = ((0, 0), (1, 1), (1, 1)) + (((0, 0),) if images.ndim == 4 else ())  # grey or colour
        for c in classes:
            picks = images[labels == c][:columns]
            rows.append(np.concatenate(list(np.pad(picks, border, constant_values=64)), axis=1))
        grey = images.ndim == 3
        ax.imshow(np.concatenate(rows, axis=0), cmap="gray" if grey else None, vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
