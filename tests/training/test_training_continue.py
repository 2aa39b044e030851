"""A finished training run keeps its last checkpoint, and a larger train.steps continues from it to
the adapters of an uninterrupted run of the larger count, bit for bit, where the learning-rate
schedule's first steps do not depend on the total (constant, no warm-up); where they do (cosine,
linear, a warm-up share), and for fewer steps, the continuation is refused with one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import agd_pipeline.training as training
import stages.train
from agd_pipeline.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from agd_pipeline.errors import AgdError

from conftest import call, one_error_line, snapshot, train_argv
from test_training import QUIET, Interrupted, kept_checkpoint, train_config
from test_training_robustness import counting_forward

# a schedule whose first steps do not depend on train.steps
CONSTANT = dict(lr_schedule="constant", lr_warmup_fraction=0.0)


def assert_bit_identical(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{key} differs"


@pytest.mark.parametrize("options", [{}, {"ema_decay": 0.9, "gradient_accumulation_steps": 2}],
                         ids=["plain", "ema+accumulation"])
def test_more_steps_continue_a_finished_run_to_the_adapters_of_the_longer_run(tiny_store, tmp_path, monkeypatch,
                                                                             options):
    settings = {**CONSTANT, **options}
    straight = tmp_path / "straight"
    training.train(train_config(tiny_store, straight, steps=40, **settings), **QUIET)

    out = tmp_path / "adapters"
    training.train(train_config(tiny_store, out, steps=20, **settings), **QUIET)
    assert kept_checkpoint(out) == 20
    twenty = load_file(out / ADAPTER_WEIGHTS)

    # the continuation, killed right after its checkpoint of step 30, then the same command again
    original = training._save_checkpoint

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise Interrupted

    monkeypatch.setattr(training, "_save_checkpoint", save_then_die)
    messages = []
    with pytest.raises(Interrupted):
        training.train(train_config(tiny_store, out, steps=40, checkpoint_every=10, **settings), progress=False,
                       log=messages.append)
    monkeypatch.undo()
    assert any("holds adapters trained for 20 steps" in m and "continuing them" in m for m in messages), messages
    assert any("resuming from" in m and "continuing to 40" in m for m in messages), messages
    assert json.loads((out / training.CHECKPOINT / "state.json").read_text())["step"] == 30
    assert_bit_identical(load_file(out / ADAPTER_WEIGHTS), twenty)  # the finished 20 stay until the 40 are saved

    forward_calls = counting_forward(monkeypatch)
    training.train(train_config(tiny_store, out, steps=40, checkpoint_every=10, **settings), **QUIET)
    monkeypatch.undo()
    assert len(forward_calls) == 10 * settings.get("gradient_accumulation_steps", 1), "it did not start at step 30"

    got, expected = load_file(out / ADAPTER_WEIGHTS), load_file(straight / ADAPTER_WEIGHTS)
    assert_bit_identical(got, expected)
    assert any(not torch.equal(got[key], twenty[key]) for key in got), "the continuation changed nothing"
    assert (out / training.LOSS_CSV).read_text() == (straight / training.LOSS_CSV).read_text()
    records = [json.loads((folder / ADAPTER_CONFIG).read_text()) for folder in (out, straight)]
    assert records[0]["final_loss"] == records[1]["final_loss"]
    assert records[0]["training"]["steps"] == 40 and kept_checkpoint(out) == 40

    before = snapshot(out)  # the longer run is finished: the same command has nothing to do
    assert training.train(train_config(tiny_store, out, steps=40, **settings), **QUIET).get("skipped") is True
    assert snapshot(out) == before


@pytest.fixture(scope="module")
def cosine_run(tiny_store, tmp_path_factory):
    """A finished 4-step run under the default schedule (cosine, warm-up 0.05), by the command."""
    out = tmp_path_factory.mktemp("cosine") / "adapters"
    assert call(stages.train.main, train_argv(tiny_store, out)) == 0
    assert kept_checkpoint(out) == 4
    return out


@pytest.mark.bad_input
def test_more_steps_under_a_schedule_of_the_total_are_refused_with_one_line(cosine_run, tiny_store, tmp_path,
                                                                           capsys):
    out = tmp_path / "adapters"
    shutil.copytree(cosine_run, out)
    before = snapshot(out)
    line = one_error_line(call(stages.train.main, train_argv(tiny_store, out, "--steps", "8")), capsys.readouterr(),
                          "train.steps: ")
    assert "trained for 4 steps" in line and "the cosine learning-rate schedule" in line, line
    assert "over 8 steps differs from the one over 4" in line and "nothing was changed" in line, line
    assert "--restart-on-mismatch true to retrain from zero with 8 steps" in line, line
    assert "lr_schedule constant, lr_warmup_fraction 0" in line, line
    assert snapshot(out) == before
    # asked to: trained again from zero, with 8 steps
    assert call(stages.train.main, train_argv(tiny_store, out, "--steps", "8", "--restart-on-mismatch", "true")) == 0
    assert "replacing them" in capsys.readouterr().out
    assert json.loads((out / ADAPTER_CONFIG).read_text())["training"]["steps"] == 8 and kept_checkpoint(out) == 8
    assert [row.split(",")[0] for row in (out / training.LOSS_CSV).read_text().splitlines()[1:]] == \
        [str(step) for step in range(1, 9)]


@pytest.mark.bad_input
def test_fewer_steps_than_a_finished_run_are_refused_with_one_line(cosine_run, tiny_store, tmp_path, capsys):
    out = tmp_path / "adapters"
    shutil.copytree(cosine_run, out)
    before = snapshot(out)
    line = one_error_line(call(stages.train.main, train_argv(tiny_store, out, "--steps", "2")), capsys.readouterr(),
                          "adapters trained for 4 steps, more than the 2 asked now, and training does not go back")
    assert "nothing was changed" in line and "--restart-on-mismatch true to retrain from zero with 2 steps" in line
    assert snapshot(out) == before


@pytest.mark.bad_input
def test_more_steps_without_a_kept_checkpoint_are_refused(tiny_store, tmp_path, capsys):
    """Adapters whose checkpoint is gone (removed, or trained before runs kept it) cannot continue,
    even under a schedule that would allow it."""
    out = tmp_path / "adapters"
    constant = ["--lr-schedule", "constant", "--lr-warmup-fraction", "0"]
    assert call(stages.train.main, train_argv(tiny_store, out, *constant)) == 0
    shutil.rmtree(out / training.CHECKPOINT)
    before = snapshot(out)
    line = one_error_line(call(stages.train.main, train_argv(tiny_store, out, *constant, "--steps", "8")),
                          capsys.readouterr(), "but no checkpoint of their last step to continue them from")
    assert "--restart-on-mismatch true" in line
    assert snapshot(out) == before


def test_an_unfinished_checkpoint_continues_only_where_the_schedule_allows(tiny_store, tmp_path, monkeypatch):
    """A run of 6 steps killed at step 2 continues to 8 steps under a constant schedule (to the
    8-step run's adapters), and is refused under cosine."""
    original = training._save_checkpoint

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise Interrupted

    straight = tmp_path / "straight"
    training.train(train_config(tiny_store, straight, steps=8, **CONSTANT), **QUIET)
    for name, settings in (("constant", CONSTANT), ("cosine", {})):
        out = tmp_path / name
        with monkeypatch.context() as patch:
            patch.setattr(training, "_save_checkpoint", save_then_die)
            with pytest.raises(Interrupted):
                training.train(train_config(tiny_store, out, steps=6, checkpoint_every=2, **settings), **QUIET)
        if name == "constant":
            training.train(train_config(tiny_store, out, steps=8, checkpoint_every=2, **settings), **QUIET)
            assert_bit_identical(load_file(out / ADAPTER_WEIGHTS), load_file(straight / ADAPTER_WEIGHTS))
        else:
            with pytest.raises(AgdError) as err:
                training.train(train_config(tiny_store, out, steps=8, checkpoint_every=2, **settings), **QUIET)
            assert "over 8 steps differs from the one over 6 from step 2 on" in str(err.value), err.value
            assert json.loads((out / training.CHECKPOINT / "state.json").read_text())["step"] == 2


def test_the_schedule_comparison():
    """Only a schedule whose multipliers up to the checkpoint's step agree under both totals
    continues: constant without warm-up always, constant with a warm-up only where the warm-up
    rounds to the same length, cosine and linear never."""
    def config(**settings):
        return train_config("store", "out", **settings)

    assert training._schedule_difference(config(**CONSTANT), 20, 40, 20) is None
    assert training._schedule_difference(config(lr_schedule="constant", lr_warmup_fraction=0.05), 20, 25, 20) is None
    assert training._schedule_difference(config(lr_schedule="constant", lr_warmup_fraction=0.05), 20, 40, 20) == 1
    assert training._schedule_difference(config(lr_schedule="cosine", lr_warmup_fraction=0.0), 20, 40, 20) == 1
    assert training._schedule_difference(config(lr_schedule="linear", lr_warmup_fraction=0.0), 20, 40, 20) == 1
