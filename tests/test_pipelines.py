"""AGD adapters inside the user's own diffusers pipeline (agd_pipeline.pipelines), on tiny random-init
DiT, SD, SDXL and SD3 pipelines: one denoiser evaluation per step on batch B, the same result as our
own AGD loop, the pipeline's own CFG back bitwise after remove(), and refusals."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from agd_pipeline import adapters as adapters_module
from agd_pipeline.adapters import AdaptedModel, AdapterConfig, default_condition_on, load_adapted_model, save_adapters
from agd_pipeline.errors import ModelError
from agd_pipeline.models import encode_prompts, load_base_model
from agd_pipeline.pipelines import AGDAdapters
from agd_pipeline.sampling import AGD, Unguided, generators_for, initial_noise, sample

from conftest import REPO, make_dit, make_scheduler
from tiny_pipelines import FAMILY_NAMES, TEXT_FAMILY_NAMES, null_component_kwargs

FAMILIES = FAMILY_NAMES  # the registered families, as agd_pipeline.families.FAMILIES lists them
TEXT_FAMILIES = TEXT_FAMILY_NAMES
PROMPTS = ["a red cat", "blue sky"]
NEGATIVE = "blurry"
CLASSES = [3, 999]
STEPS = 2
W = 4.5
KINDS = {"dit": "bottleneck", "sd": "cross_attention", "sdxl": "offset", "sd3": "bottleneck"}


def make_dit_pipeline(folder: Path) -> Path:
    """A tiny latent DiTPipeline (learned sigma, 1000 classes + DiTPipeline's null class 1000, a VAE)."""
    from diffusers import AutoencoderKL, DiTPipeline

    transformer = make_dit(seed=3, in_channels=4, out_channels=8, num_embeds_ada_norm=1000)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                            layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=16)
    DiTPipeline(transformer=transformer, vae=vae.eval(), scheduler=make_scheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, text_pipeline_dirs):
    """DiT plus the shared text pipelines: SD (DDIM), SDXL (Euler), SD3 (flow-match Euler)."""
    return {"dit": make_dit_pipeline(tmp_path_factory.mktemp("pipelines") / "dit"), **text_pipeline_dirs}


@pytest.fixture(scope="module")
def bases(folders):
    return {family: load_base_model(str(folder)) for family, folder in folders.items()}


@pytest.fixture(scope="module")
def encoded(bases):
    """(prompt conditions, the negative prompt's condition with one row) per text family."""
    return {family: encode_prompts(bases[family], PROMPTS, NEGATIVE) for family in TEXT_FAMILIES}


def adapter_config(base, encoded, kind: str, condition_on=None) -> AdapterConfig:
    if base.conditioning == "class":
        return AdapterConfig(kind=kind, placement=base.spec.placements[0], width=8, embed_dim=16,
                             condition_on=condition_on or default_condition_on("class"),
                             num_classes=base.num_classes)
    cond, _ = encoded[base.family]
    pooled = cond.get("pooled_prompt_embeds")
    return AdapterConfig(kind=kind, placement=base.spec.placements[0], width=8, embed_dim=16,
                         condition_on=condition_on or default_condition_on("text"),
                         text_dim=cond["prompt_embeds"].shape[-1], pooled_dim=0 if pooled is None else pooled.shape[-1])


def write_adapters(base, config: AdapterConfig, folder: Path, seed: int = 0) -> Path:
    """Adapters with every weight nudged (fresh ones are exact no-ops: the tests would be vacuous)."""
    model = AdaptedModel(base, config)
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=noise))
    save_adapters(model, folder)
    model.remove()
    return folder


