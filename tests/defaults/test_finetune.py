"""stages.finetune: fine-tuned derivatives of the class default (full and LoRA), for the
fine-tuned-derivatives experiment (pipelines/derivatives/dvc.yaml)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from agd_pipeline.adapters import AdaptedModel, AdapterConfig, load_adapted_model, save_adapters
from agd_pipeline.config import load_config
from defaults.config import FinetuneConfig
from agd_pipeline.errors import ConfigError, ModelError
from defaults.finetune import DERIVATIVE_ENTRIES, finetune, ink, shifted_subset
from agd_pipeline.models import load_base_model

from conftest import REPO, run_main


def _digits(n_per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), n_per_class)
    images = rng.uniform(-1, 1, size=(len(labels), 1, 8, 8)).astype(np.float32)
    return images, labels


@pytest.fixture(scope="module")
def default_like_base(tmp_path_factory, tiny_base_dir):
    """The tiny DiT with what the base stage writes beside it: train.npz, holdout.npz, classifier/."""
    folder = tmp_path_factory.mktemp("default") / "base"
    shutil.copytree(tiny_base_dir, folder)
    x, y = _digits(6, 0)
    np.savez_compressed(folder / "train.npz", latents=x, labels=y)
    x, y = _digits(3, 1)
    np.savez_compressed(folder / "holdout.npz", images=x, labels=y)
    (folder / "classifier").mkdir()
    (folder / "classifier" / "config.json").write_text("{}")
    return folder


def _config(base, out, **overrides):
    return load_config(FinetuneConfig, {"base_model": str(base), "out_dir": str(out), "steps": 4, "batch_size": 8,
                                        **overrides})


def test_shifted_subset_takes_each_class_boldest_or_thinnest_third():
    images = np.full((12, 1, 2, 2), -1.0, np.float32)
    labels = np.array([0] * 6 + [1] * 6)
    for i in range(12):
        images[i, 0, 0, 0] = -1.0 + 0.1 * (i % 6)  # ink grows with i within each class
    assert shifted_subset(images, labels, "bold").tolist() == [4, 5, 10, 11]
    assert shifted_subset(images, labels, "thin").tolist() == [0, 1, 6, 7]
    assert ink(images)[5] > ink(images)[0]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_derivative_keeps_the_architecture_and_changes_what_its_mode_trains(default_like_base, tmp_path, mode):
    original = load_base_model(str(default_like_base))
    before = {k: v.clone() for k, v in original.net.state_dict().items()}
    out = tmp_path / mode
    meta = finetune(_config(default_like_base, out, mode=mode, learning_rate=0.05), progress=False)
    derived = load_base_model(str(out))
    assert derived.architecture_fingerprint() == original.architecture_fingerprint()
    assert derived.weights_fingerprint() != original.weights_fingerprint()
    assert meta["derived_from_weights"] == original.weights_fingerprint()
    after = derived.net.state_dict()
    assert set(after) == set(before)  # a merged LoRA leaves no extra weights behind
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    attention = {k for k in before if any(f".attn1.{p}." in k for p in ("to_q", "to_k", "to_v", "to_out.0"))}
    if mode == "lora":
        assert changed and changed <= attention  # only the projections the LoRA wrapped
        assert meta["trained_parameters"] < 0.2 * sum(v.numel() for v in before.values())
    else:
        assert changed - attention  # a full fine-tune moves the rest too
    # the derivative's held-out digits are the bold third of each class of the original's
    with np.load(default_like_base / "holdout.npz") as hold, np.load(out / "holdout.npz") as kept:
        assert len(kept["labels"]) == 10  # 1 of 3 per class
        for c in range(10):
            mine = ink(kept["images"][kept["labels"] == c])
            theirs = ink(hold["images"][hold["labels"] == c])
            assert mine.min() == theirs.max()
    assert {p.name for p in out.iterdir()} <= DERIVATIVE_ENTRIES


def test_original_adapters_load_into_a_derivative_with_a_warning(default_like_base, tmp_path):
    base = load_base_model(str(default_like_base))
    adapted = AdaptedModel(base, AdapterConfig(width=4, embed_dim=8, num_classes=base.num_classes))
    save_adapters(adapted, tmp_path / "adapters", extra={"sampler": {"num_steps": 4},
                                                         "guidance": {"min": 1.0, "max": 6.0}})
    finetune(_config(default_like_base, tmp_path / "derived"), progress=False)
    with pytest.warns(UserWarning, match="e.g. a fine-tune"):
        loaded = load_adapted_model(tmp_path / "adapters", load_base_model(str(tmp_path / "derived")))
    assert loaded.base.model_id.endswith("derived")


@pytest.mark.bad_input
def test_refuses_foreign_folders_and_bad_bases(default_like_base, tiny_base_dir, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="not a finetune output"):
        finetune(_config(default_like_base, foreign), progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    # a base without the default's training digits
    with pytest.raises(ModelError, match="train.npz"):
        finetune(_config(tiny_base_dir, tmp_path / "x"), progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="finetune.learning_rate"):
        _config(default_like_base, tmp_path / "y", learning_rate=0.0)
    # its own earlier output is replaced whole
    own = tmp_path / "own"
    finetune(_config(default_like_base, own), progress=False)
    first = json.loads((own / "agd_base.json").read_text())
    finetune(_config(default_like_base, own, subset="thin"), progress=False)
    assert json.loads((own / "agd_base.json").read_text())["subset"] == "thin" != first["subset"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".own.")]  # no staging left behind


def test_cli_and_the_derivatives_pipeline(default_like_base, tmp_path):
    result = run_main("stages.finetune", "--params", "pipelines/derivatives/lora.yaml", "--base-model",
                     default_like_base, "--out-dir", tmp_path / "lora", "--steps", "3", "--batch-size", "8",
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "fine-tuned derivative (lora)" in result.stdout
    assert json.loads((tmp_path / "lora" / "resolved_config.json").read_text())["finetune"]["mode"] == "lora"
    # the pipeline tracks every result key of finetune, and both params files set them
    stages = yaml.safe_load((REPO / "pipelines/derivatives/dvc.yaml").read_text())["stages"]
    listed = {p for entry in stages["finetune"]["do"]["params"] for p in next(iter(entry.values()))}
    expected = {f"finetune.{f.name}" for f in dataclasses.fields(FinetuneConfig) if f.name != "out_dir"}
    assert listed == expected
    for kind in ("full", "lora"):
        params = yaml.safe_load((REPO / f"pipelines/derivatives/{kind}.yaml").read_text())
        assert params["finetune"]["mode"] == kind and params["generate"]["base_model"] == params["finetune"]["out_dir"]
        load_config(FinetuneConfig, params["finetune"])
    assert "--adapters data/adapters" in stages["evaluate_original"]["do"]["cmd"]


def test_the_sd3_derivatives_pipeline_retrains_with_the_sd3_defaults_settings():
    """pipelines/derivatives-sd3: the finetune stage tracks every result key, each section is valid,
    the chain's paths follow one another, and generate and train are the SD3 default's settings
    (pipelines/text/sd3.yaml) but for the paths, so "retrained" means retrained like the default."""
    from agd_pipeline.config import EvaluateConfig, GenerateConfig, TrainConfig

    folder = REPO / "pipelines/derivatives-sd3"
    stages = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((folder / "params.yaml").read_text())
    listed = {p for entry in stages["finetune"]["params"] for p in next(iter(entry.values()))}
    assert listed == {f"finetune.{f.name}" for f in dataclasses.fields(FinetuneConfig) if f.name != "out_dir"}
    for cls in (FinetuneConfig, GenerateConfig, TrainConfig, EvaluateConfig):
        load_config(cls, params[cls.section])
    assert params["finetune"]["base_model"] == "pretrained/text-sd3"
    assert params["generate"]["base_model"] == params["finetune"]["out_dir"]
    assert params["train"]["store"] == params["generate"]["out_dir"]
    assert params["evaluate"]["adapters"] == params["train"]["out_dir"]
    assert "--adapters data/text/sd3/adapters" in stages["evaluate_original"]["cmd"]
    default = yaml.safe_load((REPO / "pipelines/text/sd3.yaml").read_text())
    for section in ("generate", "train"):
        differs = {k for k in default[section] if default[section][k] != params[section].get(k)}
        assert differs <= {"base_model", "out_dir", "store", "prompts_file", "negative_prompts_file"}, section


def _damage_truncated(folder):
    data = (folder / "train.npz").read_bytes()
    (folder / "train.npz").write_bytes(data[: len(data) // 2])


def _damage_short_labels(folder):
    with np.load(folder / "train.npz") as data:
        latents, labels = data["latents"], data["labels"]
    np.savez_compressed(folder / "train.npz", latents=latents, labels=labels[:3])


def _damage_nan(folder):
    with np.load(folder / "train.npz") as data:
        latents, labels = data["latents"], data["labels"]
    np.savez_compressed(folder / "train.npz", latents=np.full_like(latents, np.nan), labels=labels)


def _damage_shape(folder):
    with np.load(folder / "train.npz") as data:
        latents, labels = data["latents"], data["labels"]
    np.savez_compressed(folder / "train.npz", latents=latents[:, :, :4], labels=labels)


def _damage_labels(folder):
    with np.load(folder / "train.npz") as data:
        latents, labels = data["latents"], data["labels"]
    np.savez_compressed(folder / "train.npz", latents=latents, labels=labels + 10)


@pytest.mark.bad_input
@pytest.mark.parametrize("damage, expect", [
    (_damage_truncated, "cannot read the base's train.npz"),
    (_damage_short_labels, "labels has shape (3,)"),
    (_damage_nan, "values that are NaN or infinite"),
    (_damage_shape, "latents has shape"),
    (_damage_labels, "labels must be integers in [0, 10)"),
], ids=["truncated", "labels shorter than latents", "all NaN", "wrong shape", "labels out of range"])
def test_damaged_training_data_is_refused_before_training(default_like_base, tmp_path, damage, expect):
    """Never a traceback, never a model trained on 3 images or on NaN: one error naming the file."""
    base = tmp_path / "base"
    shutil.copytree(default_like_base, base)
    damage(base)
    with pytest.raises(ModelError) as err:
        finetune(_config(base, tmp_path / "out"), progress=False)
    assert str(base / "train.npz") in str(err.value) and expect in str(err.value)
    assert not (tmp_path / "out").exists()
