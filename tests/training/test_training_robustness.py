"""Stage two when things go wrong: a full disk at a checkpoint or at the adapters, a loss or weights
that are no longer finite, and records that must not lie (final_loss after a resume, a kill while
the last outputs are written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import agd_pipeline.adapters
import agd_pipeline.training as training
from agd_pipeline.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdaptedModel
from agd_pipeline.errors import AgdError

from conftest import run_main
from test_training import QUIET, Interrupted, interrupted_training, kept_checkpoint, train_config

# what safetensors raises when the disk fills up while it writes (its Rust error, not an OSError)
FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def full_disk_after(original, calls_allowed: int, error: str):
    """A save_file that writes ``calls_allowed`` files, then half a file and fails as a full disk does."""
    calls = []

    def save_file(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > calls_allowed:
            Path(path).write_bytes(b"\0" * 16)  # what was written before the disk filled up
            if error == "safetensors":
                raise SafetensorError(FULL)
            raise OSError(28, "No space left on device")
        return original(tensors, path, *args, **kwargs)
    return save_file


def counting_forward(monkeypatch) -> list:
    calls = []
    forward = AdaptedModel.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(AdaptedModel, "forward", counted)
    return calls


def params_file(tmp_path, store, out, **overrides) -> Path:
    settings = {"store": str(store), "out_dir": str(out), "steps": 6, "batch_size": 16, "width": 8, "embed_dim": 16,
                "device": "cpu", "checkpoint_every": 2, "seed": 0, "validate_every": -1, **overrides}
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps({"train": settings}))
    return path


# ------------------------------------------------------------------------------- a full disk


@pytest.mark.crash
@pytest.mark.parametrize("error", ["safetensors", "oserror"])
def test_a_full_disk_at_a_later_checkpoint_is_one_line_and_keeps_the_previous_one(tiny_store, tmp_path, monkeypatch,
                                                                                    error):
    out = tmp_path / "adapters"
    # the checkpoint of step 2 writes two files (adapters, optimizer); that of step 4 fails
    monkeypatch.setattr(training, "save_file", full_disk_after(training.save_file, 2, error))
    result = run_main("stages.train", "--params", params_file(tmp_path, tiny_store, out), "--no-progress")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "cannot write the training checkpoint at step 4 (the disk is full)" \
        in lines[0] and "is intact" in lines[0], lines
    assert not (out / "checkpoint.tmp").exists(), "the failed checkpoint's temporary was left behind"
    assert json.loads((out / training.CHECKPOINT / "state.json").read_text())["step"] == 2
    monkeypatch.undo()
    messages = []
    training.train(train_config(tiny_store, out, steps=6, checkpoint_every=2), progress=False, log=messages.append)
    assert any("at step 2" in m and "resuming" in m for m in messages), messages
    assert (out / ADAPTER_WEIGHTS).exists() and kept_checkpoint(out) == 6


@pytest.mark.crash
@pytest.mark.parametrize("error", ["safetensors", "oserror"])
def test_a_full_disk_at_the_adapters_is_one_line_and_resumes_without_training(tiny_store, tmp_path, monkeypatch,
                                                                               error):
    out = tmp_path / "adapters"
    monkeypatch.setattr(agd_pipeline.adapters, "save_file", full_disk_after(agd_pipeline.adapters.save_file, 0, error))
    with pytest.raises(AgdError) as err:
        training.train(train_config(tiny_store, out, steps=4, checkpoint_every=2), **QUIET)
    message = str(err.value)
    assert "\n" not in message and f"{out}: cannot write the adapters (the disk is full)" in message, message
    assert "checkpoint" in message and "intact" in message, message
    assert sorted(p.name for p in out.glob("*.tmp")) == [], "a temporary of the adapters was left behind"
    assert not (out / ADAPTER_WEIGHTS).exists()
    assert json.loads((out / training.CHECKPOINT / "state.json").read_text())["step"] == 4
    monkeypatch.undo()
    forward_calls = counting_forward(monkeypatch)
    training.train(train_config(tiny_store, out, steps=4, checkpoint_every=2), **QUIET)
    assert forward_calls == [], "the adapters were trained again"
    assert (out / ADAPTER_WEIGHTS).exists() and kept_checkpoint(out) == 4


@pytest.mark.crash
def test_a_full_disk_at_loss_csv_is_one_line_naming_it(tiny_store, tmp_path, monkeypatch):
    out = tmp_path / "adapters"

    class FullAfter:
        """loss.csv on a disk that fills up after ``rows`` rows (the header included)."""
        def __init__(self, f, rows):
            self.f, self.rows = f, rows

        def write(self, text):
            self.rows -= 1
            if self.rows < 0:
                raise OSError(28, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(path, *args, **kwargs):
        f = open(path, *args, **kwargs)
        return FullAfter(f, 3) if Path(path).name == training.LOSS_CSV else f

    monkeypatch.setattr(training, "open", full_open, raising=False)
    with pytest.raises(AgdError) as err:
        training.train(train_config(tiny_store, out, steps=6, checkpoint_every=2), **QUIET)
    message = str(err.value)
    assert message.startswith(f"{out / training.LOSS_CSV}: cannot write the loss of step 3 (the disk is full)"), message
    assert "\n" not in message and "is intact" in message
    monkeypatch.undo()
    training.train(train_config(tiny_store, out, steps=6, checkpoint_every=2), **QUIET)
    with open(out / training.LOSS_CSV) as f:
        assert [line.split(",")[0] for line in f.read().splitlines()] == ["step", "1", "2", "3", "4", "5", "6"]


# ----------------------------------------------------------------------------- finite losses


def test_a_huge_learning_rate_stops_training_naming_the_step(tiny_store, tmp_path):
    out = tmp_path / "adapters"
    with pytest.raises(AgdError) as err:
        training.train(train_config(tiny_store, out, steps=20, learning_rate=1e30, checkpoint_every=0), **QUIET)
    message = str(err.value)
    assert "\n" not in message
    assert "the loss became" in message and "at step " in message, message
    assert "train.learning_rate (now 1e+30)" in message and "NaN/inf" in message, message
    assert not (out / ADAPTER_WEIGHTS).exists()


def test_weights_that_become_nan_are_never_saved(tiny_store, tmp_path, monkeypatch):
    """A last optimiser step that turns a weight into NaN (a loss still finite): neither the
    checkpoint of that step nor the adapters are written."""
    out = tmp_path / "adapters"
    original, steps = torch.optim.AdamW.step, []

    def poisoning_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 4:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    with pytest.raises(AgdError, match=r"weights became NaN or inf by step 4.*train.learning_rate"):
        training.train(train_config(tiny_store, out, steps=4, checkpoint_every=2), **QUIET)
    assert not (out / ADAPTER_WEIGHTS).exists()
    checkpoint = out / training.CHECKPOINT
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "adapters.safetensors").values())


def test_the_base_trainers_stop_at_a_nan_loss():
    """toy's denoiser loop (the base and its LoRA fine-tune), the descent step of the text bases, and
    the classifier loop: one line naming the trainer and the step, no weight changed."""
    from agd_pipeline.optim import descent_step
    from defaults import toy

    from conftest import make_dit, make_scheduler

    net = make_dit(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.full((4, 1, 8, 8), float("nan"))
    with pytest.raises(AgdError) as err:
        toy.fit_class_denoiser(net, list(net.parameters()), images, torch.zeros(4, dtype=torch.long), make_scheduler(),
                               steps=3, batch_size=2, learning_rate=1e-3, label_dropout=0.1, ema_decay=0.9, seed=0,
                               desc="base: train DiT", progress=False)
    message = str(err.value)
    assert message.startswith("base: train DiT: the loss became nan at step 1;") and "\n" not in message, message
    assert "learning rate (now" in message and "NaN/inf" in message, message
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key

    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    loss = layer(torch.ones(1, 2)).sum() + float("inf")
    with pytest.raises(AgdError, match="text_base: the loss became inf at step 7"):
        descent_step(loss, list(layer.parameters()), optimizer, schedule, what="text_base", step=6)

    from types import SimpleNamespace

    config = SimpleNamespace(seed=0, classifier_features=4, classifier_steps=3)
    x = np.full((8, 1, 8, 8), np.nan, dtype=np.float32)
    y = np.zeros(8, dtype=np.int64)
    with pytest.raises(AgdError, match="base: train classifier: the loss became nan at step 1"):
        toy.train_classifier(x, y, x, y, config, progress=False)


# ------------------------------------------------------------------------ records that lie


@pytest.mark.crash
def test_a_resumed_run_records_the_final_loss_of_an_uninterrupted_one(tiny_store, tmp_path, monkeypatch):
    """final_loss is the mean over the last FINAL_LOSS_STEPS steps of the whole run, not of its resumed
    part: the checkpoint carries the losses before it."""
    monkeypatch.setattr(training, "FINAL_LOSS_STEPS", 4)  # 6 steps, a kill after step 2: 2 before, 2 after
    straight = tmp_path / "straight"
    expected = training.train(train_config(tiny_store, straight, steps=6, checkpoint_every=2), **QUIET)["final_loss"]
    resumed = tmp_path / "resumed"
    interrupted_training(tiny_store, resumed, monkeypatch)  # killed right after the checkpoint of step 2
    monkeypatch.setattr(training, "FINAL_LOSS_STEPS", 4)
    got = training.train(train_config(tiny_store, resumed, steps=6, checkpoint_every=2), **QUIET)["final_loss"]
    recorded = [json.loads((folder / ADAPTER_CONFIG).read_text())["final_loss"] for folder in (straight, resumed)]
    assert got == pytest.approx(expected, rel=1e-6) and recorded[1] == pytest.approx(recorded[0], rel=1e-6)
    with open(straight / training.LOSS_CSV) as f:  # not vacuous: the last 4 steps, not the last 2
        losses = [float(line.split(",")[1]) for line in f.read().splitlines()[1:]]
    assert expected == pytest.approx(np.mean(losses[-4:]), rel=1e-4)
    assert abs(expected - np.mean(losses[-2:])) > 1e-6


@pytest.mark.crash
def test_a_kill_while_the_validation_grid_is_made_resumes_without_training_again(tiny_store, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    training.train(train_config(tiny_store, straight, steps=4, checkpoint_every=2), **QUIET)
    out = tmp_path / "adapters"

    def killed(*args, **kwargs):
        raise Interrupted("killed while the validation grid was made")

    monkeypatch.setattr(training, "_validation_grid", killed)
    with pytest.raises(Interrupted):
        training.train(train_config(tiny_store, out, steps=4, checkpoint_every=2, validate_every=0), **QUIET)
    assert (out / ADAPTER_WEIGHTS).exists(), "the kill was meant to land after the adapters were saved"
    assert json.loads((out / training.CHECKPOINT / "state.json").read_text())["step"] == 4
    grids = []
    monkeypatch.setattr(training, "_validation_grid", lambda adapters, out_dir, step, *a: grids.append(step))
    forward_calls = counting_forward(monkeypatch)
    messages = []
    result = training.train(train_config(tiny_store, out, steps=4, checkpoint_every=2, validate_every=0),
                            progress=False, log=messages.append)
    assert forward_calls == [], "the run trained again instead of resuming at its end"
    assert grids == [4] and kept_checkpoint(out) == 4
    assert any("at step 4" in m and "training is over" in m for m in messages), messages
    expected, got = load_file(straight / ADAPTER_WEIGHTS), load_file(out / ADAPTER_WEIGHTS)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)
    assert result["final_loss"] == json.loads((straight / ADAPTER_CONFIG).read_text())["final_loss"]