@pytest.fixture(scope="module")
def adapter_dirs(bases, encoded, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {family: write_adapters(base, adapter_config(base, encoded, KINDS[family]), root / family)
            for family, base in bases.items()}


def load_pipe(folder):
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), **null_component_kwargs(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser(pipe):
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def count_evaluations(pipe) -> tuple[list, object]:
    """Batch sizes of the denoiser's real evaluations (seen inside it, at its first layer)."""
    net = denoiser(pipe)
    first = net.conv_in if hasattr(net, "conv_in") else net.pos_embed
    batches = []
    return batches, first.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))


def no_hooks_left(pipe) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks) for m in denoiser(pipe).modules())


def dit_noise(base, seed: int) -> torch.Tensor:
    """DiTPipeline draws the whole batch's noise from one generator."""
    return randn_tensor((len(CLASSES), *base.latent_shape), generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float32)


def run_pipe(pipe, family: str, w: float = W, seed: int = 7, noise=None, **kwargs):
    """One plain pipeline call: DiT from a seed (images as numpy), the text families from ``noise``
    (latents unless an output_type is given)."""
    if family == "dit":
        return pipe(class_labels=CLASSES, guidance_scale=w, generator=torch.Generator().manual_seed(seed),
                    num_inference_steps=STEPS, output_type=kwargs.pop("output_type", "np"), **kwargs).images
    return pipe(PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), guidance_scale=w, latents=noise.clone(),
                num_inference_steps=STEPS, output_type=kwargs.pop("output_type", "latent"), **kwargs).images


