"""Using trained adapters: the library call and `python -m stages.sample`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import agd_pipeline.training as training
from agd_pipeline.adapters import load_adapted_model
from agd_pipeline.config import TrainConfig, load_config
from agd_pipeline.inference import sample_images
from agd_pipeline.models import load_base_model
from agd_pipeline.sampling import AGD, CFG, Unguided, generators_for, initial_noise, sample, trajectory_seed

from conftest import run_main

QUIET = dict(progress=False, log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def trained_adapters(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters") / "adapters"
    config = load_config(TrainConfig, {"store": str(tiny_store), "out_dir": str(out), "steps": 8,
                                       "batch_size": 16, "width": 8, "embed_dim": 16, "device": "cpu",
                                       "learning_rate": 0.01})
    training.train(config, **QUIET)
    return out


def reference(base, labels, w, steps, adapted=None):
    seeds = [trajectory_seed(0, i) for i in range(len(labels))]
    gens = generators_for(seeds)
    denoiser = AGD(adapted, w) if adapted is not None else CFG(base, w)
    return sample(base, labels, initial_noise(base, gens), steps, denoiser, generators=gens)


def test_sample_images_runs_agd_or_cfg_from_the_same_seeds(trained_adapters, tiny_base_dir):
    base = load_base_model(str(tiny_base_dir))
    labels = torch.tensor([1, 1, 2, 2])
    agd = sample_images(str(trained_adapters), 3.0, classes=[1, 2], per_class=2, steps=4, device="cpu")
    cfg = sample_images(str(trained_adapters), 3.0, classes=[1, 2], per_class=2, steps=4, device="cpu",
                        use_adapters=False)
    assert torch.equal(agd["labels"], labels) and agd["nfe_per_image"] == 4 and cfg["nfe_per_image"] == 8
    adapted = load_adapted_model(trained_adapters, base)
    assert torch.allclose(agd["images"], reference(base, labels, 3.0, 4, adapted), atol=1e-6)
    assert torch.allclose(cfg["images"], reference(base, labels, 3.0, 4), atol=1e-6)
    # The trained adapters do something, and it is not plain CFG.
    unguided = sample(base, labels, initial_noise(base, generators_for(agd["seeds"])), 4, Unguided(base))
    assert not torch.allclose(agd["images"], unguided, atol=1e-4)
    assert not torch.allclose(agd["images"], cfg["images"], atol=1e-6)


def test_sample_command_writes_images_and_record(trained_adapters, tmp_path):
    out = tmp_path / "agd"
    result = run_main("stages.sample", "--adapters", trained_adapters, "-w", "2.5", "--classes", "1,2",
                     "--per-class", "2", "--steps", "4", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("*.png")) == [
        "00000_class1.png", "00001_class1.png", "00002_class2.png", "00003_class2.png", "grid.png"]
    assert json.loads((out / "samples.json").read_text())["nfe_per_image"] == 4
    result = run_main("stages.sample", "--adapters", trained_adapters, "--cfg", "--classes", "1",
                     "--per-class", "1", "--steps", "4", "--out-dir", tmp_path / "cfg")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "cfg" / "samples.json").read_text())["method"] == "cfg"


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", [
    (["--classes", "1,99"], "not classes of the base model"),
    (["-w", "nan"], "guidance_scale"),
    (["--classes", "one"], "--classes: must be integers"),
])
def test_sample_command_rejects_bad_input(trained_adapters, tmp_path, args, message):
    result = run_main("stages.sample", "--adapters", trained_adapters, "--out-dir", tmp_path / "x", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()


def test_grids_draw_grey_and_colour_images(tmp_path):
    from PIL import Image

    from agd_pipeline.evaluation import grid_figure

    labels = np.repeat(np.arange(20), 2)
    for shape, name in (((40, 8, 8), "grey.png"), ((40, 8, 8, 3), "colour.png")):
        images = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
        grid_figure({"a": images, "b": images}, labels, 2, "t", tmp_path / name)
        assert Image.open(tmp_path / name).size[0] > 100
