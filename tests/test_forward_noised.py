"""generate.source forward_noised: standard guidance distillation's data (real latents noised by the
forward process, labelled with CFG's output there), for the trajectories-vs-forward-noised ablation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agd_pipeline.config import GenerateConfig, load_config
from agd_pipeline.errors import ConfigError, StoreError
from agd_pipeline.models import load_base_model
from agd_pipeline.sampling import CFG
from agd_pipeline.store import TrajectoryStore

from conftest import generate_store, read_all_shards


def write_real_data(path, labels, seed=0, shape=(1, 8, 8)):
    rng = np.random.default_rng(seed)
    latents = rng.uniform(-1, 1, size=(len(labels), *shape)).astype(np.float32)
    np.savez(path, latents=latents, labels=np.asarray(labels, dtype=np.int64))
    return latents


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("real") / "train.npz"
    labels = [c for c in range(10) for _ in range(3)]  # three examples of every class
    return path, write_real_data(path, labels), np.asarray(labels)


def test_marginal_is_the_forward_process_and_targets_are_cfg(tiny_base_dir, real_data, tmp_path):
    """Every recorded model input is sqrt(a) x0 + sqrt(1 - a) eps for a real x0 of the trajectory's
    class, eps standard normal (independent across steps and trajectories), and every target is
    CFG's guided output at exactly that input, t and w."""
    path, latents, labels = real_data
    store = tmp_path / "store"
    config, _ = generate_store(tiny_base_dir, store, source="forward_noised", real_data=str(path),
                               trajectories_per_class=20, num_steps=4, shard_size=100, batch_size=50)
    manifest = TrajectoryStore(store).manifest
    assert manifest["source"]["kind"] == "forward_noised" and manifest["source"]["real_examples"] == 30
    arrays = {k: np.concatenate([s[k] for s in read_all_shards(store).values()]) for k in
              ("model_input", "guided_output", "timesteps", "class_label", "guidance_scale", "sample")}
    base = load_base_model(str(tiny_base_dir))
    alpha_bar = base.scheduler.alphas_cumprod
    x0 = arrays["sample"].astype(np.float32)
    # x0 is a real latent of the trajectory's class (stored in float16)
    for i, c in enumerate(arrays["class_label"]):
        candidates = latents[labels == c].astype(np.float16).astype(np.float32)
        assert (np.abs(candidates - x0[i]).reshape(len(candidates), -1).max(1) == 0).any(), i
    eps = []
    for k in range(config.num_steps):
        t = arrays["timesteps"][:, k]
        assert np.all(t == t[0])
        a = float(alpha_bar[int(t[0])])
        eps.append((arrays["model_input"][:, k].astype(np.float64) - np.sqrt(a) * x0) / np.sqrt(1 - a))
    eps = np.stack(eps, 1)  # [N, steps, C, H, W]
    n = eps.size
    assert abs(eps.mean()) < 4 / np.sqrt(n), eps.mean()  # mean 0 within 4 standard errors
    assert abs(eps.std() - 1) < 0.05, eps.std()
    flat = eps.reshape(eps.shape[0], eps.shape[1], -1)
    # independent across steps: correlation of eps between step 0 and step 1 is ~0
    corr = np.corrcoef(flat[:, 0].ravel(), flat[:, 1].ravel())[0, 1]
    assert abs(corr) < 0.05, corr
    # timesteps are the sampler's, high to low, as in a trajectory store of the same settings
    assert list(arrays["timesteps"][0]) == sorted(arrays["timesteps"][0], reverse=True)
    # the targets are CFG's output at the recorded inputs (float16 storage tolerance)
    x = torch.from_numpy(arrays["model_input"][:40, 2].astype(np.float32))
    t = torch.tensor(float(arrays["timesteps"][0, 2]))
    with torch.no_grad():
        expected = CFG(base, torch.from_numpy(arrays["guidance_scale"][:40]))(
            x, t, {"class_label": torch.from_numpy(arrays["class_label"][:40])}).guided
    np.testing.assert_allclose(arrays["guided_output"][:40, 2].astype(np.float32), expected.numpy(),
                               atol=2e-3, rtol=1e-2)