def our_loop(family, bases, encoded, denoiser_for, noise, negatives: bool = False):
    """Our own sampling loop with the same scheduler, noise and steps; DiT decoded as the pipeline does."""
    base = bases[family]
    if family == "dit":
        cond = torch.tensor(CLASSES)
    else:
        cond, uncond = encoded[family]
        if negatives:
            cond = {**cond, **{f"negative_{name}": uncond[name].expand(len(PROMPTS), *uncond[name].shape[1:])
                               for name in ("prompt_embeds", "pooled_prompt_embeds") if name in uncond}}
    latents = sample(base, cond, noise, STEPS, denoiser_for(base))
    if family != "dit":
        return latents
    with torch.no_grad():
        return (base.decode(latents) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()


def agd_reference(family, bases, encoded, folder, noise, w=W, negatives=False):
    adapted = load_adapted_model(folder, bases[family])
    try:
        return our_loop(family, bases, encoded, lambda base: AGD(adapted, w), noise, negatives)
    finally:
        adapted.remove()


def noise_for(family, bases, seed: int = 7):
    base = bases[family]
    return dit_noise(base, seed) if family == "dit" else initial_noise(base, generators_for([seed, seed + 1]))


def assert_close(actual, expected, atol=1e-5):
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ------------------------------------------------------------------------------ the main promise


@pytest.mark.parametrize("family", FAMILIES)
def test_one_evaluation_per_step_and_our_agd_loop_result_then_the_pipelines_own_cfg(
        family, folders, bases, encoded, adapter_dirs):
    pipe = load_pipe(folders[family])
    pipeline_class = type(pipe)
    noise = noise_for(family, bases)
    untouched = run_pipe(pipe, family, noise=noise)
    batches, handle = count_evaluations(pipe)
    try:
        run_pipe(pipe, family, noise=noise)
        assert batches == [2 * len(PROMPTS)] * STEPS  # the pipeline's own CFG: 2B per step
        batches.clear()
        adapters = AGDAdapters.from_pretrained(adapter_dirs[family])
        with adapters.applied(pipe) as applied:
            assert applied is pipe and isinstance(pipe, pipeline_class)
            agd = run_pipe(pipe, family, noise=noise)
        assert batches == [len(PROMPTS)] * STEPS  # one evaluation per step, on batch B
    finally:
        handle.remove()
    assert_close(agd, agd_reference(family, bases, encoded, adapter_dirs[family], noise))
    # not vacuous: the adapters change the result (from the base alone and from its CFG)
    unguided = our_loop(family, bases, encoded, Unguided, noise)
    assert torch.as_tensor(agd - unguided).abs().max() > 1e-3
    assert torch.as_tensor(agd - untouched).abs().max() > 1e-3
    # removed: exactly the pipeline it was
    assert type(pipe) is pipeline_class and no_hooks_left(pipe)
    after = run_pipe(pipe, family, noise=noise)
    assert torch.equal(torch.as_tensor(after), torch.as_tensor(untouched))


@pytest.mark.parametrize("family", ["dit", "sd"])
def test_guidance_scale_at_most_one_runs_the_adapters_at_that_w(family, folders, bases, encoded, adapter_dirs):
    """The pipelines do no CFG then; the adapters see that w (at w = 1 their gate makes them no-ops)."""
    pipe = load_pipe(folders[family])
    noise = noise_for(family, bases)
    untouched = run_pipe(pipe, family, w=1.0, noise=noise)
    adapters = AGDAdapters.from_pretrained(adapter_dirs[family])
    batches, handle = count_evaluations(pipe)
    try:
        with adapters.applied(pipe):
            at_one = run_pipe(pipe, family, w=1.0, noise=noise)
            below = run_pipe(pipe, family, w=0.5, noise=noise)
    finally:
        handle.remove()
    assert batches == [len(PROMPTS)] * (2 * STEPS)
    assert torch.equal(torch.as_tensor(at_one), torch.as_tensor(untouched))
    assert_close(below, agd_reference(family, bases, encoded, adapter_dirs[family], noise, w=0.5))


class RecordingProcessor:
    """diffusers' attention processor, taking (and recording) one extra keyword."""

    notes: list = []

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.processor = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, note=None):
        RecordingProcessor.notes.append(note)
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_callbacks_output_types_and_attention_kwargs_still_work(folders, bases, encoded, adapter_dirs):
    pipe = load_pipe(folders["sd"])
    noise = noise_for("sd", bases)
    expected = agd_reference("sd", bases, encoded, adapter_dirs["sd"], noise)
    seen = []

    def on_step_end(pipeline, step, timestep, tensors):
        seen.append((step, tensors["latents"].clone(), tensors["prompt_embeds"].shape[0]))
        return tensors

    with AGDAdapters.from_pretrained(adapter_dirs["sd"]).applied(pipe):
        latents = run_pipe(pipe, "sd", noise=noise, callback_on_step_end=on_step_end,
                           callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
        # cross_attention_kwargs reach the attention processors (one that takes a keyword of its own)
        pipe.unet.set_attn_processor(RecordingProcessor())
        images = run_pipe(pipe, "sd", noise=noise, output_type="pt", cross_attention_kwargs={"note": "agd"})
        assert RecordingProcessor.notes and set(RecordingProcessor.notes) == {"agd"}
        # the diffusers docs' "dynamic CFG" callback: guidance off after the first step
        batches, handle = count_evaluations(pipe)

        def stop_guiding(pipeline, step, timestep, tensors):
            pipeline._guidance_scale = 1.0
            tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[-1]
            return tensors

        run_pipe(pipe, "sd", noise=noise, callback_on_step_end=stop_guiding,
                 callback_on_step_end_tensor_inputs=["prompt_embeds"])
        handle.remove()
    assert_close(latents, expected)
    assert [step for step, *_ in seen] == list(range(STEPS))
    assert torch.equal(seen[-1][1], latents)
    assert seen[0][2] == 2 * len(PROMPTS)  # the pipeline's own tensors are untouched: still both halves
    assert batches == [len(PROMPTS)] * STEPS
    with torch.no_grad():
        decoded = pipe.vae.decode(expected / pipe.vae.config.scaling_factor).sample
    assert_close(images, pipe.image_processor.postprocess(decoded, output_type="pt"), atol=1e-4)
    # SD3's joint_attention_kwargs pass through as well; its skip-layer guidance branch (one more call
    # on batch B, at the second step here) runs the base as it is
    sd3 = load_pipe(folders["sd3"])
    noise = noise_for("sd3", bases)
    batches, handle = count_evaluations(sd3)
    with AGDAdapters.from_pretrained(adapter_dirs["sd3"]).applied(sd3):
        latents = run_pipe(sd3, "sd3", noise=noise, joint_attention_kwargs={"scale": 1.0})
        run_pipe(sd3, "sd3", noise=noise, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                 skip_layer_guidance_stop=1.0)
    handle.remove()
    assert_close(latents, agd_reference("sd3", bases, encoded, adapter_dirs["sd3"], noise))
    assert batches == [len(PROMPTS)] * (2 * STEPS + 1)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_the_adapters_see_the_prompt_and_the_negative_prompt_of_the_batch(family, folders, encoded, adapter_dirs):
    pipe = load_pipe(folders[family])
    adapters = AGDAdapters.from_pretrained(adapter_dirs[family])
    seen = []
    with adapters.applied(pipe):
        embedding = adapters.model.embedding
        original = embedding.forward
        embedding.forward = lambda w, t, cond: seen.append((w, cond)) or original(w, t, cond)
        try:
            pipe(PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), guidance_scale=3.0, num_inference_steps=1,
                 output_type="latent")
        finally:
            del embedding.forward
    (w, cond), = seen
    prompts, negative = encoded[family]
    assert w.tolist() == [3.0] * len(PROMPTS)
    for name in ("prompt_embeds", "pooled_prompt_embeds"):
        if name in prompts:
            torch.testing.assert_close(cond[name], prompts[name], atol=1e-6, rtol=0)
            torch.testing.assert_close(cond[f"negative_{name}"], negative[name].expand_as(prompts[name]),
                                       atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_adapters_conditioned_on_the_negative_prompt(family, folders, bases, encoded, tmp_path):
    if "negative_text" not in adapters_module.CONDITION_SOURCES:
        pytest.skip("ConditionEmbedding has no negative_text source yet")
    base = bases[family]
    config = adapter_config(base, encoded, "bottleneck", ["guidance", "timestep", "text", "negative_text"])
    folder = write_adapters(base, config, tmp_path / "adapters")
    pipe = load_pipe(folders[family])
    noise = noise_for(family, bases)
    with AGDAdapters.from_pretrained(folder).applied(pipe):
        agd = run_pipe(pipe, family, noise=noise)
        other_negative = pipe(PROMPTS, negative_prompt=["grainy"] * len(PROMPTS), guidance_scale=W,
                              latents=noise.clone(), num_inference_steps=STEPS, output_type="latent").images
        unguided = run_pipe(pipe, family, w=1.0, noise=noise)  # no negative in the batch: the gate is 0
    assert_close(agd, agd_reference(family, bases, encoded, folder, noise, negatives=True))
    assert (agd - other_negative).abs().max() > 1e-4  # the negative prompt reaches the adapters
    assert_close(unguided, our_loop(family, bases, encoded, Unguided, noise))


# ------------------------------------------------------------------------------------ refusals


def test_a_fine_tuned_pipeline_warns_and_still_applies(folders, adapter_dirs):
    pipe = load_pipe(folders["dit"])
    with torch.no_grad():
        pipe.transformer.pos_embed.proj.weight.add_(1e-2)
    adapters = AGDAdapters.from_pretrained(adapter_dirs["dit"])
    with pytest.warns(UserWarning, match="different weights"):
        adapters.apply(pipe)
    assert adapters.pipeline is pipe
    adapters.remove()
    # the pipeline the adapters were trained on: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with AGDAdapters.from_pretrained(adapter_dirs["dit"]).applied(load_pipe(folders["dit"])):
            pass


@pytest.mark.bad_input
def test_another_architecture_or_family_or_pipeline_is_refused_leaving_nothing_behind(folders, adapter_dirs):
    from diffusers import DiTPipeline, StableDiffusionImg2ImgPipeline

    dit = load_pipe(folders["dit"])
    smaller = DiTPipeline(transformer=make_dit(seed=3, in_channels=4, out_channels=8, num_embeds_ada_norm=1000,
                                               num_layers=1), vae=dit.vae, scheduler=dit.scheduler)
    sdxl = load_pipe(folders["sdxl"])
    img2img = StableDiffusionImg2ImgPipeline(**load_pipe(folders["sd"]).components)
    cases = [(adapter_dirs["dit"], smaller, r"Adapters only load into the architecture they were trained on"),
             (adapter_dirs["sd"], sdxl, r"trained for a Stable Diffusion 1.x/2.x model .*not for a StableDiffusionXL"),
             (adapter_dirs["sd3"], dit, r"not for a DiTPipeline"),
             (adapter_dirs["sd"], img2img, r"apply to DiTPipeline, .*got StableDiffusionImg2ImgPipeline"),
             (adapter_dirs["dit"], object(), r"got object")]
    for folder, pipe, message in cases:
        pipeline_class = type(pipe)
        adapters = AGDAdapters.from_pretrained(folder)
        with pytest.raises(ModelError, match=message) as error:
            adapters.apply(pipe)
        assert "\n" not in str(error.value)
        assert adapters.pipeline is None and type(pipe) is pipeline_class
        if hasattr(pipe, "components"):
            assert no_hooks_left(pipe)
    with pytest.raises(ModelError, match="no adapter_config.json"):
        AGDAdapters.from_pretrained(folders["dit"])


def test_apply_twice_remove_twice_and_a_shared_denoiser(folders, bases, adapter_dirs, tmp_path):
    import json

    from diffusers import DiTPipeline

    pipe = load_pipe(folders["dit"])
    untouched = run_pipe(pipe, "dit")
    adapters = AGDAdapters.from_pretrained(adapter_dirs["dit"])
    adapters.remove()  # never applied: nothing to do
    assert adapters.apply(pipe) is pipe and adapters.apply(pipe) is pipe  # idempotent
    net = pipe.transformer
    assert len(net._forward_pre_hooks) == 1 and len(net._forward_hooks) == 1
    agd = run_pipe(pipe, "dit")
    # saved while applied: the pipeline's own class name and the base weights only
    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == "DiTPipeline"
    assert torch.equal(torch.as_tensor(run_pipe(load_pipe(tmp_path / "saved"), "dit")), torch.as_tensor(untouched))
    # a second set of adapters on the same pipeline, or the same adapters on a second one: refused
    with pytest.raises(ModelError, match="already carries AGD adapters"):
        AGDAdapters.from_pretrained(adapter_dirs["dit"]).apply(pipe)
    second = load_pipe(folders["dit"])
    with pytest.raises(ModelError, match="applied to another DiTPipeline"):
        adapters.apply(second)
    # a pipeline sharing the denoiser: refused as well, and its own calls stay plain CFG
    sharing = DiTPipeline(transformer=net, vae=pipe.vae, scheduler=pipe.scheduler)
    sharing.set_progress_bar_config(disable=True)
    with pytest.raises(ModelError, match="applied through another pipeline"):
        AGDAdapters.from_pretrained(adapter_dirs["dit"]).apply(sharing)
    assert torch.equal(torch.as_tensor(run_pipe(sharing, "dit")), torch.as_tensor(untouched))
    # the denoiser called on its own is the base
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([500, 20]), torch.tensor(CLASSES)
    with torch.no_grad():
        alone = net(x, timestep=t, class_labels=labels).sample
    adapters.remove()
    adapters.remove()
    with torch.no_grad():
        assert torch.equal(net(x, timestep=t, class_labels=labels).sample, alone)
    assert torch.equal(torch.as_tensor(run_pipe(pipe, "dit")), torch.as_tensor(untouched))
    # and the adapters apply again afterwards, here or elsewhere, with the same result
    with adapters.applied(second):
        assert torch.equal(torch.as_tensor(run_pipe(second, "dit")), torch.as_tensor(agd))


def test_nothing_stays_behind_when_the_call_fails(folders, bases, adapter_dirs):
    pipe = load_pipe(folders["dit"])
    adapters = AGDAdapters.from_pretrained(adapter_dirs["dit"])
    with pytest.raises(RuntimeError, match="boom"):
        with adapters.applied(pipe):
            adapters.model.adapters[0].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
            run_pipe(pipe, "dit")
    assert adapters.model is None and no_hooks_left(pipe)
    adapters.apply(pipe)
    try:
        model = adapters.model
        with pytest.raises(RuntimeError, match="boom"):
            handle = model.adapters[0].register_forward_hook(
                lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
            run_pipe(pipe, "dit")
        handle.remove()
        assert model._condition is None  # cleared although the denoiser raised
        with pytest.raises(ModelError, match="guidance_scale must be a finite number"):
            run_pipe(pipe, "dit", w=float("nan"))
        # and the next call is AGD as before
        expected = agd_reference("dit", bases, {}, adapter_dirs["dit"], noise_for("dit", bases))
        assert_close(run_pipe(pipe, "dit"), expected)
        pipe.transformer = load_pipe(folders["dit"]).transformer
        with pytest.raises(ModelError, match="was replaced after"):
            run_pipe(pipe, "dit")
    finally:
        adapters.remove()


# --------------------------------------------------------------------- the README's snippet

README_MARKER = "<!-- tested by tests/test_pipelines.py -->"
def readme_snippet() -> str:
    """The README's snippet: the python block after the marker."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(re.escape(README_MARKER) + r"\s*```python\n(.*?)```", readme, re.S)
    assert found, f"README.md has no python block after {README_MARKER}"
    return found.group(1)


def test_readme_snippet_runs(folders, adapter_dirs, tmp_path, monkeypatch):
    code = readme_snippet()
    for real, tiny in (("stabilityai/stable-diffusion-2-1", str(folders["sd"])),
                       ("data/sd-2.1/adapters", str(adapter_dirs["sd"])),
                       ("num_inference_steps=50", "num_inference_steps=2")):
        assert real in code
        code = code.replace(real, tiny)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README snippet", "exec"), namespace)  # noqa: S102 - our own snippet
    assert (tmp_path / "bicycle.png").is_file()
    pipe = namespace["pipe"]
    assert type(pipe).__name__ == "StableDiffusionPipeline" and namespace["adapters"].pipeline is None
    assert no_hooks_left(pipe)


def test_a_pipeline_sampling_with_another_scheduler_than_recorded_warns(bases, encoded, folders, tmp_path):
    """The adapters learned the recorded sampler's states: the pipeline's own scheduler is used as
    it is, but another one than recorded is said."""
    from diffusers import EulerDiscreteScheduler

    base = bases["sd"]
    model = AdaptedModel(base, adapter_config(base, encoded, KINDS["sd"]))
    recorded = {"scheduler": "EulerDiscreteScheduler", "config": dict(base.scheduler.config), "num_steps": STEPS}
    save_adapters(model, tmp_path / "adapters", extra={"sampler": recorded})
    model.remove()
    pipe = load_pipe(folders["sd"])
    noise = torch.randn(len(PROMPTS), *base.latent_shape, generator=torch.Generator().manual_seed(0))
    adapters = AGDAdapters.from_pretrained(tmp_path / "adapters")
    with adapters.applied(pipe):
        assert type(pipe.scheduler).__name__ != "EulerDiscreteScheduler"
        with pytest.warns(UserWarning, match="distilled from EulerDiscreteScheduler trajectories"):
            run_pipe(pipe, "sd", noise=noise)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*distilled from", category=UserWarning)
            run_pipe(pipe, "sd", noise=noise)
