"""Our sampling loop against the real diffusers DiTPipeline, and the CFG properties it relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from agd_pipeline.models import load_base_model
from agd_pipeline.sampling import AGD, CFG, Unguided, generators_for, initial_noise, sample, trajectory_seed

from conftest import make_dit, make_scheduler

LABELS = [3, 999, 0]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A tiny latent DiT pipeline (learned sigma, null class 1000, a real VAE) saved with save_pretrained."""
    from diffusers import AutoencoderKL, DiTPipeline

    transformer = make_dit(seed=3, in_channels=4, out_channels=8, num_embeds_ada_norm=1000)
    torch.manual_seed(4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=16)
    pipe = DiTPipeline(transformer=transformer, vae=vae.eval(), scheduler=make_scheduler())
    folder = tmp_path_factory.mktemp("dit_pipeline") / "pipe"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(pipeline_dir):
    return load_base_model(str(pipeline_dir))


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(str(pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def postprocess(images: torch.Tensor) -> np.ndarray:
    """DiTPipeline's output_type="np" post-processing."""
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()


def test_loaded_pipeline_presents_dit_interface(base):
    assert base.family == "dit"
    assert base.null_class == 1000  # DiTPipeline hard-codes 1000 as the null class
    assert base.learned_sigma
    assert base.latent_shape == (4, 8, 8)
    assert base.vae is not None
    assert not base.net.training
    assert not any(p.requires_grad for p in base.net.parameters())


@pytest.mark.parametrize("w", [1.5, 4.0])
def test_cfg_loop_reproduces_dit_pipeline(pipe, base, w):
    steps, seed = 5, 7
    expected = pipe(class_labels=LABELS, guidance_scale=w, generator=torch.Generator().manual_seed(seed),
                    num_inference_steps=steps, output_type="np").images
    # DiTPipeline draws the whole batch's noise from one generator.
    noise = randn_tensor((len(LABELS), *base.latent_shape), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float32)
    latents = sample(base, torch.tensor(LABELS), noise, steps, CFG(base, w))
    with torch.no_grad():
        ours = postprocess(base.decode(latents))
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    # not vacuous: the images are not constant
    assert expected.std() > 1e-3


def test_cfg_differs_from_unguided_and_w1_is_unguided(base):
    labels = torch.tensor(LABELS)
    noise = initial_noise(base, generators_for([1, 2, 3]))
    unguided = sample(base, labels, noise, 4, Unguided(base))
    guided = sample(base, labels, noise, 4, CFG(base, 4.0))
    w_one = sample(base, labels, noise, 4, CFG(base, 1.0))
    assert (guided - unguided).abs().max() > 1e-3, "CFG at w=4 gave the unguided result"
    # w = 1 is no guidance: uncond + 1 * (cond - uncond) = cond
    torch.testing.assert_close(w_one, unguided, atol=1e-5, rtol=1e-5)


def test_per_sample_guidance_equals_separate_runs(base):
    labels = torch.tensor(LABELS)
    ws = [1.5, 4.0, 7.0]
    noise = initial_noise(base, generators_for([11, 12, 13]))
    together = sample(base, labels, noise, 4, CFG(base, torch.tensor(ws)))
    for i, w in enumerate(ws):
        alone = sample(base, labels[i:i + 1], noise[i:i + 1], 4, CFG(base, w))
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    # and the scales really act per sample: a shared scale gives other results for the others
    shared = sample(base, labels, noise, 4, CFG(base, ws[0]))
    assert (shared[1:] - together[1:]).abs().max() > 1e-3


def test_cfg_predict_batches_cond_then_null(base):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, *base.latent_shape, generator=gen)
    labels = torch.tensor(LABELS)
    t = torch.tensor(400)
    w = torch.tensor([2.0, 3.0, 5.0])
    with torch.no_grad():
        guided, cond, uncond = base.cfg_predict(x, t, labels, w)
        cond_ref = base.predict(x, t, labels)[:, :4]
        uncond_ref = base.predict(x, t, torch.full_like(labels, 1000))[:, :4]
    assert guided.shape == (3, 4, 8, 8)  # only the prediction channels, not sigma
    torch.testing.assert_close(cond, cond_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncond, uncond_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided, uncond_ref + w.view(-1, 1, 1, 1) * (cond_ref - uncond_ref),
                               atol=1e-5, rtol=1e-5)
    assert (cond - uncond).abs().max() > 1e-4


def test_cfg_predict_accepts_per_sample_timesteps(base):
    """Training data and stores carry one timestep per sample; cfg_predict must accept them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, *base.latent_shape, generator=gen)
    labels = torch.tensor(LABELS)
    w = torch.tensor([2.0, 3.0, 5.0])
    t = torch.tensor([900, 400, 50])
    with torch.no_grad():
        try:
            guided, cond, uncond = base.cfg_predict(x, t, labels, w)
        except RuntimeError as err:
            pytest.fail("BUG: cfg_predict does not duplicate a per-sample timestep vector for the "
                        f"[cond, null] batch ({err})")
        for i in range(3):
            ref, _, _ = base.cfg_predict(x[i:i + 1], t[i], labels[i:i + 1], w[i:i + 1])
            torch.testing.assert_close(guided[i:i + 1], ref, atol=1e-5, rtol=1e-5)


def test_observer_sees_every_step_and_branches(base):
    labels = torch.tensor(LABELS)
    noise = initial_noise(base, generators_for([5, 6, 7]))
    w = torch.tensor([2.0, 3.0, 4.0])
    steps = []
    final = sample(base, labels, noise, 3, CFG(base, w), observer=steps.append)
    assert [s.index for s in steps] == [0, 1, 2]
    scheduler = make_scheduler()
    scheduler.set_timesteps(3)
    assert [int(s.timestep) for s in steps] == scheduler.timesteps.tolist()
    torch.testing.assert_close(steps[0].model_input, noise)  # DDIM: init sigma 1, no input scaling
    x = noise
    for s in steps:  # the recorded output is the one the scheduler stepped with
        torch.testing.assert_close(s.model_input, x)
        torch.testing.assert_close(s.guided_output,
                                   s.uncond_output + w.view(-1, 1, 1, 1) * (s.cond_output - s.uncond_output))
        x = scheduler.step(s.guided_output, s.timestep, x).prev_sample
    torch.testing.assert_close(final, x)


def test_initial_noise_is_independent_of_batch_mates(base):
    seeds = [trajectory_seed(0, i) for i in range(4)]
    batch = initial_noise(base, generators_for(seeds))
    for i, seed in enumerate(seeds):
        alone = initial_noise(base, generators_for([seed]))
        assert torch.equal(batch[i:i + 1], alone)
    assert not torch.equal(batch[0], batch[1])


def test_trajectory_seed_depends_on_run_seed_and_index():
    assert trajectory_seed(0, 5) == trajectory_seed(0, 5)
    assert len({trajectory_seed(0, i) for i in range(100)}) == 100
    assert trajectory_seed(0, 5) != trajectory_seed(1, 5)


def test_agd_sampling_requires_guidance_scale():
    with pytest.raises(ValueError, match="guidance scale"):
        AGD(lambda *a: None, None)


def test_component_folders_without_model_index_load_the_same_model(tiny_base_dir, tmp_path):
    import shutil

    folder = tmp_path / "components"
    shutil.copytree(tiny_base_dir, folder)
    (folder / "model_index.json").unlink()
    with_index, without = load_base_model(str(tiny_base_dir)), load_base_model(str(folder))
    assert without.family == "dit" and without.vae is None
    assert without.null_class == with_index.null_class == 10
    assert without.weights_fingerprint() == with_index.weights_fingerprint()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(without.predict(x, 500, torch.tensor([1, 10])),
                           with_index.predict(x, 500, torch.tensor([1, 10])))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_scheduler_can_be_swapped(tiny_base_dir):
    from diffusers import EulerDiscreteScheduler

    base = load_base_model(str(tiny_base_dir), scheduler="EulerDiscreteScheduler")
    assert isinstance(base.scheduler, EulerDiscreteScheduler)
    assert base.scheduler.config.num_train_timesteps == 1000
    noise = initial_noise(base, generators_for([1, 2]))
    steps = []
    out = sample(base, torch.tensor([1, 2]), noise, 3, CFG(base, 3.0), observer=steps.append)
    assert torch.isfinite(out).all()
    # Euler scales the initial noise and the model input: the observer sees what the model saw
    scheduler = base.scheduler.__class__.from_config(base.scheduler.config)
    scheduler.set_timesteps(3)
    sigma0 = scheduler.init_noise_sigma
    assert sigma0 > 1
    torch.testing.assert_close(steps[0].model_input, scheduler.scale_model_input(noise * sigma0,
                                                                                 scheduler.timesteps[0]))
