"""A base folder whose config does not fit its weights, or whose weights are a pickle, is refused with
one line before anything runs; never loaded half-initialised or truncated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import stages.generate
from agd_pipeline.errors import ModelError
from agd_pipeline.models import load_base_model

pytestmark = pytest.mark.bad_input

WEIGHTS = "diffusion_pytorch_model.safetensors"


def copy_with(tiny_base_dir, tmp_path, edit) -> Path:
    folder = tmp_path / "base"
    shutil.copytree(tiny_base_dir, folder)
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    edit(config)
    config_path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("delta, expect", [(1, "the weights lack"), (-1, "has no place for")],
                         ids=["more layers", "fewer"])
def test_config_that_does_not_fit_the_weights_is_refused(tiny_base_dir, tmp_path, delta, expect):
    folder = copy_with(tiny_base_dir, tmp_path, lambda c: c.update(num_layers=c["num_layers"] + delta))
    with pytest.raises(ModelError, match=f"transformer/config.json does not fit its weights.*{expect}"):
        load_base_model(str(folder))


def test_generate_on_a_truncated_base_is_one_error_line(tiny_base_dir, tmp_path, capsys):
    folder = copy_with(tiny_base_dir, tmp_path, lambda c: c.update(num_layers=c["num_layers"] - 1))
    rc = stages.generate.main(["--base-model", str(folder), "--out-dir", str(tmp_path / "store"), "--device", "cpu",
                               "--trajectories-per-class", "1", "--num-steps", "2", "--no-progress"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "does not fit its weights" in lines[0], lines
    assert not (tmp_path / "store").exists()


def test_pickle_weights_load_only_when_asked(tiny_base_dir, tmp_path, monkeypatch):
    folder = tmp_path / "base"
    shutil.copytree(tiny_base_dir, folder)
    weights = folder / "transformer" / WEIGHTS
    torch.save(load_file(weights), weights.with_name("diffusion_pytorch_model.bin"))
    weights.unlink()
    with pytest.raises(ModelError, match="no safetensors weights.*AGD_ALLOW_PICKLE_WEIGHTS=1"):
        load_base_model(str(folder))
    monkeypatch.setenv("AGD_ALLOW_PICKLE_WEIGHTS", "1")
    reference = load_base_model(str(tiny_base_dir))
    loaded = load_base_model(str(folder))
    assert loaded.weights_fingerprint() == reference.weights_fingerprint()
