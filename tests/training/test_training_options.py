"""Training options of stage two beyond the defaults: gradient accumulation, gradient checkpointing
through the frozen base, the diffusers learning-rate schedules, the fused optimiser, the EMA of the
adapter weights (saved, and resumed bit for bit), trackers, and validation grids."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import agd_pipeline.training as training
from agd_pipeline.adapters import ADAPTER_WEIGHTS, AdaptedModel
from agd_pipeline.errors import ConfigError

from test_training import QUIET, interrupted_training, kept_checkpoint, read_losses, train_config


def weights(folder):
    return load_file(folder / ADAPTER_WEIGHTS)


def assert_same(a: dict, b: dict, **tolerance):
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key, **tolerance)


def learning_rates(folder) -> list[float]:
    with open(folder / training.LOSS_CSV) as f:
        return [float(row["lr"]) for row in csv.DictReader(f)]


def count_forwards(monkeypatch) -> list:
    calls, forward = [], AdaptedModel.forward

    def counting(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(AdaptedModel, "forward", counting)
    return calls


def test_gradient_accumulation_reads_that_many_micro_batches_per_step(tiny_store, tmp_path, monkeypatch):
    calls = count_forwards(monkeypatch)
    out = tmp_path / "acc"
    training.train(train_config(tiny_store, out, steps=3, batch_size=8, gradient_accumulation_steps=3), **QUIET)
    assert calls == [8] * 9  # 3 steps x 3 micro-batches of 8
    assert [step for step, _ in read_losses(out)] == [1, 2, 3]  # a row per optimiser step


def test_gradient_accumulation_is_the_mean_gradient_of_its_micro_batches(tiny_store, tmp_path):
    """One step of 2 x 8 (uniform weighting) equals one step on the 16 samples of those two
    micro-batches: the loader's first two batches of 8 are what a manual step sees."""
    from agd_pipeline.loader import StepBatches
    from agd_pipeline.store import TrajectoryStore

    out = tmp_path / "acc"
    config = train_config(tiny_store, out, steps=1, batch_size=8, gradient_accumulation_steps=2,
                          loss_weighting="uniform", lr_warmup_fraction=0.0, lr_schedule="constant")
    training.train(config, **QUIET)
    # the same step by hand: mean of the two micro-batches' losses, one AdamW step at the peak rate
    store = TrajectoryStore(tiny_store)
    base = training._recorded_base(config, store.manifest, "cpu")
    torch.manual_seed(config.seed)
    model = AdaptedModel(base, training.adapter_config_for(config, store.manifest))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    batches = StepBatches(store, 8, config.seed).from_step(0)
    losses = []
    for _ in range(2):
        batch = next(batches)
        cond = {k: batch[k] for k in store.manifest.condition_arrays}
        output = model(batch["model_input"].float(), batch["timesteps"], cond, batch["guidance_scale"])
        losses.append((output[:, :base.latent_channels] - batch["guided_output"].float()).pow(2).mean())
    (sum(losses) / 2).backward()
    optimizer.step()
    expected = {k: v.detach() for k, v in model.state_dict().items()}
    model.remove()
    assert_same(weights(out), expected, atol=1e-6, rtol=1e-5)
    # the logged loss is the mean over the micro-batches (Adam's first step hides a scaled gradient)
    assert read_losses(out)[0][1] == pytest.approx(float(sum(losses).detach() / 2), rel=1e-5)


