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


CAPTION_CHARACTERS = 40  # a row's caption: the prompt's first characters (the whole prompt is in the tracker's tag)


def caption(text: str, limit: int = CAPTION_CHARACTERS) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 1].rstrip() + "…"


def captioned_grid(blocks: dict[str, np.ndarray], row_captions: list[str], per_row: int, title: str = ""):
    """One PIL image: a block per column caption (``blocks``: caption -> uint8 images, ``per_row``
    samples of each row in turn), side by side under their captions, each row of samples after its
    caption (a prompt, or a class). The blocks are diffusers' ``make_image_grid``; the text is PIL's
    default font (nothing to download, no matplotlib)."""
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw, ImageFont

    rows = len(row_captions)
    font = ImageFont.load_default()
    pictures = {name: make_image_grid([Image.fromarray(image).convert("RGB") for image in images[:rows * per_row]],
                                      rows, per_row) for name, images in blocks.items()}
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    gap = 6
    line = max(size("Ag")[1], 8) + gap
    cell = next(iter(pictures.values())).height // max(rows, 1)
    left = max(size(text)[0] for text in row_captions) + 2 * gap
    # a block is as wide as its images or its caption, whichever is wider
    spans = {name: max(picture.width, size(name)[0]) + gap for name, picture in pictures.items()}
    width = max(left + sum(spans.values()), size(title)[0] + 2 * gap)
    top = (line if title else 0) + line
    canvas = Image.new("RGB", (width, top + rows * cell + gap), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, gap // 2), title, fill="black", font=font)
    x = left
    for name, picture in pictures.items():
        draw.text((x, top - line + gap // 2), name, fill="black", font=font)
        canvas.paste(picture, (x, top))
        x += spans[name]
    for row, text in enumerate(row_captions):
        draw.text((gap, top + row * cell + max(cell - line, 0) // 2), text, fill="black", font=font)
    return canvas
