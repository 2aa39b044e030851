"""Every command that writes owns its output folder: a folder holding someone else's files is refused
before any work (and left exactly as it was), an output inside an input is refused, a second writer
is refused by the folder's lock (evaluate, base, sample, finetune here; stages.train's own folder in
training/test_training_outputs.py, the locks in test_locks.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import stages.base
import stages.evaluate
import stages.finetune
import stages.sample
import stages.train
from agd_pipeline.locks import LOCK_FILE, FolderLock
from conftest import call, one_error_line, snapshot


# ------------------------------------------------------------------- evaluate, base, sample, finetune


@pytest.mark.bad_input
def test_evaluate_refuses_foreign_folders_inputs_and_a_second_writer(trained, tmp_path, capsys):
    argv = ["--adapters", str(trained), "--device", "cpu", "--samples-per-class", "2", "--guidance-scales", "2",
            "--no-progress"]
    foreign = tmp_path / "eval"
    foreign.mkdir()
    (foreign / "paper.tex").write_text("mine")
    one_error_line(call(stages.evaluate.main, [*argv, "--out-dir", str(foreign)]), capsys.readouterr(),
                   "did not write (paper.tex)")
    assert snapshot(foreign) == {"paper.tex": b"mine"}
    before = snapshot(trained)
    one_error_line(call(stages.evaluate.main, [*argv, "--out-dir", str(trained / "eval")]), capsys.readouterr(),
                   "lies inside the input")
    assert snapshot(trained) == before and not (trained / "eval").exists()
    busy = tmp_path / "busy"
    with FolderLock(busy, "stages.evaluate"):
        one_error_line(call(stages.evaluate.main, [*argv, "--out-dir", str(busy)]), capsys.readouterr(), "in use by")


@pytest.mark.bad_input
def test_base_refuses_a_folder_of_someone_elses(tmp_path, capsys):
    out = tmp_path / "my-model"
    out.mkdir()
    (out / "model_index.json.bak").write_text("{}")
    one_error_line(call(stages.base.main, ["--out-dir", str(out), "--train-steps", "2", "--classifier-steps", "2",
                                           "--no-progress"]), capsys.readouterr(), "did not write")
    assert [p.name for p in out.iterdir()] == ["model_index.json.bak"]


@pytest.mark.bad_input
def test_sample_refuses_foreign_files_and_replaces_its_own_earlier_images(trained, tmp_path, capsys):
    argv = ["--adapters", str(trained), "--classes", "1,2", "--steps", "2", "--device", "cpu"]
    out = tmp_path / "photos"
    out.mkdir()
    (out / "grid.png").write_bytes(b"my own grid")  # a name sample writes, in a folder it did not write
    one_error_line(call(stages.sample.main, [*argv, "--per-class", "2", "--out-dir", str(out)]),
                   capsys.readouterr(), "did not write (grid.png)")
    assert snapshot(out) == {"grid.png": b"my own grid"}
    own = tmp_path / "samples"
    assert call(stages.sample.main, [*argv, "--per-class", "3", "--out-dir", str(own)]) == 0
    assert call(stages.sample.main, [*argv, "--per-class", "1", "--out-dir", str(own)]) == 0
    pngs = sorted(p.name for p in own.glob("0*.png"))
    assert pngs == ["00000_class1.png", "00001_class2.png"]  # none of the first run's six left to mix in
    (own / "keep.txt").write_text("mine")
    one_error_line(call(stages.sample.main, [*argv, "--per-class", "1", "--out-dir", str(own)]),
                   capsys.readouterr(), "keep.txt")


@pytest.fixture
def derivable_base(tiny_base_dir, tmp_path) -> Path:
    folder = tmp_path / "base"
    shutil.copytree(tiny_base_dir, folder)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 3)
    np.savez_compressed(folder / "train.npz", latents=rng.standard_normal((30, 1, 8, 8)).astype(np.float32),
                        labels=labels)
    np.savez_compressed(folder / "holdout.npz", images=rng.standard_normal((30, 1, 8, 8)).astype(np.float32),
                        labels=labels)
    (folder / "classifier").mkdir()
    (folder / "classifier" / "config.json").write_text("{}")
    return folder


@pytest.mark.bad_input
def test_finetune_refuses_an_output_inside_its_base_and_a_second_writer(derivable_base, tmp_path, capsys):
    argv = ["--base-model", str(derivable_base), "--steps", "2", "--batch-size", "8", "--no-progress"]
    before = snapshot(derivable_base)
    one_error_line(call(stages.finetune.main, [*argv, "--out-dir", str(derivable_base / "derived")]),
                   capsys.readouterr(), "lies inside the input")
    assert snapshot(derivable_base) == before
    out = tmp_path / "derived"
    with FolderLock(tmp_path, "stages.finetune", lock_file=f".derived{LOCK_FILE}"):  # a first run, still going
        line = one_error_line(call(stages.finetune.main, [*argv, "--out-dir", str(out)]), capsys.readouterr(),
                              "in use by")
    assert f"{out} is in use by" in line and not out.exists()
    assert call(stages.finetune.main, [*argv, "--out-dir", str(out)]) == 0
    assert (out / "agd_base.json").is_file()


def test_the_gitignore_dvc_writes_into_an_output_folder_is_not_in_the_way(tmp_path):
    """dvc writes data/eval/.gitignore for the cached outputs inside that folder before the stage runs."""
    from agd_pipeline.outputs import claim_output

    out = tmp_path / "eval"
    out.mkdir()
    (out / ".gitignore").write_text("/grids\n")
    assert claim_output(out, "evaluate.out_dir", "stages.evaluate", lambda folder: False) is False
    (out / "metrics.json").write_text("{}")
    assert claim_output(out, "evaluate.out_dir", "stages.evaluate", lambda folder: True) is True