def test_forward_noised_store_is_deterministic_resumable_and_never_mixed(tiny_base_dir, real_data, tmp_path):
    path, *_ = real_data
    settings = dict(source="forward_noised", real_data=str(path))
    generate_store(tiny_base_dir, tmp_path / "a", **settings)
    generate_store(tiny_base_dir, tmp_path / "b", **settings)
    a, b = read_all_shards(tmp_path / "a"), read_all_shards(tmp_path / "b")
    for shard in a:
        for name in a[shard]:
            np.testing.assert_array_equal(a[shard][name], b[shard][name])
    # the same folder with trajectories: refused, never mixed
    with pytest.raises(StoreError, match="other settings.*source"):
        generate_store(tiny_base_dir, tmp_path / "a")
    # other real data: refused too (its checksum is part of the run's settings)
    other = tmp_path / "other.npz"
    write_real_data(other, [c for c in range(10) for _ in range(3)], seed=1)
    with pytest.raises(StoreError, match="other settings.*real_data"):
        generate_store(tiny_base_dir, tmp_path / "a", source="forward_noised", real_data=str(other))


def test_training_reads_a_forward_noised_store(tiny_base_dir, real_data, tmp_path):
    from agd_pipeline.config import TrainConfig
    from agd_pipeline.training import train

    path, *_ = real_data
    generate_store(tiny_base_dir, tmp_path / "store", source="forward_noised", real_data=str(path))
    config = load_config(TrainConfig, {"store": str(tmp_path / "store"), "out_dir": str(tmp_path / "adapters"),
                                       "steps": 4, "batch_size": 8, "width": 8, "embed_dim": 16,
                                       "checkpoint_every": 0, "device": "cpu"})
    train(config, progress=False, log=lambda *a, **k: None)
    assert (tmp_path / "adapters" / "adapters.safetensors").is_file()


@pytest.mark.bad_input
@pytest.mark.parametrize("case,match", [
    ("missing", "is not a file"),
    ("not_npz", "not a readable .npz"),
    ("no_labels", "lacks the array 'labels'"),
    ("shape", r"latents have shape \[30, 1, 4, 4\].*takes \[N, 1, 8, 8\]"),
    ("nan", "must be finite"),
    ("labels", "labels must be integers, one per latent"),
    ("class_missing", "no example of class 9"),
    ("empty", "real_data is empty"),
])
def test_bad_real_data_is_refused_before_anything_is_written(tiny_base_dir, tmp_path, case, match):
    path = tmp_path / "real.npz"
    labels = [c for c in range(10) for _ in range(3)]
    if case == "not_npz":
        path.write_text("not a zip")
    elif case == "no_labels":
        np.savez(path, latents=np.zeros((30, 1, 8, 8), np.float32))
    elif case == "shape":
        np.savez(path, latents=np.zeros((30, 1, 4, 4), np.float32), labels=np.asarray(labels))
    elif case == "nan":
        latents = np.zeros((30, 1, 8, 8), np.float32)
        latents[3, 0, 1, 1] = np.nan
        np.savez(path, latents=latents, labels=np.asarray(labels))
    elif case == "labels":
        np.savez(path, latents=np.zeros((30, 1, 8, 8), np.float32), labels=np.zeros(29, np.int64))
    elif case == "class_missing":
        write_real_data(path, [c % 9 for c in range(30)])
    elif case != "missing":
        path = ""
    with pytest.raises(ConfigError, match=match):
        generate_store(tiny_base_dir, tmp_path / "store", source="forward_noised", real_data=str(path))
    assert not (tmp_path / "store").exists()


