"""evaluate.judge (issue 31): the judges come from a factory the params name, not from the library; a
factory that cannot be imported is a one-line ConfigError naming the key, and the embedded defaults'
factory gives their classifiers, held-out digits and second judge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agd_pipeline.config import EvaluateConfig
from agd_pipeline.errors import ConfigError
from agd_pipeline.judges import Judge, JudgeBundle, JudgeFeatures, judge_factory, load_judges
from conftest import EMBEDDED_JUDGE, REPO


@pytest.mark.bad_input
@pytest.mark.parametrize("spec, message", [
    ("no_such_module_here:load", "cannot import module 'no_such_module_here'"),
    ("json:no_such_function", "has no function 'no_such_function'"),
    ("json", "is not 'module:function'"),
    (":load", "is not 'module:function'"),
])
def test_a_factory_that_cannot_be_imported_is_a_config_error_naming_the_key(spec, message):
    with pytest.raises(ConfigError, match="evaluate.judge") as raised:
        judge_factory(spec)
    assert message in str(raised.value)


def test_the_config_checks_the_form_and_leaves_empty_alone():
    EvaluateConfig().check()  # built-in: no judge
    EvaluateConfig(judge=EMBEDDED_JUDGE).check()
    with pytest.raises(ConfigError, match="evaluate.judge"):
        EvaluateConfig(judge="defaults.judges").check()


def test_no_factory_or_no_judge_for_the_base_is_none(tmp_path):
    assert load_judges("", str(REPO / "pretrained" / "toy-dit")) is None
    assert load_judges(EMBEDDED_JUDGE, str(tmp_path)) is None  # a folder without a classifier
    assert load_judges(EMBEDDED_JUDGE, "someorg/some-model") is None  # a hub id


def test_a_factory_must_return_a_bundle(monkeypatch):
    import json

    monkeypatch.setattr(json, "not_a_factory", lambda base: "a judge", raising=False)
    with pytest.raises(ConfigError, match="returned str, not a JudgeBundle"):
        load_judges("json:not_a_factory", "base")


def test_the_embedded_factory_gives_the_class_defaults_judges():
    bundle = load_judges(EMBEDDED_JUDGE, str(REPO / "pretrained" / "toy-dit"))
    assert isinstance(bundle, JudgeBundle) and isinstance(bundle.judge, Judge)
    assert bundle.real_images.shape[1:] == (1, 8, 8) and len(bundle.real_labels) == len(bundle.real_images)
    images = torch.from_numpy(bundle.real_images[:50])
    assert (bundle.judge.predict(images).numpy() == bundle.real_labels[:50]).mean() > 0.9
    assert bundle.judge.features(images).shape == (50, 32)
    second = bundle.second
    assert isinstance(second.judge, Judge) and second.judge.features(images).shape == (50, 48)
    assert 0 < len(second.reference_images) < len(bundle.real_images)
    assert second.report["accuracy_on_its_reference_digits"] > 0.8


def test_judge_features_reads_grey_pngs_as_one_channel():
    """clean-fid reads a grey PNG as three equal channels: the judge sees the one channel (the first
    judge's features of the class default's digits, exactly as before the judges were a protocol);
    colour images reach it as they are."""
    seen = []

    class Recorder:
        def predict(self, images):
            return images.flatten(1).sum(1).long()

        def features(self, images):
            seen.append(images)
            return images.flatten(1)

    grey = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 1, 8, 8))).float()
    JudgeFeatures(Recorder())(grey.expand(-1, 3, -1, -1))
    assert seen[-1].shape == (4, 1, 8, 8) and torch.equal(seen[-1], grey / 255.0 * 2.0 - 1.0)
    colour = torch.rand(4, 3, 8, 8) * 255
    JudgeFeatures(Recorder())(colour)
    assert seen[-1].shape == (4, 3, 8, 8)
