"""stages.train owns its output folder: a folder holding someone else's files or lying inside the base is
refused before any work (and left exactly as it was), a re-run into its own finished folder does
nothing (same settings, same store, same code) or refuses naming the difference, and the resolved
config is written before the first step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import stages.base
import stages.evaluate
import stages.finetune
import stages.sample
import stages.train
from agd_pipeline import training
from agd_pipeline.config import TrainConfig, load_config
from conftest import call, generate_store, one_error_line, snapshot, train_argv


@pytest.mark.bad_input
def test_train_refuses_a_folder_of_someone_elses_and_changes_nothing(tiny_store, tmp_path, capsys):
    out = tmp_path / "p"
    out.mkdir()
    (out / "README.md").write_text("mine\n")
    line = one_error_line(call(stages.train.main, train_argv(tiny_store, out)), capsys.readouterr(),
                          "did not write (README.md)")
    assert "nothing was changed" in line
    assert snapshot(out) == {"README.md": b"mine\n"} and [p.name for p in out.iterdir()] == ["README.md"]


@pytest.mark.bad_input
def test_train_refuses_a_foreign_file_beside_its_own_output(trained, tiny_store, tmp_path, capsys):
    out = tmp_path / "adapters"
    shutil.copytree(trained, out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    one_error_line(call(stages.train.main, train_argv(tiny_store, out)), capsys.readouterr(), "notes.txt")
    assert snapshot(out) == before


def test_train_rerun_with_the_same_settings_has_nothing_to_do(trained, tiny_store, tmp_path, capsys):
    out = tmp_path / "adapters"
    shutil.copytree(trained, out)
    before = snapshot(out)
    assert call(stages.train.main, train_argv(tiny_store, out)) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert snapshot(out) == before


@pytest.mark.bad_input
@pytest.mark.parametrize("change, expect", [
    (["--width", "16"], "train.width 8 there, 16 now"),
    (["--seed", "5"], "train.seed 0 there, 5 now"),
])
def test_train_rerun_with_other_settings_is_refused_naming_them(trained, tiny_store, tmp_path, capsys, change,
                                                                expect):
    out = tmp_path / "adapters"
    shutil.copytree(trained, out)
    (out / "validation").mkdir()
    (out / "validation" / "step_000004.png").write_bytes(b"old grid")  # as a run with validation leaves it
    before = snapshot(out)
    line = one_error_line(call(stages.train.main, train_argv(tiny_store, out, *change)), capsys.readouterr(), expect)
    assert "--restart-on-mismatch true" in line and "nothing was changed" in line
    assert snapshot(out) == before
    # asked to replace them: the old adapters and the old validation images go
    assert call(stages.train.main, train_argv(tiny_store, out, *change, "--restart-on-mismatch", "true")) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["training"][change[0][2:].replace("-", "_")] == int(change[1])
    assert not (out / "validation").exists()


@pytest.mark.bad_input
def test_train_rerun_on_another_store_is_refused(trained, tiny_base_dir, tmp_path, capsys):
    other = tmp_path / "other_store"
    generate_store(tiny_base_dir, other, seed=7)
    out = tmp_path / "adapters"
    shutil.copytree(trained, out)
    before = snapshot(out)
    one_error_line(call(stages.train.main, train_argv(other, out)), capsys.readouterr(), "trained on another store")
    assert snapshot(out) == before


@pytest.mark.bad_input
def test_train_output_inside_the_base_is_refused(tiny_store, tmp_path, capsys):
    from agd_pipeline.store import read_manifest

    base = Path(read_manifest(tiny_store).base_model["id"])
    before = snapshot(base)
    one_error_line(call(stages.train.main, train_argv(tiny_store, base / "adapters")), capsys.readouterr(),
                   "lies inside the input")
    assert snapshot(base) == before and not (base / "adapters").exists()


@pytest.mark.crash
def test_a_run_killed_before_its_first_checkpoint_is_still_its_own(tiny_store, tmp_path):
    """The folder record is written first, so loss.csv without a checkpoint is not 'foreign'."""
    out = tmp_path / "adapters"
    config = load_config(TrainConfig, {"store": str(tiny_store), "out_dir": str(out), "steps": 4, "batch_size": 8,
                                       "width": 8, "embed_dim": 16, "device": "cpu", "checkpoint_every": 0,
                                       "validate_every": -1})
    out.mkdir()
    (out / "resolved_config.json").write_text(json.dumps({"train": config.to_dict()}))
    (out / "loss.csv").write_text("step,loss\n1,0.5\n")
    training.train(config, progress=False, log=lambda *a: None)
    assert (out / "adapters.safetensors").is_file()


def test_train_rerun_after_a_code_change_is_not_nothing_to_do(trained, tiny_store, tmp_path, capsys, monkeypatch):
    """Under `dvc repro` the adapters folder persists and a code change re-runs train: it must retrain
    (dvc.yaml passes --restart-on-mismatch true), never keep adapters the old code made."""
    out = tmp_path / "adapters"
    shutil.copytree(trained, out)
    monkeypatch.setattr(training, "code_fingerprint", lambda: "0123456789abcdef")
    one_error_line(call(stages.train.main, train_argv(tiny_store, out)), capsys.readouterr(),
                   "trained by other code of this tool")
    assert call(stages.train.main, train_argv(tiny_store, out, "--restart-on-mismatch", "true")) == 0
    assert json.loads((out / "adapter_config.json").read_text())["code"] == "0123456789abcdef"


def test_train_records_its_resolved_config_before_its_first_step(tiny_store, tmp_path, monkeypatch):
    out = tmp_path / "adapters"
    config = load_config(TrainConfig, {"store": str(tiny_store), "out_dir": str(out), "steps": 4, "device": "cpu"})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "_train", killed)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, progress=False, log=lambda *a: None)
    record = json.loads((out / "resolved_config.json").read_text())
    assert list(record) == ["train", "runtime"] and record["train"] == config.to_dict()
    assert record["runtime"]["mixed_precision"] == "no"  # what accelerate resolved (training.runtime_record)
