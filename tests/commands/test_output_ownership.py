"""Every command that writes owns its output folder: a folder holding someone else's files is refused
before any work (and left exactly as it was), an output inside an input is refused, a second writer
is refused by the folder's lock, and stages.train re-run into its own finished folder does nothing
(same settings, same store) or refuses naming the difference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import stages.base
import stages.evaluate
import stages.finetune
import stages.sample
import stages.train
from agd_pipeline import training
from agd_pipeline.config import TrainConfig, load_config
from agd_pipeline.locks import LOCK_FILE, FolderLock
from conftest import generate_store


def call(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def one_error_line(rc, captured, expect: str) -> str:
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), captured.err
    assert expect in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_argv(store, out, *extra) -> list[str]:
    return ["--store", str(store), "--out-dir", str(out), "--steps", "4", "--batch-size", "8", "--width", "8",
            "--embed-dim", "16", "--device", "cpu", "--checkpoint-every", "0", "--validate-every", "-1",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def trained(tiny_store, tmp_path_factory) -> Path:
    """A finished adapter folder of stages.train (4 steps)."""
    out = tmp_path_factory.mktemp("owned") / "adapters"
    assert call(stages.train.main, train_argv(tiny_store, out)) == 0
    return out


# ------------------------------------------------------------------------------------ stages.train


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


def test_the_gitignore_dvc_writes_into_an_output_folder_is_not_in_the_way(tmp_path):
    """dvc writes data/eval/.gitignore for the cached outputs inside that folder before the stage runs."""
    from agd_pipeline.outputs import claim_output

    out = tmp_path / "eval"
    out.mkdir()
    (out / ".gitignore").write_text("/grids\n")
    assert claim_output(out, "evaluate.out_dir", "stages.evaluate", lambda folder: False) is False
    (out / "metrics.json").write_text("{}")
    assert claim_output(out, "evaluate.out_dir", "stages.evaluate", lambda folder: True) is True


def test_a_sibling_lock_leaves_nothing_behind_and_a_removed_one_is_not_held(tmp_path):
    from agd_pipeline.locks import LockError

    sibling = dict(lock_file=f".derived{LOCK_FILE}")
    with FolderLock(tmp_path, "stages.finetune", **sibling):
        with pytest.raises(LockError, match="derived is in use by stages.finetune"):
            FolderLock(tmp_path, "stages.finetune", **sibling).acquire()
    assert list(tmp_path.iterdir()) == []  # released: no lock file left beside the folder
    late = FolderLock(tmp_path, "stages.finetune", **sibling)
    late._file = open(tmp_path / sibling["lock_file"], "a+")  # opened, then the holder released and removed it
    (tmp_path / sibling["lock_file"]).unlink()
    assert not late._still_linked()
    late._file.close()
    late._file = None