@pytest.mark.bad_input
def test_a_scheduler_without_a_forward_process_is_refused(real_data, tmp_path):
    from diffusers import IPNDMScheduler

    from conftest import make_dit, write_base_folder

    path, *_ = real_data
    folder = write_base_folder(tmp_path / "ipndm_base", make_dit(0), IPNDMScheduler())
    with pytest.raises(ConfigError, match="IPNDMScheduler has neither alphas_cumprod nor flow matching"):
        generate_store(folder, tmp_path / "store", source="forward_noised", real_data=str(path))
    assert not (tmp_path / "store").exists()


def test_flow_matching_noises_along_the_straight_path(real_data, tmp_path):
    """With a flow-matching scheduler the recorded input is (1 - sigma) x0 + sigma eps at each step's
    sigma, eps standard normal, and the targets are CFG's output there."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from conftest import make_dit, write_base_folder

    path, latents, labels = real_data
    folder = write_base_folder(tmp_path / "flow_base", make_dit(0), FlowMatchEulerDiscreteScheduler(shift=3.0))
    store = tmp_path / "store"
    config, _ = generate_store(folder, store, source="forward_noised", real_data=str(path), trajectories_per_class=20,
                               num_steps=4, shard_size=100, batch_size=50)
    arrays = {k: np.concatenate([s[k] for s in read_all_shards(store).values()]) for k in
              ("model_input", "guided_output", "timesteps", "class_label", "guidance_scale", "sample")}
    x0 = arrays["sample"].astype(np.float64)
    for i, c in enumerate(arrays["class_label"]):
        candidates = latents[labels == c].astype(np.float16).astype(np.float64)
        assert (np.abs(candidates - x0[i]).reshape(len(candidates), -1).max(1) == 0).any(), i
    eps = []
    for k in range(config.num_steps):
        sigma = float(arrays["timesteps"][0, k]) / 1000  # flow matching's timesteps are sigma x 1000
        assert 0 < sigma <= 1
        eps.append((arrays["model_input"][:, k].astype(np.float64) - (1 - sigma) * x0) / sigma)
    eps = np.stack(eps, 1)
    assert abs(eps.mean()) < 4 / np.sqrt(eps.size) and abs(eps.std() - 1) < 0.05, (eps.mean(), eps.std())
    base = load_base_model(str(folder))
    x = torch.from_numpy(arrays["model_input"][:40, 1].astype(np.float32))
    with torch.no_grad():
        expected = CFG(base, torch.from_numpy(arrays["guidance_scale"][:40]))(
            x, torch.tensor(float(arrays["timesteps"][0, 1])),
            {"class_label": torch.from_numpy(arrays["class_label"][:40])}).guided
    np.testing.assert_allclose(arrays["guided_output"][:40, 1].astype(np.float32), expected.numpy(),
                               atol=2e-3, rtol=1e-2)


def test_real_data_needs_the_forward_noised_source():
    with pytest.raises(ConfigError, match="real_data: applies only with generate.source forward_noised"):
        load_config(GenerateConfig, {"real_data": "x.npz"})
    with pytest.raises(ConfigError, match="source"):
        load_config(GenerateConfig, {"source": "noise"})


def _captioned_real_data(path, base, captions, seed=0):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((len(captions), *base.latent_shape)).astype(np.float32)
    np.savez(path, latents=latents, captions=np.asarray(captions, dtype=str))
    return latents


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_text_models_noise_each_prompt_s_own_images(text_pipeline_dirs, tmp_path, family):
    """On a text model each trajectory noises a real latent captioned with its prompt (DDIM's
    forward process on SD, flow matching's straight path on SD3), and the target is CFG's output
    there for its prompt and its own negative prompt."""
    from agd_pipeline.generation import EMPTY_NEGATIVE
    from agd_pipeline.models import encode_prompts

    base = load_base_model(str(text_pipeline_dirs[family]))
    prompts = ["a cat", "a dog", "a red bird"]
    # several images per prompt; captions are matched as prompt files are read (stripped)
    captions = ["a dog", "a cat ", " a red bird ", "a cat", " a dog", "a cat"]
    real = tmp_path / "pairs.npz"
    latents = _captioned_real_data(real, base, captions)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (tmp_path / "negatives.txt").write_text("a blurry photo\nugly\n")
    store = tmp_path / "store"
    config, _ = generate_store(text_pipeline_dirs[family], store, source="forward_noised", real_data=str(real),
                               prompts_file=str(tmp_path / "prompts.txt"), trajectories_per_prompt=4,
                               negative_prompts_file=str(tmp_path / "negatives.txt"), empty_negative_probability=0.5,
                               num_steps=3, shard_size=12, batch_size=6)
    shards = read_all_shards(store)
    arrays = {k: np.concatenate([s[k] for s in shards.values()]) for k in next(iter(shards.values()))}
    assert TrajectoryStore(store).manifest["source"]["real_examples"] == len(captions)
    x0 = arrays["sample"].astype(np.float64)
    for i, prompt_index in enumerate(arrays["prompt_index"]):  # x0 is an image captioned with the prompt
        own = [j for j, text in enumerate(captions) if text.strip() == prompts[prompt_index]]
        stored = latents[own].astype(np.float16).astype(np.float64)
        assert (np.abs(stored - x0[i]).reshape(len(own), -1).max(1) == 0).any(), i
    flow = family == "sd3"
    alpha_bar = None if flow else base.scheduler.alphas_cumprod.double().numpy()
    for k in range(config.num_steps):
        t = float(arrays["timesteps"][0, k])
        keep, noise = (1 - t / 1000, t / 1000) if flow else (np.sqrt(alpha_bar[int(t)]), np.sqrt(1 - alpha_bar[int(t)]))
        eps = (arrays["model_input"][:, k].astype(np.float64) - keep * x0) / noise
        assert abs(eps.mean()) < 0.2 and 0.8 < eps.std() < 1.2, (k, eps.mean(), eps.std())
    # the target at step 1: CFG with each trajectory's prompt and negative prompt (or the empty one)
    negatives = ["a blurry photo", "ugly"]
    table, uncond_rows = encode_prompts(base, prompts, [*negatives, ""])
    index = torch.from_numpy(arrays["prompt_index"])
    negative = torch.from_numpy(arrays["negative_prompt_index"])
    assert set(negative.tolist()) <= {EMPTY_NEGATIVE, 0, 1}
    cond = {name: value[index] for name, value in table.items()}
    uncond = {name: value[negative] for name, value in uncond_rows.items()}
    with torch.no_grad():
        expected = CFG(base, torch.from_numpy(arrays["guidance_scale"]), uncond)(
            torch.from_numpy(arrays["model_input"][:, 1].astype(np.float32)),
            torch.tensor(float(arrays["timesteps"][0, 1])), cond).guided
    np.testing.assert_allclose(arrays["guided_output"][:, 1].astype(np.float32), expected.numpy(), atol=3e-3, rtol=1e-2)


@pytest.mark.parametrize("case,match", [
    ("labels", "lacks the array 'captions'.*text model"),
    ("uncaptioned", "no example captioned 'a red bird' \\(1 of the 3 prompts"),
    ("numbers", "captions must be strings, one per latent"),
])
def test_text_real_data_must_caption_every_prompt(text_pipeline_dirs, tmp_path, case, match):
    base = load_base_model(str(text_pipeline_dirs["sd"]))
    real = tmp_path / "pairs.npz"
    if case == "labels":
        np.savez(real, latents=np.zeros((3, *base.latent_shape), np.float32), labels=np.arange(3))
    elif case == "uncaptioned":
        _captioned_real_data(real, base, ["a cat", "a dog"])
    else:
        np.savez(real, latents=np.zeros((3, *base.latent_shape), np.float32), captions=np.arange(3))
    with pytest.raises(ConfigError, match=match):
        generate_store(text_pipeline_dirs["sd"], tmp_path / "store", source="forward_noised", real_data=str(real),
                       prompts_file=str(_prompts(tmp_path)))
    assert not (tmp_path / "store").exists()


def _prompts(folder):
    path = folder / "prompts.txt"
    path.write_text("a cat\na dog\na red bird\n")
    return path
