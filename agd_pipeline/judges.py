"""What evaluation judges sample sets by: a classifier of the model's own images (a *judge*), and the
bundle of judges and real images a project's *judge factory* gives for a base model.

A judge (:class:`Judge`) sees images as the model makes them, ``[N, C, H, W]`` floats in [-1, 1]:

* ``predict(images)``: the class it sees in each image, ``[N]`` integers (class accuracy: the share
  of samples judged the class or prompt digit they were asked for);
* ``features(images)``: ``[N, D]`` features, the space FID is measured in (FID against held-out real
  images, and between two sample sets: AGD against CFG).

A factory is ``evaluate.judge``, ``"module:function"``: called with the base model's folder (or hub
id), it returns a :class:`JudgeBundle`, or None where that base has no judge (then evaluation gives
no accuracy and no classifier FID, as for any model without one; the Inception FID and CLIP score of
``evaluate.fid_reference`` and ``evaluate.clip_model`` need none). The bundle holds the judge, the
held-out real images its FID is measured against (optional: without them, only the FIDs between
sample sets), and optionally a second judge (:class:`SecondJudge`): another classifier, with its own
real reference images, whose verdicts sit beside the first's so that a claim does not rest on one
classifier's blind spots. The repository's embedded defaults have theirs in defaults/judges.py.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .errors import ConfigError


@runtime_checkable
class Judge(Protocol):
    """A classifier of the model's images; both methods take ``[N, C, H, W]`` floats in [-1, 1]."""

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The class seen in each image: ``[N]`` integers."""
        ...

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` features: the space FID is measured in."""
        ...


@dataclass
class SecondJudge:
    """Another judge, beside the first: its FID reference (``[M, C, H, W]`` in [-1, 1]; real images
    it was not trained on) and what metrics.json says about it (``second_judge``)."""

    judge: Judge
    reference_images: np.ndarray
    report: dict = field(default_factory=dict)


@dataclass
class JudgeBundle:
    """What a judge factory returns: the judge, optionally held-out real images (``[N, C, H, W]``
    in [-1, 1]: the FID reference) and their labels, and optionally a second judge."""

    judge: Judge
    real_images: np.ndarray | None = None
    real_labels: np.ndarray | None = None
    second: SecondJudge | None = None


KEY = "evaluate.judge"


def judge_factory(spec: str):
    """The function ``spec`` (``"module:function"``) names, imported; ConfigError naming
    ``evaluate.judge`` when it cannot be."""
    module_name, sep, function = spec.partition(":")
    if not sep or not module_name.strip() or not function.strip():
        raise ConfigError(f"{KEY}: {spec!r} is not 'module:function' (a judge factory, e.g. "
                          "'my_project.judges:load'), or leave it empty for no classifier judge")
    try:
        module = importlib.import_module(module_name.strip())
    except ImportError as err:
        raise ConfigError(f"{KEY}: cannot import module {module_name.strip()!r} of {spec!r} ({err}); it must be "
                          "importable from the folder evaluate runs in, or installed") from None
    factory = getattr(module, function.strip(), None)
    if not callable(factory):
        raise ConfigError(f"{KEY}: module {module_name.strip()!r} has no function {function.strip()!r} ({spec!r})")
    return factory


def load_judges(spec: str, base_id: str) -> JudgeBundle | None:
    """The bundle the factory ``spec`` gives for the base ``base_id``; None without a factory (an
    empty ``spec``) or where the factory has no judge for that base."""
    if not spec:
        return None
    bundle = judge_factory(spec)(base_id)
    if bundle is not None and not isinstance(bundle, JudgeBundle):
        raise ConfigError(f"{KEY}: {spec!r} returned {type(bundle).__name__}, not a JudgeBundle "
                          "(agd_pipeline.judges) or None")
    return bundle


class JudgeFeatures(torch.nn.Module):
    """clean-fid's custom feature extractor over a judge: ``[B, 3, H, W]`` in 0..255 (how clean-fid
    reads the PNGs) -> the judge's features. Grey images (three equal channels: how clean-fid reads
    a grey PNG) reach the judge as the one channel they were written from."""

    def __init__(self, judge: Judge):
        super().__init__()
        self.judge = judge

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if images.shape[1] == 3 and bool((images == images[:, :1]).all()):
            images = images[:, :1]
        return self.judge.features(images / 255.0 * 2.0 - 1.0)
