"""Half precision and the sampler the adapters learned: CFG targets combine with w in float32 on a
half-precision base (every family), VAEs marked force_upcast decode in float32, and inference uses
the scheduler the trajectories were recorded with unless told otherwise (then it warns)."""

from __future__ import annotations

import warnings

import pytest
import torch

from agd_pipeline.adapters import AdaptedModel, AdapterConfig, default_condition_on, save_adapters
from agd_pipeline.models import encode_prompts, load_base_model
from agd_pipeline.sampling import scheduler_for

from conftest import generate_store
from tiny_pipelines import FAMILY_NAMES, make_sdxl_pipeline, tiny_builder


@pytest.fixture(scope="module")
def half_bases(tmp_path_factory):
    """A tiny model of every registered family, loaded in float16."""
    root = tmp_path_factory.mktemp("half")
    return {family: load_base_model(str(tiny_builder(family)(root / family)), dtype=torch.float16)
            for family in FAMILY_NAMES}


def condition(base, batch: int):
    if base.conditioning == "class":
        return base.class_condition(torch.arange(batch) % base.num_classes), None
    table, uncond = encode_prompts(base, ["a red cat", "blue sky"][:batch], "blurry")
    return table, uncond


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_half_precision_cfg_combines_with_w_in_float32(half_bases, family):
    base = half_bases[family]
    assert base.dtype == torch.float16
    cond, uncond = condition(base, 2)
    x = torch.randn(2, *base.latent_shape, generator=torch.Generator().manual_seed(0)).half()
    w = torch.tensor([4.37, 7.11])  # not representable in float16
    assert not torch.equal(w.half().float(), w)
    with torch.no_grad():
        guided, cond_out, uncond_out = base.cfg_predict(x, 500, cond, w, uncond)
    assert guided.dtype == torch.float16
    exact = uncond_out.float() + w.view(-1, 1, 1, 1) * (cond_out.float() - uncond_out.float())
    assert torch.equal(guided, exact.half())
    rounded = uncond_out + w.half().view(-1, 1, 1, 1) * (cond_out - uncond_out)
    assert (cond_out - uncond_out).abs().max() > 0 and not torch.equal(guided, rounded)


def test_force_upcast_vae_decodes_in_float32(tmp_path):
    base = load_base_model(str(make_sdxl_pipeline(tmp_path / "sdxl")), dtype=torch.float16)
    assert base.vae.config.force_upcast and base.vae.dtype == torch.float16
    latents = torch.randn(1, *base.latent_shape, generator=torch.Generator().manual_seed(0)).half() * 40
    seen = []
    handle = base.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.no_grad():
        images = base.decode(latents)
    handle.remove()
    assert seen == [torch.float32], "the decoder did not run in float32"
    assert torch.isfinite(images).all()
    assert base.vae.dtype == torch.float16  # put back afterwards


def adapters_on_euler_store(base_dir, tmp_path):
    """An adapter folder recorded (as training does) with the sampler of an Euler store."""
    from agd_pipeline.store import TrajectoryStore

    store = tmp_path / "store"
    generate_store(base_dir, store, scheduler="EulerDiscreteScheduler", trajectories_per_class=1, classes=[1, 2])
    manifest = TrajectoryStore(store).manifest
    base = load_base_model(str(base_dir))
    model = AdaptedModel(base, AdapterConfig(num_classes=base.num_classes, condition_on=default_condition_on("class")))
    folder = tmp_path / "adapters"
    save_adapters(model, folder, extra={"sampler": manifest.sampler, "guidance": manifest.guidance})
    return folder, manifest.sampler


def test_inference_samples_with_the_recorded_scheduler(tiny_base_dir, tmp_path):
    from agd_pipeline.inference import sample_images

    folder, recorded = adapters_on_euler_store(tiny_base_dir, tmp_path)
    assert recorded["scheduler"] == "EulerDiscreteScheduler"
    base = load_base_model(str(tiny_base_dir))
    assert type(base.scheduler).__name__ == "DDIMScheduler"  # the folder's own differs from the recorded one
    chosen = scheduler_for(base, recorded)
    assert type(chosen).__name__ == "EulerDiscreteScheduler" and dict(chosen.config) == recorded["config"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the recorded sampler: no warning of ours
        default = sample_images(str(folder), 3.0, classes=[1], per_class=2, steps=3, device="cpu")
        euler = sample_images(str(folder), 3.0, classes=[1], per_class=2, steps=3, device="cpu",
                              scheduler="EulerDiscreteScheduler")
    assert torch.equal(default["images"], euler["images"])
    with pytest.warns(UserWarning, match="distilled from EulerDiscreteScheduler trajectories"):
        ddim = sample_images(str(folder), 3.0, classes=[1], per_class=2, steps=3, device="cpu",
                             scheduler="DDIMScheduler")
    assert not torch.equal(ddim["images"], default["images"])


@pytest.mark.bad_input
def test_an_unknown_scheduler_is_a_clear_error(tiny_base_dir, tmp_path):
    from agd_pipeline.errors import ConfigError

    folder, recorded = adapters_on_euler_store(tiny_base_dir, tmp_path)
    with pytest.raises(ConfigError, match="'Banana' is not a diffusers scheduler class"):
        scheduler_for(load_base_model(str(tiny_base_dir)), recorded, "Banana")
