"""Validation grids during training, the way diffusers' training examples make them: the base and
the adapters the run already holds (no second copy), the prompts encoded once per run, CFG | AGD at
each validation w from fixed seeds, captioned with the prompt and w, written to
``out_dir/validation/step-NNNNNN.png`` and logged to the run's tracker (``train.report_to``)."""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .errors import ConfigError

VALIDATION = "validation"
VALIDATION_ROWS, VALIDATION_SAMPLES = 4, 2  # default classes or prompts shown, samples of each


def validation_scales(config: TrainConfig, manifest) -> list[float]:
    """train.validation_w, or two guidance scales of the training range: its middle and its top."""
    if config.validation_w:
        return list(dict.fromkeys(float(w) for w in config.validation_w))
    low, high = manifest.guidance_min, manifest.guidance_max
    return sorted({round((low + high) / 2, 2), round(high, 2)})


def validation_rows(config: TrainConfig, manifest) -> dict:
    """What the grid's rows show: ``{"prompts": [...]}`` (train.validation_prompt, else the store's
    first prompts) or ``{"classes": [...]}`` (the first classes); a ConfigError for prompts given to
    a class model, before anything trains."""
    recorded = manifest.base_model
    if recorded.get("conditioning") == "text":
        return {"prompts": list(config.validation_prompt) or list(manifest.get("prompts") or [])[:VALIDATION_ROWS]}
    if config.validation_prompt:
        raise ConfigError(f"train.validation_prompt: {config.store} holds a class-conditional "
                          f"{recorded.get('family', 'dit')} model, which takes class ids, not prompts (its grid shows "
                          "the first classes); leave validation_prompt empty")
    return {"classes": list(range(min(VALIDATION_ROWS, recorded["num_classes"])))}


class Validator:
    """Everything a run's validation grids need, prepared once: the training's own base (its VAE
    attached once, see :func:`~agd_pipeline.models.attach_decoder`), the rows' conditions (prompts
    encoded once: the text encoders are loaded once per run), the scales and the seeds."""

    def __init__(self, config: TrainConfig, manifest, base, autocast=contextlib.nullcontext):
        from .inference import prepare_conditions
        from .models import attach_decoder

        self.base, self.seed, self.autocast = attach_decoder(base), config.seed, autocast
        self.scales = validation_scales(config, manifest)
        self.rows = validation_rows(config, manifest)
        self.record = {"sampler": manifest.sampler, "guidance": manifest.guidance,
                       "negative_prompt": manifest.negative_prompt}
        with torch.random.fork_rng(devices=[]):
            self.prepared = prepare_conditions(self.base, self.rows.get("classes"), self.rows.get("prompts"),
                                               VALIDATION_SAMPLES, manifest.negative_prompt)
        if "prompts" in self.rows:
            self.captions = list(self.rows["prompts"])
        else:
            self.captions = [f"class {c}" for c in self.rows["classes"]]

    def images(self, adapted) -> dict[float, dict[str, np.ndarray]]:
        """{w: {"CFG": uint8 images, "AGD": uint8 images}}: VALIDATION_SAMPLES per row, fixed seeds
        (the same noise at every step, so only the adapters change the AGD columns). ``adapted`` is
        the training's AdaptedModel, in eval mode, with the weights to show."""
        from .figures import to_uint8
        from .inference import sample_loaded

        config = {**self.record, "adapter": asdict(adapted.config)}
        out: dict[float, dict[str, np.ndarray]] = {}
        with torch.random.fork_rng(devices=[]), torch.no_grad(), self.autocast():  # training's random stream stays
            for w in self.scales:
                out[w] = {}
                for method in ("CFG", "AGD"):
                    result = sample_loaded(config, self.base, adapted, w, per_class=VALIDATION_SAMPLES,
                                           seed=self.seed, use_adapters=method == "AGD",
                                           batch_size=len(self.captions) * VALIDATION_SAMPLES,
                                           adapters="the adapters in training", prepared=self.prepared, **self.rows)
                    out[w][method] = to_uint8(result["images"])
        return out

    def grid(self, adapted, out: Path, step: int, trackers=()) -> Path:
        """``out/validation/step-NNNNNN.png`` (rows: the prompts or classes; a CFG and an AGD block per
        w), and one image per w logged to each tracker that takes images, tagged
        ``validation/step-NNNNNN/w=W`` at ``step`` (its rows captioned with the prompts)."""
        from .figures import caption, captioned_grid

        images = self.images(adapted)
        captions = [caption(text) for text in self.captions]
        blocks = {f"{method} w={w:g}": pictures[method] for w, pictures in images.items() for method in ("CFG", "AGD")}
        folder = out / VALIDATION
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:06d}.png"
        captioned_grid(blocks, captions, VALIDATION_SAMPLES, f"validation after step {step}").save(path)
        for tracker in trackers:
            for w, pictures in images.items():
                picture = captioned_grid({f"{method} w={w:g}": pictures[method] for method in ("CFG", "AGD")},
                                         captions, VALIDATION_SAMPLES)
                log_image(tracker, f"{VALIDATION}/step-{step:06d}/w={w:g}", np.asarray(picture), step)
        return path


def log_image(tracker, tag: str, picture: np.ndarray, step: int) -> None:
    """One HWC uint8 image to an accelerate tracker, in the form its ``log_images`` takes (dvclive's
    tracker has none: its Live run's ``log_image`` writes a file per tag). A tracker without images
    is skipped."""
    if tracker.name == "tensorboard":
        tracker.log_images({tag: picture[None]}, step=step, dataformats="NHWC")
    elif tracker.name == "dvclive":
        tracker.live.log_image(f"{tag}.png", picture)
    elif hasattr(tracker, "log_images"):  # wandb and the like take a list of images per key
        tracker.log_images({tag: [picture]}, step=step)
