"""The embedded defaults' judges (``evaluate.judge: defaults.judges:embedded_judges``): the digit
classifier a default's base folder carries (classifier/; pooled to 8x8 for the 16x16 text
defaults), its held-out digits (holdout.npz) as the FID reference, and the second judge
(:mod:`defaults.second_judge`) trained on half of them. The judge protocol is
:mod:`agd_pipeline.judges`."""

from __future__ import annotations

import torch

from agd_pipeline.judges import JudgeBundle, SecondJudge


class ClassifierJudge:
    """A digit classifier as a judge: ``predict`` its most likely class, ``features`` its
    penultimate layer (the FID feature space of the defaults)."""

    def __init__(self, classifier: torch.nn.Module):
        self.classifier = classifier

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images).argmax(1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(grey(images))


def grey(images: torch.Tensor) -> torch.Tensor:
    """The judges read grey images: the mean of three channels (the defaults' own images are grey)."""
    return images.mean(dim=1, keepdim=True) if images.shape[1] == 3 else images


def embedded_judges(base_id: str) -> JudgeBundle | None:
    """The judges of an embedded default's base folder; None for a folder without a classifier (a
    user's own model, a hub id)."""
    from defaults.textdigits import load_judge
    from defaults.toy import load_holdout

    classifier = load_judge(base_id)
    if classifier is None:
        return None
    holdout = load_holdout(base_id)
    if holdout is None:
        return JudgeBundle(ClassifierJudge(classifier))
    from defaults.second_judge import train_second_judge

    second, accuracy, reference = train_second_judge(*holdout)
    report = {"architecture": "pixel MLP (64 -> 128 -> 48 features -> 10), no convolution",
              "trained_on": f"{len(holdout[1]) - len(reference)} of the held-out digits",
              "fid_reference": f"the other {len(reference)} held-out digits",
              "accuracy_on_its_reference_digits": accuracy}
    return JudgeBundle(ClassifierJudge(classifier), real_images=holdout[0], real_labels=holdout[1],
                       second=SecondJudge(ClassifierJudge(second), holdout[0][reference], report))
