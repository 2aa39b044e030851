"""Validation grids during training (issue 30), the way diffusers' training examples make them:
train.validation_prompt and train.validation_w (repeatable options), grids captioned with the prompt
and w, the base and text encoders loaded once per run, the images logged to the tracker."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import agd_pipeline.training as training
from agd_pipeline.cli import build_parser, config_from_args
from agd_pipeline.config import TrainConfig
from agd_pipeline.errors import ConfigError
from agd_pipeline.figures import caption, captioned_grid
from agd_pipeline.generation import generate
from agd_pipeline.validation import VALIDATION, VALIDATION_SAMPLES

from test_training import QUIET, train_config

PROMPTS = ["a red cat", "blue sky", "an old oak"]


def image_tags(out) -> dict[str, list[int]]:
    """{tag: [steps]} of the image summaries in the tensorboard event files under out/tracking."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((out / "tracking").rglob("events.out.tfevents.*"))
    assert files, f"no tensorboard event file under {out / 'tracking'}"
    tags: dict[str, list[int]] = {}
    for path in files:
        events = EventAccumulator(str(path), size_guidance={"images": 0})
        events.Reload()
        for tag in events.Tags()["images"]:
            tags.setdefault(tag, []).extend(event.step for event in events.Images(tag))
    return tags


@pytest.fixture(scope="module")
def text_store(text_pipeline_dirs, tmp_path_factory):
    """A tiny SD store: 3 prompts, 2 trajectories each, 3 steps."""
    from agd_pipeline.config import GenerateConfig, load_config

    root = tmp_path_factory.mktemp("validation_text")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    config = load_config(GenerateConfig, {"base_model": str(text_pipeline_dirs["sd"]), "out_dir": str(root / "store"),
                                          "prompts_file": str(root / "prompts.txt"), "trajectories_per_prompt": 2,
                                          "guidance_min": 2.0, "guidance_max": 12.0, "num_steps": 3,
                                          "batch_size": 6, "shard_size": 6, "device": "cpu", "seed": 0})
    generate(config, **QUIET)
    return root / "store"


def test_tensorboard_receives_each_grid_tagged_by_step_and_w(tiny_store, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "adapters"
    training.train(train_config(tiny_store, out, steps=4, validate_every=2, report_to="tensorboard",
                                validation_w=[1.5, 3.0]), **QUIET)
    tags = image_tags(out)
    assert tags == {f"validation/step-{step:06d}/w={w}": [step] for step in (2, 4) for w in ("1.5", "3")}
    assert sorted(p.name for p in (out / VALIDATION).iterdir()) == ["step-000002.png", "step-000004.png"]


def test_a_text_run_loads_the_base_and_the_text_encoders_once(text_store, tmp_path, monkeypatch):
    """Three grids (steps 1, 2 and the last), each at two w with CFG and AGD: the text encoders are
    loaded once (one DiffusionPipeline.from_pretrained, in encode_prompts), the denoiser once (training's
    own), the VAE once (attached to it at the first grid), and the prompts given are encoded once."""
    import diffusers

    import agd_pipeline.models as models

    loads: dict[str, int] = {}
    pipeline_load, component_load = diffusers.DiffusionPipeline.from_pretrained.__func__, models.load_component

    def counting_pipeline(cls, *args, **kwargs):
        loads["text encoders"] = loads.get("text encoders", 0) + 1
        return pipeline_load(cls, *args, **kwargs)

    def counting_component(cls, name, subfolder, *args, **kwargs):  # the denoiser's and the VAE's weights
        loads[subfolder] = loads.get(subfolder, 0) + 1
        return component_load(cls, name, subfolder, *args, **kwargs)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(counting_pipeline))
    monkeypatch.setattr(models, "load_component", counting_component)
    seen = []
    encode = models.encode_prompts

    def spying_encode(base, prompts, *args, **kwargs):
        seen.append(list(prompts))
        return encode(base, prompts, *args, **kwargs)

    monkeypatch.setattr(models, "encode_prompts", spying_encode)
    import agd_pipeline.inference as inference
    monkeypatch.setattr(inference, "encode_prompts", spying_encode)

    out = tmp_path / "adapters"
    asked = ["a green, tall tree with many leaves in the wind at dusk", "blue sky"]
    training.train(train_config(text_store, out, steps=3, batch_size=8, validate_every=1, validation_prompt=asked,
                                validation_w=[2.0, 7.5]), **QUIET)
    grids = sorted(p.name for p in (out / VALIDATION).iterdir())
    assert grids == ["step-000001.png", "step-000002.png", "step-000003.png"]
    assert loads == {"unet": 1, "text encoders": 1, "vae": 1}
    assert seen == [asked]
    grid = np.asarray(Image.open(out / VALIDATION / grids[-1]).convert("L"))
    assert grid.std() > 10