def test_gradient_checkpointing_gives_the_same_adapters(tiny_store, tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    training.train(train_config(tiny_store, plain, steps=3), **QUIET)
    training.train(train_config(tiny_store, checkpointed, steps=3, gradient_checkpointing=True), **QUIET)
    assert_same(weights(plain), weights(checkpointed), atol=1e-6, rtol=1e-5)
    assert any(v.abs().max() > 0 for k, v in weights(plain).items() if k.endswith("up.weight"))


def test_fused_optimizer_matches_the_default_up_to_rounding(tiny_store, tmp_path):
    plain, fused = tmp_path / "plain", tmp_path / "fused"
    training.train(train_config(tiny_store, plain, steps=3), **QUIET)
    training.train(train_config(tiny_store, fused, steps=3, fused_optimizer=True), **QUIET)
    assert_same(weights(plain), weights(fused), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_learning_rate_schedules_warm_up_then_follow_their_shape(tiny_store, tmp_path, schedule):
    out = tmp_path / schedule
    training.train(train_config(tiny_store, out, steps=10, lr_schedule=schedule, lr_warmup_fraction=0.2,
                                learning_rate=1e-3), **QUIET)
    rates = np.array(learning_rates(out))  # the rate after each step, as loss.csv records it
    np.testing.assert_allclose(rates[:2], [5e-4, 1e-3], rtol=1e-6)  # linear warm-up over 2 steps
    tail = {"cosine": [1e-3 * 0.5 * (1 + np.cos(np.pi * s / 8)) for s in range(1, 9)],
            "linear": [1e-3 * (8 - s) / 8 for s in range(1, 9)],
            "constant": [1e-3] * 8}[schedule]
    np.testing.assert_allclose(rates[2:], tail, rtol=1e-5, atol=1e-12)


def test_ema_adapters_are_saved_and_resume_bit_for_bit(tiny_store, tmp_path, monkeypatch):
    raw, straight, resumed = tmp_path / "raw", tmp_path / "straight", tmp_path / "resumed"
    training.train(train_config(tiny_store, raw, steps=6), **QUIET)
    training.train(train_config(tiny_store, straight, steps=6, ema_decay=0.9), **QUIET)
    # the same optimisation; what is saved is the average, which lags the last weights
    assert any(not torch.equal(weights(raw)[k], weights(straight)[k]) for k in weights(raw))
    np.testing.assert_allclose([v for _, v in read_losses(raw)], [v for _, v in read_losses(straight)], rtol=1e-6)

    interrupted_training(tiny_store, resumed, monkeypatch, ema_decay=0.9)
    assert (resumed / training.CHECKPOINT / training.EMA_FILE).is_file()
    training.train(train_config(tiny_store, resumed, steps=6, ema_decay=0.9, checkpoint_every=2), **QUIET)
    assert_same(weights(resumed), weights(straight), atol=0, rtol=0)


def test_ema_matches_the_average_of_the_weights_it_saw(tiny_store, tmp_path, monkeypatch):
    """The saved adapters are diffusers' warm-up EMA of the weights after each step, recomputed here
    from those weights."""
    seen = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        seen.append([p.detach().clone() for group in self.param_groups for p in group["params"]])
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    out = tmp_path / "ema"
    training.train(train_config(tiny_store, out, steps=4, ema_decay=0.7), **QUIET)
    monkeypatch.undo()
    shadow = None
    for n, params in enumerate(seen, start=1):
        decay = min(0.7, 1 - n ** (-2 / 3))  # EMAModel's warm-up (inv_gamma 1, power 2/3): 0 at the first
        shadow = [p.clone() for p in params] if shadow is None else \
            [s - (1 - decay) * (s - p) for s, p in zip(shadow, params)]
    saved = list(weights(out).values())
    assert len(saved) == len(shadow)
    for expected in shadow:  # each averaged parameter is one saved tensor (the file orders them by name)
        assert any(t.shape == expected.shape and torch.allclose(t, expected, atol=1e-7, rtol=1e-5) for t in saved)
    assert any(s.abs().max() > 0 for s in shadow)  # not all zero-initialised layers


@pytest.mark.bad_input
def test_a_missing_tracker_is_refused_before_anything_runs(tiny_store, tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    out = tmp_path / "adapters"
    with pytest.raises(ConfigError, match="tensorboard is not installed; `pip install tensorboard`"):
        training.train(train_config(tiny_store, out, report_to="tensorboard"), **QUIET)
    assert not out.exists()


def test_validation_grids_every_n_steps_and_after_the_last(tiny_store, tmp_path):
    out = tmp_path / "adapters"
    training.train(train_config(tiny_store, out, steps=4, validate_every=2), **QUIET)
    grids = sorted(p.name for p in (out / training.VALIDATION).iterdir())
    assert grids == ["step-000002.png", "step-000004.png"]  # the scratch adapter folder is gone
    early, late = (np.asarray(Image.open(out / training.VALIDATION / g).convert("L"), dtype=float) for g in grids)
    assert early.shape == late.shape and early.std() > 10  # a picture, not a blank
    assert (early != late).any()  # the AGD columns changed with the adapters


def test_a_validation_grid_that_cannot_be_made_warns_and_keeps_the_adapters(tiny_store, tmp_path, monkeypatch):
    from agd_pipeline.errors import ModelError
    from agd_pipeline.validation import Validator

    def broken(*args, **kwargs):
        raise ModelError("the base has no VAE")

    monkeypatch.setattr(Validator, "grid", broken)
    out = tmp_path / "adapters"
    with pytest.warns(UserWarning, match="the adapters are saved, but no validation grid was made"):
        training.train(train_config(tiny_store, out, steps=2, validate_every=0), **QUIET)
    assert (out / ADAPTER_WEIGHTS).is_file() and kept_checkpoint(out) == 2


def test_a_bf16_base_trains_on_a_store_recorded_in_fp32(tiny_store, tmp_path, monkeypatch):
    """train.dtype bfloat16 on an fp32 store: the weights are checked against the store in fp32
    (bfloat16 rounds them differently), then the frozen base runs in bf16; the adapters stay fp32
    and load back onto the fp32 base without a mismatch."""
    import warnings

    from agd_pipeline.adapters import load_adapted_model
    from agd_pipeline.models import load_base_model

    seen = []
    forward = AdaptedModel.forward

    def recording(self, *args, **kwargs):
        seen.append((self.base.dtype, {p.dtype for p in self.parameters()}))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(AdaptedModel, "forward", recording)
    out = tmp_path / "bf16"
    training.train(train_config(tiny_store, out, steps=2, dtype="bfloat16"), **QUIET)
    monkeypatch.undo()
    assert seen and all(dtype == torch.bfloat16 and kinds == {torch.float32} for dtype, kinds in seen)
    assert all(v.dtype == torch.float32 for v in weights(out).values())
    config = __import__("json").loads((out / "adapter_config.json").read_text())
    assert config["base_model"]["dtype"] == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "other weights" warning: the fingerprint is the checkpoint's
        load_adapted_model(out, load_base_model(config["base_model"]["id"], with_vae=False)).remove()


@pytest.mark.parametrize("weighting,expected", [
    # per-sample squared errors 4 (w = 1.2), 1 (w = 2), 9 (w = 5); weights from max(w - 1, 0.5)
    ("uniform", (4 + 1 + 9) / 3),
    ("guidance", (2 * 4 + 1 * 1 + 0.25 * 9) / (2 + 1 + 0.25)),
    ("guidance_squared", (4 * 4 + 1 * 1 + 0.0625 * 9) / (4 + 1 + 0.0625)),
])
def test_loss_weighting_weights_each_sample_by_its_guidance_scale(weighting, expected):
    target = torch.zeros(3, 2, 2, 2)
    output = torch.stack([torch.full((2, 2, 2), v) for v in (2.0, 1.0, 3.0)])
    w = torch.tensor([1.2, 2.0, 5.0])
    loss = training.weighted_mse(output, target, w, weighting)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
