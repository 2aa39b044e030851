"""Stage two: trains from the store alone, learns, resumes to the uninterrupted result, refuses bad stores."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import agd_pipeline.generation
import agd_pipeline.sampling
import defaults.toy
import agd_pipeline.training as training
from agd_pipeline.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdaptedModel, load_adapted_model
from agd_pipeline.config import TrainConfig, load_config
from agd_pipeline.errors import AgdError, ModelError, StoreError
from agd_pipeline.models import BaseModel, load_base_model
from agd_pipeline.store import MANIFEST, TrajectoryStore

from conftest import generate_store, make_base_folder, read_all_shards

QUIET = dict(progress=False, log=lambda *a, **k: None)


def train_config(store, out_dir, **overrides) -> TrainConfig:
    settings = {"store": str(store), "out_dir": str(out_dir), "steps": 6, "batch_size": 16, "width": 8,
                "embed_dim": 16, "device": "cpu", "checkpoint_every": 0, "seed": 0,
                "validate_every": -1}  # no validation grids (their tests ask for them)
    return load_config(TrainConfig, {**settings, **overrides})


def kept_checkpoint(folder) -> int:
    """The step of the checkpoint a finished run keeps in ``folder`` (marked finished: a larger
    train.steps continues from it); fails where there is none."""
    state = json.loads((folder / training.CHECKPOINT / "state.json").read_text())
    assert state.get(training.FINISHED) is True, f"the checkpoint in {folder} is not marked finished"
    assert not (folder / (training.CHECKPOINT + ".tmp")).exists()
    return state["step"]


def read_losses(folder) -> list[tuple[int, float]]:
    with open(folder / training.LOSS_CSV) as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def forbid(monkeypatch, target, name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"training called {name}: it must read nothing but the store")

    monkeypatch.setattr(target, name, refuse)


def test_training_reads_only_the_store(tiny_store, tmp_path, monkeypatch):
    forbid(monkeypatch, BaseModel, "cfg_predict")
    forbid(monkeypatch, agd_pipeline.sampling, "sample")
    forbid(monkeypatch, agd_pipeline.generation, "record_batch")
    forbid(monkeypatch, agd_pipeline.generation, "generate")
    forbid(monkeypatch, defaults.toy, "load_digits_split")
    forbid(monkeypatch, defaults.toy, "train_base")
    out = tmp_path / "adapters"
    grids = []  # the validation grid samples the base (a picture for people), only once training is over

    def grid(adapted, out_dir, *args):  # made on the model in training, once its adapters are saved
        grids.append((out_dir, [step for step, _ in read_losses(out)], (out_dir / ADAPTER_WEIGHTS).exists()))

    monkeypatch.setattr(training, "_validation_grid", grid)
    result = training.train(train_config(tiny_store, out, steps=3, validate_every=0), **QUIET)
    assert (out / ADAPTER_WEIGHTS).exists() and (out / ADAPTER_CONFIG).exists()
    assert [step for step, _ in read_losses(out)] == [1, 2, 3]
    assert result["final_loss"] is not None and np.isfinite(result["final_loss"])
    assert kept_checkpoint(out) == 3  # kept although checkpoint_every is 0: "only at the end"
    assert grids == [(out, [1, 2, 3], True)]


@pytest.fixture(scope="module")
def trained(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "adapters"
    training.train(train_config(tiny_store, out, steps=60, batch_size=32), **QUIET)
    return out


def test_loss_decreases(trained):
    losses = read_losses(trained)
    assert [step for step, _ in losses] == list(range(1, 61))
    values = np.array([loss for _, loss in losses])
    assert np.isfinite(values).all()
    first, last = values[:10].mean(), values[-10:].mean()
    assert last < 0.9 * first, f"loss did not go down: first 10 steps {first:.4f}, last 10 {last:.4f}"


def test_trained_adapters_move_the_base_towards_the_cfg_targets(trained, tiny_store, tiny_base_dir):
    """Over the whole store, AGD (1 call) is closer to the recorded CFG output than the bare base."""
    base = load_base_model(str(tiny_base_dir))
    model = load_adapted_model(trained, base)
    config = json.loads((trained / ADAPTER_CONFIG).read_text())
    assert config["base_model"]["weights_fingerprint"] == base.weights_fingerprint()
    assert config["sampler"]["num_steps"] == 4 and config["guidance"]["max"] == 6.0
    errors_base, errors_agd = [], []
    for data in read_all_shards(tiny_store).values():
        steps = data["timesteps"].shape[1]
        x = torch.from_numpy(data["model_input"]).float().flatten(0, 1)
        target = torch.from_numpy(data["guided_output"]).float().flatten(0, 1)
        t = torch.from_numpy(data["timesteps"]).flatten()
        labels = torch.from_numpy(data["class_label"]).repeat_interleave(steps)
        w = torch.from_numpy(data["guidance_scale"]).repeat_interleave(steps)
        with torch.no_grad():
            errors_base.append(((base.predict(x, t, labels) - target) ** 2).mean().item())
            errors_agd.append(((model(x, t, labels, w) - target) ** 2).mean().item())
    model.remove()
    assert np.mean(errors_agd) < 0.9 * np.mean(errors_base), (errors_agd, errors_base)


class Interrupted(Exception):
    pass


@pytest.mark.crash
def test_checkpoint_then_resume_equals_uninterrupted(tiny_store, tmp_path, monkeypatch):
    k = 4
    straight = tmp_path / "straight"
    training.train(train_config(tiny_store, straight, steps=2 * k), **QUIET)

    resumed = tmp_path / "resumed"
    original = training._save_checkpoint

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise Interrupted("killed right after the checkpoint")

    monkeypatch.setattr(training, "_save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        training.train(train_config(tiny_store, resumed, steps=2 * k, checkpoint_every=k), **QUIET)
    monkeypatch.undo()
    checkpoint = resumed / training.CHECKPOINT
    assert json.loads((checkpoint / "state.json").read_text())["step"] == k
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(training.CHECKPOINT_FILES)
    assert not (resumed / ADAPTER_WEIGHTS).exists()

    messages, forward_calls = [], []
    forward = AdaptedModel.forward

    def counting_forward(self, *args, **kwargs):
        forward_calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(AdaptedModel, "forward", counting_forward)
    training.train(train_config(tiny_store, resumed, steps=2 * k, checkpoint_every=k), progress=False,
                   log=messages.append)
    monkeypatch.undo()
    assert len(forward_calls) == k, "the resumed run did not start from the checkpoint's step"
    assert any(f"resuming from {checkpoint} at step {k}" in m for m in messages), messages
    assert kept_checkpoint(resumed) == 2 * k, "the finished run did not keep its last checkpoint"

    expected, got = load_file(straight / ADAPTER_WEIGHTS), load_file(resumed / ADAPTER_WEIGHTS)
    assert sorted(expected) == sorted(got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-6, msg=key)
    # losses of the resumed run continue those of the uninterrupted one, step for step
    straight_losses, resumed_losses = read_losses(straight), read_losses(resumed)
    assert [s for s, _ in resumed_losses] == list(range(1, 2 * k + 1))
    np.testing.assert_allclose([v for _, v in resumed_losses], [v for _, v in straight_losses], rtol=1e-5)
    # not vacuous: the adapters did change from their zero-initialised output layers
    assert any(got[key].abs().max() > 0 for key in got if key.endswith("up.weight"))


def interrupted_training(store, out, monkeypatch, **overrides) -> None:
    """A run of 6 steps killed right after its first checkpoint (step 2)."""
    original = training._save_checkpoint

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise Interrupted

    monkeypatch.setattr(training, "_save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        training.train(train_config(store, out, steps=6, checkpoint_every=2, **overrides), **QUIET)
    monkeypatch.undo()
    assert (out / training.CHECKPOINT / "state.json").exists()


@pytest.mark.bad_input
def test_resume_refuses_a_checkpoint_with_other_settings(tiny_store, tmp_path, monkeypatch):
    out = tmp_path / "adapters"
    interrupted_training(tiny_store, out, monkeypatch)
    with pytest.raises(AgdError, match="train.learning_rate"):
        training.train(train_config(tiny_store, out, steps=6, checkpoint_every=2, learning_rate=1e-2), **QUIET)


@pytest.mark.bad_input
def test_incomplete_store_is_refused(tiny_base_dir, tmp_path, monkeypatch):
    root = tmp_path / "store"
    calls = []
    original = agd_pipeline.generation.record_batch

    def die_on_second(*args, **kwargs):
        if calls:
            raise Interrupted
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(agd_pipeline.generation, "record_batch", die_on_second)
    with pytest.raises(Interrupted):
        generate_store(tiny_base_dir, root, classes=[0, 1], trajectories_per_class=2, shard_size=2,
                       batch_size=2)
    monkeypatch.undo()
    out = tmp_path / "adapters"
    with pytest.raises(StoreError) as err:
        training.train(train_config(root, out), **QUIET)
    assert "shard-000001.zarr" in str(err.value)
    assert "stages.generate" in str(err.value)
    assert not (out / ADAPTER_WEIGHTS).exists()


@pytest.mark.bad_input
def test_corrupted_store_is_refused_with_full_verify(tiny_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(tiny_store, root)
    chunk = sorted(p for p in (root / "shard-000000.zarr" / "model_input" / "c").rglob("*") if p.is_file())[0]
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(StoreError, match="shard-000000.zarr"):
        training.train(train_config(root, tmp_path / "adapters", verify="full"), **QUIET)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_cheap_check_catches_truncated_and_deleted_chunks(tiny_store, tmp_path, damage):
    root = tmp_path / "store"
    shutil.copytree(tiny_store, root)
    chunk = sorted(p for p in (root / "shard-000001.zarr" / "guided_output" / "c").rglob("*") if p.is_file())[0]
    if damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:10])
    else:
        chunk.unlink()  # zarr would read it back as zeros
    expected = "truncated" if damage == "truncate" else "chunk files"
    with pytest.raises(StoreError, match=rf"shard-000001.zarr/guided_output: .*{expected}"):
        training.train(train_config(root, tmp_path / "adapters", verify="cheap"), **QUIET)
    assert not (tmp_path / "adapters" / ADAPTER_WEIGHTS).exists()


def test_loader_names_a_chunk_it_cannot_read(tiny_store, tmp_path):
    """Damage after the check (or not caught by the cheap one) stops the loader with the shard named."""
    from agd_pipeline.loader import StepBatches

    root = tmp_path / "store"
    shutil.copytree(tiny_store, root)
    store = TrajectoryStore(root)
    chunk = sorted(p for p in (root / "shard-000000.zarr" / "model_input" / "c").rglob("*") if p.is_file())[0]
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(StoreError, match=r"shard-000000.zarr/model_input.*--verify"):
        for _ in zip(range(100), StepBatches(store, 4, seed=0)):
            pass


@pytest.mark.bad_input
def test_store_of_changed_base_is_refused(tmp_path):
    base_dir = make_base_folder(tmp_path / "base", seed=0)
    root = tmp_path / "store"
    generate_store(base_dir, root, classes=[0, 1], trajectories_per_class=1)
    assert TrajectoryStore(root).problems(full=True) == []
    shutil.rmtree(base_dir)
    make_base_folder(base_dir, seed=1)  # same path, other weights: the targets no longer fit
    with pytest.raises(ModelError, match="generate"):
        training.train(train_config(root, tmp_path / "adapters"), **QUIET)


@pytest.mark.bad_input
def test_missing_store_is_refused(tmp_path):
    with pytest.raises(StoreError, match=MANIFEST):
        training.train(train_config(tmp_path / "nowhere", tmp_path / "adapters"), **QUIET)


def test_moved_base_can_be_named_explicitly(tmp_path):
    """The manifest records the base path as given; a moved base is found again via train.base_model,
    and the weights fingerprint still guards against pointing at another model."""
    original = make_base_folder(tmp_path / "base", seed=0)
    root = tmp_path / "store"
    generate_store(original, root, classes=[0, 1], trajectories_per_class=1)
    moved = tmp_path / "elsewhere" / "base"
    moved.parent.mkdir()
    shutil.move(str(original), str(moved))
    with pytest.raises(ModelError, match="no such folder"):
        training.train(train_config(root, tmp_path / "a"), **QUIET)
    training.train(train_config(root, tmp_path / "b", base_model=str(moved)), **QUIET)
    assert (tmp_path / "b" / ADAPTER_WEIGHTS).exists()
    other = make_base_folder(tmp_path / "other", seed=1)
    with pytest.raises(ModelError, match="train.base_model"):
        training.train(train_config(root, tmp_path / "c", base_model=str(other)), **QUIET)


@pytest.mark.bad_input
def test_adapter_settings_that_do_not_fit_the_store_are_refused(tiny_store, tmp_path):
    from agd_pipeline.errors import ConfigError

    base = {"store": str(tiny_store), "out_dir": str(tmp_path / "a"), "steps": 2, "device": "cpu"}
    with pytest.raises(ConfigError, match=r"train.condition_on: \['text'\] do not apply to this class-conditional"):
        training.train(load_config(TrainConfig, {**base, "condition_on": ["guidance", "text"]}), **QUIET)
    with pytest.raises(ConfigError, match="train.placement: .*'cross_attention' is not defined for the 'dit' family"):
        training.train(load_config(TrainConfig, {**base, "placement": "cross_attention"}), **QUIET)