@pytest.mark.bad_input
def test_validation_prompts_are_refused_for_a_class_model_before_training(tiny_store, tmp_path):
    out = tmp_path / "adapters"
    with pytest.raises(ConfigError, match="train.validation_prompt: .* class-conditional .* takes class ids"):
        training.train(train_config(tiny_store, out, validate_every=0, validation_prompt=["a cat"]), **QUIET)
    assert not (out / training.CHECKPOINT).exists() and not (out / VALIDATION).exists()


@pytest.mark.parametrize("key, value, match", [
    ("validation_w", [2.0, 80.0], r"train.validation_w: each value must lie in \[0, 50\]"),
    ("validation_w", [2.0] * 17, "train.validation_w: must be at most 16 guidance scales"),
    ("validation_w", [float("nan")], "train.validation_w"),
    ("validation_prompt", ["a cat", "  "], "train.validation_prompt: must be at most 16 prompts, none empty"),
    ("validation_prompt", [f"p{i}" for i in range(17)], "train.validation_prompt"),
])
def test_validation_settings_are_checked(tiny_store, tmp_path, key, value, match):
    with pytest.raises(ConfigError, match=match):
        train_config(tiny_store, tmp_path / "a", **{key: value})


def test_validation_options_repeat_on_the_command_line(tmp_path):
    (tmp_path / "params.yaml").write_text("train: {}\n")
    parser = build_parser(TrainConfig, "train", "")
    args = parser.parse_args(["--params", str(tmp_path / "params.yaml"), "--store", "s",
                              "--out-dir", str(tmp_path / "o"),
                              "--validation-prompt", "a cat, sitting on a mat", "--validation-prompt", "blue sky",
                              "--validation-w", "2,4.5", "--validation-w", "6"])
    config = config_from_args(TrainConfig, args)
    assert config.validation_prompt == ["a cat, sitting on a mat", "blue sky"]
    assert config.validation_w == [2.0, 4.5, 6.0]
    assert "validation_prompt" in training.RESUMABLE_KEYS and "validation_w" in training.RESUMABLE_KEYS


def test_a_captioned_grid_shows_its_captions_beside_the_images():
    assert caption("a  photo\nof a cat") == "a photo of a cat"
    long = caption("word " * 30)
    assert len(long) == 40 and long.endswith("…")
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    images[...] = (10, 200, 30)  # a green no text pixel has
    blocks = {"CFG w=2": images, "AGD w=2": images}
    short = captioned_grid(blocks, ["a", "b"], VALIDATION_SAMPLES)
    wide = captioned_grid(blocks, ["a much longer prompt", "b"], VALIDATION_SAMPLES, "title")
    assert wide.width > short.width and wide.height > short.height  # room for the caption and the title
    pixels = np.asarray(wide.convert("L"))
    left = pixels[:, : wide.width - 2 * (VALIDATION_SAMPLES * 8 + 6)]
    assert (left < 128).any()  # text drawn beside the images
    green = (np.asarray(wide) == (10, 200, 30)).all(-1)
    assert green.sum() == 2 * 4 * 8 * 8  # every image pasted once
