"""Guidance on an interval of noise levels (generate.guidance_interval): CFG is applied exactly on the
interval when recording, the interval travels from the store to the adapters, and adapters add
exactly nothing outside it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agd_pipeline.adapters import AdaptedModel, AdapterConfig, load_adapted_model
from agd_pipeline.config import EvaluateConfig, GenerateConfig, load_config
from agd_pipeline.errors import ConfigError, StoreError
from agd_pipeline.config import check_interval
from agd_pipeline.guidance import effective_scale
from agd_pipeline.models import load_base_model
from agd_pipeline.sampling import CFG
from agd_pipeline.store import TrajectoryStore

from conftest import generate_store, read_all_shards

INTERVAL = [0.3, 0.7]


@pytest.fixture(scope="module")
def interval_store(tmp_path_factory, tiny_base_dir):
    store = tmp_path_factory.mktemp("interval") / "store"
    generate_store(tiny_base_dir, store, guidance_interval=INTERVAL, record_branches=True, num_steps=10,
                   trajectories_per_class=2, shard_size=20, batch_size=10, guidance_min=2.0, guidance_max=6.0)
    return store


def test_cfg_is_applied_exactly_on_the_interval(interval_store):
    assert TrajectoryStore(interval_store).manifest.guidance["interval"] == INTERVAL
    shards = list(read_all_shards(interval_store).values())
    arrays = {k: np.concatenate([s[k] for s in shards]) for k in
              ("guided_output", "cond_output", "uncond_output", "timesteps", "guidance_scale")}
    fraction = arrays["timesteps"][0] / 1000.0
    inside = (fraction >= INTERVAL[0]) & (fraction <= INTERVAL[1])
    assert inside.any() and (~inside).any()  # the 10 steps straddle both ends of the interval
    guided, cond, uncond = (arrays[k].astype(np.float32) for k in ("guided_output", "cond_output", "uncond_output"))
    # outside: the conditional output itself, bit for bit
    assert np.array_equal(arrays["guided_output"][:, ~inside], arrays["cond_output"][:, ~inside])
    # inside: uncond + w (cond - uncond) with the trajectory's w (from the float16-stored branches)
    w = arrays["guidance_scale"][:, None, None, None, None]
    expected = uncond[:, inside] + w * (cond[:, inside] - uncond[:, inside])
    np.testing.assert_allclose(guided[:, inside], expected, atol=2e-2, rtol=1e-2)
    # and there guidance did act: w >= 2 moves the output well away from the conditional one
    assert np.abs(guided[:, inside] - cond[:, inside]).mean() > 10 * np.abs(guided[:, inside] - expected).mean()


def test_cfg_outside_the_interval_costs_one_evaluation(tiny_base_dir):
    base = load_base_model(str(tiny_base_dir))
    calls = []
    predict = base.predict

    def counting(x, t, cond):
        calls.append(x.shape[0])
        return predict(x, t, cond)

    base.predict = counting
    x = torch.randn(3, *base.latent_shape)
    cond = {"class_label": torch.tensor([0, 1, 2])}
    cfg = CFG(base, 4.0, interval=(0.3, 0.7))
    outside = cfg(x, torch.tensor(900), cond)
    inside = cfg(x, torch.tensor(500), cond)
    assert calls == [3, 6]  # one conditional call outside, the batched pair inside
    with torch.no_grad():
        cond_only = base.prediction_channels(predict(x, torch.tensor(900), cond))
        full = CFG(base, 4.0)(x, torch.tensor(500), cond).guided
    assert torch.equal(outside.guided, cond_only)
    torch.testing.assert_close(inside.guided, full)
    branches = CFG(base, 4.0, interval=(0.3, 0.7), branches=True)(x, torch.tensor(900), cond)
    assert branches.uncond is not None and torch.equal(branches.guided, branches.cond)


def test_adapters_learn_the_interval_and_add_nothing_outside_it(interval_store, tmp_path):
    import agd_pipeline.training as training
    from agd_pipeline.config import TrainConfig

    config = load_config(TrainConfig, {"store": str(interval_store), "out_dir": str(tmp_path / "adapters"),
                                       "steps": 30, "batch_size": 32, "width": 8, "embed_dim": 16,
                                       "device": "cpu", "learning_rate": 0.01})
    training.train(config, progress=False, log=lambda *a, **k: None)
    saved = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert saved["guidance"]["interval"] == INTERVAL
    adapted = load_adapted_model(tmp_path / "adapters")
    assert adapted.guidance_interval == (0.3, 0.7)
    base = adapted.base
    x = torch.randn(4, *base.latent_shape)
    cond = {"class_label": torch.tensor([3, 4, 5, 6])}
    w = torch.full((4,), 5.0)
    with torch.no_grad():
        for t, guided in ((900, False), (100, False), (500, True)):
            plain = base.predict(x, torch.tensor(t), cond)
            out = adapted(x, torch.tensor(t), cond, w)
            assert torch.equal(out, plain) is not guided, t  # trained adapters act inside only
            # the same holds when the adapters run (training mode keeps the graph): the gate is 0 there
            condition, _ = adapted.embed(x, torch.tensor(t), cond, w)
            assert (condition.gate == 0).all().item() is not guided


def test_effective_scale_per_sample_timesteps():
    w = torch.tensor([3.0, 3.0, 3.0, 3.0])
    t = torch.tensor([0, 300, 700, 999])
    assert effective_scale(w, t, (0.3, 0.7), 1000).tolist() == [1.0, 3.0, 3.0, 1.0]
    assert effective_scale(w, t, None, 1000) is w


@pytest.mark.bad_input
@pytest.mark.parametrize("value", [[0.7, 0.3], [0.0, 1.5], [0.5], [-0.1, 0.5], ["a", 1], [0.2, float("nan")],
                                   [True, 1]])
def test_bad_intervals_are_refused_with_the_key(tiny_base_dir, tmp_path, value):
    with pytest.raises(ConfigError, match="generate.guidance_interval"):
        load_config(GenerateConfig, {"base_model": str(tiny_base_dir), "out_dir": str(tmp_path / "s"),
                                     "guidance_interval": value})
    with pytest.raises(ConfigError, match="evaluate.guidance_interval"):
        load_config(EvaluateConfig, {"adapters": str(tmp_path), "guidance_interval": value})
    assert not (tmp_path / "s").exists()
    assert check_interval([], "k") is None and check_interval([0, 1], "k") == (0.0, 1.0)


def test_interval_stores_are_not_resumed_as_full_guidance_ones(tiny_base_dir, tmp_path):
    store = tmp_path / "store"
    generate_store(tiny_base_dir, store, guidance_interval=INTERVAL)
    before = {name: {k: v.copy() for k, v in arrays.items()} for name, arrays in read_all_shards(store).items()}
    with pytest.raises(StoreError, match="guidance"):
        generate_store(tiny_base_dir, store)  # other settings: refused, nothing touched
    after = read_all_shards(store)
    assert all(np.array_equal(before[s][k], after[s][k]) for s in before for k in before[s])
    with pytest.raises(ConfigError, match="applies to trajectories only"):
        load_config(GenerateConfig, {"base_model": str(tiny_base_dir), "out_dir": str(tmp_path / "f"),
                                     "source": "forward_noised", "real_data": str(tmp_path / "x.npz"),
                                     "guidance_interval": INTERVAL})


def test_a_fresh_adapter_is_the_base_everywhere_even_with_an_interval(tiny_base_dir):
    base = load_base_model(str(tiny_base_dir))
    adapted = AdaptedModel(base, AdapterConfig(width=8, embed_dim=16, num_classes=base.num_classes)).eval()
    adapted.guidance_interval = (0.3, 0.7)
    x = torch.randn(2, *base.latent_shape)
    cond = {"class_label": torch.tensor([1, 2])}
    with torch.no_grad():
        assert torch.equal(adapted(x, torch.tensor(500), cond, 4.0), base.predict(x, torch.tensor(500), cond))
