"""Negative prompts (issue 10): stage one records a negative prompt per trajectory
(generate.negative_prompts_file), adapters condition on it (condition_on negative_text), and sampling
passes it. On tiny random-init SD, SDXL and SD3 pipelines built offline."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from agd_pipeline.adapters import (ADAPTER_KINDS, CONDITION_SOURCES, PLACEMENTS, AdaptedModel, AdapterConfig,
                                   ConditionEmbedding, _adapter_section_problem, default_condition_on,
                                   resolve_placement)
from agd_pipeline.config import GenerateConfig, TrainConfig, load_config
from agd_pipeline.errors import ConfigError, ModelError
from agd_pipeline.generation import EMPTY_NEGATIVE, generate, negative_prompt_plan
from agd_pipeline.models import encode_prompts, load_base_model
from agd_pipeline.store import TrajectoryStore

from conftest import read_all_shards
from tiny_pipelines import TEXT_FAMILY_NAMES, null_component_kwargs

PROMPTS = ["a red cat", "blue sky", "an old oak"]
NEGATIVES = ["blurry", "low quality"]
FAMILIES = TEXT_FAMILY_NAMES  # the registered text-to-image families
QUIET = dict(progress=False, log=lambda *a, **k: None)
LEGACY_TEXT_ARRAYS = {"model_input", "guided_output", "timesteps", "guidance_scale", "seed", "trajectory_index",
                      "sample", "prompt_index", "prompt_embeds"}
# The settings of every store below: 6 trajectories, 3 steps, two shards. With seed 0 and an empty-prompt
# probability of 0.3, the plan uses the default negative prompt and both lines of the file (checked below).
SETTINGS = dict(trajectories_per_prompt=2, guidance_min=2.0, guidance_max=12.0, num_steps=3, batch_size=4,
                shard_size=4, device="cpu", seed=0)
EMPTY_PROBABILITY = 0.3


@pytest.fixture(scope="module")
def pipeline_dirs(text_pipeline_dirs):
    return text_pipeline_dirs


@pytest.fixture(scope="module")
def bases(pipeline_dirs):
    return {family: load_base_model(str(folder)) for family, folder in pipeline_dirs.items()}


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("negative_prompt_files")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "negatives.txt").write_text("\n".join(NEGATIVES) + "\n\n")
    return root / "prompts.txt", root / "negatives.txt"


def generate_config(folder, out_dir, prompt_files, negatives: bool = True, **overrides) -> GenerateConfig:
    prompts, negative_file = prompt_files
    extra = dict(negative_prompts_file=str(negative_file), empty_negative_probability=EMPTY_PROBABILITY) \
        if negatives else {}
    return load_config(GenerateConfig, {**SETTINGS, "base_model": str(folder), "out_dir": str(out_dir),
                                        "prompts_file": str(prompts), **extra, **overrides})


def store_arrays(root) -> dict[str, np.ndarray]:
    shards = read_all_shards(root)
    return {name: np.concatenate([s[name] for s in shards.values()]) for name in next(iter(shards.values()))}


@pytest.fixture(scope="module")
def stores(pipeline_dirs, prompt_files, tmp_path_factory):
    """One store with per-trajectory negative prompts per family."""
    root = tmp_path_factory.mktemp("negative_stores")
    for family, folder in pipeline_dirs.items():
        generate(generate_config(folder, root / family, prompt_files), **QUIET)
    return {family: root / family for family in FAMILIES}


def pipeline_negative(pipe, family: str, negative: str | None) -> dict:
    """The pipeline's own encode_prompt of one negative prompt (None: its default), as our keys."""
    if family == "sd":
        _, embeds = pipe.encode_prompt(["x"], "cpu", 1, True, negative_prompt=None if negative is None else [negative])
        return {"prompt_embeds": embeds}
    args = (["x"], None, None) if family == "sd3" else (["x"],)
    _, embeds, _, pooled = pipe.encode_prompt(*args, negative_prompt=negative, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=True)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


# ----------------------------------------------------------------------------------- the plan


def test_negative_prompt_is_a_function_of_seed_and_index_at_the_set_rate():
    whole = negative_prompt_plan(7, range(4000), 3, 0.25)
    pieces = np.concatenate([negative_prompt_plan(7, r, 3, 0.25) for r in (range(0, 1234), range(1234, 4000))])
    np.testing.assert_array_equal(whole, pieces)  # batches, shards, processes and resumes see the same plan
    np.testing.assert_array_equal(negative_prompt_plan(7, [3999, 5, 17], 3, 0.25), whole[[3999, 5, 17]])
    assert not np.array_equal(negative_prompt_plan(8, range(4000), 3, 0.25), whole)
    empty = (whole == EMPTY_NEGATIVE).mean()
    assert abs(empty - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 4000), empty  # 4 sigma
    counts = np.bincount(whole[whole >= 0], minlength=3)
    assert set(np.unique(whole)) == {-1, 0, 1, 2} and counts.min() > 0.9 * counts.mean()  # uniform over the file
    assert (negative_prompt_plan(7, range(500), 3, 0.0) >= 0).all()
    assert (negative_prompt_plan(7, range(500), 3, 1.0) == EMPTY_NEGATIVE).all()
    # a higher probability turns prompts into the default one and never changes the others
    higher = negative_prompt_plan(7, range(4000), 3, 0.5)
    kept = higher != EMPTY_NEGATIVE
    np.testing.assert_array_equal(higher[kept], whole[kept])


def test_the_rest_of_the_plan_is_that_of_a_run_without_negative_prompts(stores, prompt_files, pipeline_dirs,
                                                                        tmp_path):
    plain = tmp_path / "plain"
    generate(generate_config(pipeline_dirs["sd"], plain, prompt_files, negatives=False), **QUIET)
    with_negatives, without = store_arrays(stores["sd"]), store_arrays(plain)
    for name in ("seed", "trajectory_index", "prompt_index", "guidance_scale", "prompt_embeds"):
        np.testing.assert_array_equal(with_negatives[name], without[name], err_msg=name)
    expected = negative_prompt_plan(SETTINGS["seed"], range(6), len(NEGATIVES), EMPTY_PROBABILITY)
    np.testing.assert_array_equal(with_negatives["negative_prompt_index"], expected)
    assert set(expected) == {-1, 0, 1}, "the fixture must use the default and every negative prompt"


# ----------------------------------------------------------------------------------- the store


@pytest.mark.parametrize("family", FAMILIES)
def test_store_records_each_trajectorys_negative_prompt_as_the_pipeline_encodes_it(stores, pipeline_dirs, family):
    import diffusers

    manifest = TrajectoryStore(stores[family]).manifest
    assert manifest["guidance"]["negative_prompts"] == NEGATIVES
    assert manifest["guidance"]["empty_negative_probability"] == EMPTY_PROBABILITY
    assert manifest.negative_prompt == ""
    arrays = manifest.condition_arrays
    pooled = family != "sd"
    expected_names = {"negative_prompt_index", "negative_prompt_embeds"} | (
        {"negative_pooled_prompt_embeds"} if pooled else set())
    assert expected_names <= set(arrays) and not {"negative_add_time_ids"} & set(arrays)
    assert arrays["negative_prompt_embeds"]["shape"] == arrays["prompt_embeds"]["shape"]
    data = store_arrays(stores[family])
    folder = pipeline_dirs[family]
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), **null_component_kwargs(folder))
    with torch.no_grad():
        for i, index in enumerate(data["negative_prompt_index"]):
            negative = None if index == EMPTY_NEGATIVE else NEGATIVES[index]
            expected = pipeline_negative(pipe, family, negative)
            for name, value in expected.items():
                np.testing.assert_allclose(data[f"negative_{name}"][i], value[0].numpy(), rtol=1e-3, atol=1e-3,
                                           err_msg=f"{family} trajectory {i} {name}")
    if family == "sdxl":  # the default negative prompt of SDXL is zeros, as its pipeline does
        default = data["negative_prompt_index"] == EMPTY_NEGATIVE
        assert not data["negative_prompt_embeds"][default].any()
        assert not data["negative_pooled_prompt_embeds"][default].any()
    # xarray-style dimension names, shared with the prompt's
    group = TrajectoryStore(stores[family]).open_shard(manifest.shards[0]["name"])
    assert group["negative_prompt_embeds"].metadata.dimension_names == ("trajectory", "token", "text_embedding")


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_guidance_used_each_trajectorys_own_negative_prompt(stores, bases, family):
    base = bases[family]
    data = store_arrays(stores[family])
    x = torch.from_numpy(data["model_input"][:, 0]).float()
    t = torch.from_numpy(data["timesteps"][:, 0])
    w = torch.from_numpy(data["guidance_scale"])
    recorded = torch.from_numpy(data["guided_output"][:, 0]).float()
    cond, _ = encode_prompts(base, [PROMPTS[i] for i in data["prompt_index"]])
    own = [NEGATIVES[i] if i != EMPTY_NEGATIVE else "" for i in data["negative_prompt_index"]]
    other = [NEGATIVES[(i + 1) % len(NEGATIVES)] if i != EMPTY_NEGATIVE else NEGATIVES[0]
             for i in data["negative_prompt_index"]]
    with torch.no_grad():
        errors = {}
        for name, negatives in (("own", own), ("other", other)):
            _, uncond = encode_prompts(base, PROMPTS[:1], negatives)  # one row per trajectory
            guided, *_ = base.cfg_predict(x, t, cond, w, uncond)
            errors[name] = (guided - recorded).flatten(1).abs().max(1).values
    scale = recorded.flatten(1).abs().max(1).values
    assert (errors["own"] <= 2e-3 * scale + 1e-3).all(), errors["own"]  # float16 on disk
    assert (errors["other"] > 20 * (errors["own"] + 1e-3)).all(), (errors["other"], errors["own"])


def test_without_negative_prompts_file_the_store_is_todays(pipeline_dirs, prompt_files, tiny_store, tmp_path):
    """No new arrays, no new settings: the single negative_prompt as before (and class stores untouched)."""
    for family, negative in (("sd", "blurry"), ("sdxl", "")):
        root = tmp_path / family
        generate(generate_config(pipeline_dirs[family], root, prompt_files, negatives=False,
                                 negative_prompt=negative), **QUIET)
        manifest = TrajectoryStore(root).manifest
        assert set(manifest["guidance"]) == {"distribution", "min", "max", "formula"}
        assert manifest.negative_prompt == negative
        names = set(store_arrays(root))
        legacy = LEGACY_TEXT_ARRAYS | ({"pooled_prompt_embeds", "add_time_ids"} if family == "sdxl" else set())
        assert names == legacy and set(manifest.condition_arrays) == legacy & {
            "prompt_index", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids"}
    class_manifest = TrajectoryStore(tiny_store).manifest
    assert set(class_manifest.condition_arrays) == {"class_label"}
    assert set(class_manifest["guidance"]) == {"distribution", "min", "max", "formula"}
    assert not any(name.startswith("negative") for name in store_arrays(tiny_store))


def test_a_resumed_or_rebatched_store_keeps_every_negative_prompt(stores, pipeline_dirs, prompt_files, tmp_path):
    root = tmp_path / "rebatched"
    shutil.copytree(stores["sd"], root)
    manifest = json.loads((root / "manifest.json").read_text())
    shutil.rmtree(root / manifest["shards"][1]["name"])  # lost: written again on resume, in batches of 1
    generate(generate_config(pipeline_dirs["sd"], root, prompt_files, batch_size=1), **QUIET)
    resumed, original = store_arrays(root), store_arrays(stores["sd"])
    for name in ("negative_prompt_index", "negative_prompt_embeds", "prompt_embeds", "guidance_scale", "seed"):
        np.testing.assert_array_equal(resumed[name], original[name], err_msg=name)


def test_another_negative_prompts_file_is_another_run(stores, pipeline_dirs, prompt_files, tmp_path):
    from agd_pipeline.errors import StoreError

    root = tmp_path / "store"
    shutil.copytree(stores["sd"], root)
    other = tmp_path / "other.txt"
    other.write_text("dark\nnoisy\n")  # as many lines, so every array keeps its shape
    config = generate_config(pipeline_dirs["sd"], root, prompt_files, negative_prompts_file=str(other))
    with pytest.raises(StoreError, match="guidance.negative_prompts"):
        generate(config, **QUIET)


def test_generate_settings_are_checked(pipeline_dirs, prompt_files, tiny_base_dir, tmp_path):
    prompts, negatives = prompt_files
    base = dict(base_model=str(pipeline_dirs["sd"]), out_dir=str(tmp_path / "s"), prompts_file=str(prompts),
                device="cpu")
    with pytest.raises(ConfigError, match="negative_prompt and generate.negative_prompts_file are both set"):
        load_config(GenerateConfig, {**base, "negative_prompt": "x", "negative_prompts_file": str(negatives)})
    with pytest.raises(ConfigError, match="empty_negative_probability: must lie in"):
        load_config(GenerateConfig, {**base, "negative_prompts_file": str(negatives),
                                     "empty_negative_probability": 1.5})
    with pytest.raises(ConfigError, match="applies only with generate.negative_prompts_file"):
        load_config(GenerateConfig, {**base, "empty_negative_probability": 0.5})
    config = load_config(GenerateConfig, {**base, "negative_prompts_file": str(tmp_path / "missing.txt")})
    with pytest.raises(ConfigError, match="negative_prompts_file.*missing.txt.*not found"):
        generate(config, **QUIET)
    (tmp_path / "blank.txt").write_text("\n \n")
    config = load_config(GenerateConfig, {**base, "negative_prompts_file": str(tmp_path / "blank.txt")})
    with pytest.raises(ConfigError, match="negative_prompts_file.*holds no prompts"):
        generate(config, **QUIET)
    config = load_config(GenerateConfig, {"base_model": str(tiny_base_dir), "out_dir": str(tmp_path / "c"),
                                          "negative_prompts_file": str(negatives), "device": "cpu"})
    with pytest.raises(ConfigError, match="class-conditional dit model.*no negative prompts"):
        generate(config, **QUIET)
    assert not (tmp_path / "c").exists() and not (tmp_path / "s").exists()
    assert "pipeline's default" in dict((f.name, f.metadata["help"]) for f in dataclasses.fields(
        GenerateConfig))["empty_negative_probability"]


# -------------------------------------------------------------------------------- adapters


def negative_config(base, kind, placement, condition_on):
    cond, _ = encode_prompts(base, PROMPTS[:1])
    pooled = cond.get("pooled_prompt_embeds")
    return AdapterConfig(kind=kind, placement=resolve_placement(base.family, placement), width=8, embed_dim=16,
                         condition_on=condition_on, text_dim=cond["prompt_embeds"].shape[-1],
                         pooled_dim=0 if pooled is None else pooled.shape[-1])


def with_negatives(base, prompts, negatives) -> dict:
    from agd_pipeline.inference import negative_conditions

    cond, _ = encode_prompts(base, prompts)
    _, uncond = encode_prompts(base, prompts[:1], negatives)
    return {**cond, **negative_conditions(uncond, len(prompts))}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", sorted(ADAPTER_KINDS))
def test_fresh_adapters_with_negative_text_reproduce_the_base_exactly(bases, family, kind):
    base = bases[family]
    cond = with_negatives(base, PROMPTS, ["blurry", "", "low quality"])
    x = torch.randn(len(PROMPTS), *base.latent_shape, generator=torch.Generator().manual_seed(0))
    t, w = torch.tensor([900, 500, 20]), torch.tensor([1.0, 3.0, 7.5])
    with torch.no_grad():
        reference = base.predict(x, t, cond)
    for placement in PLACEMENTS[family]:
        for condition_on in (["guidance", "timestep", "text", "negative_text"], ["guidance", "negative_text"]):
            model = AdaptedModel(base, negative_config(base, kind, placement, condition_on))
            try:
                assert any(n.startswith("embedding.negative_text.") for n in model.state_dict())
                with torch.no_grad():
                    assert torch.equal(model(x, t, cond, w), reference), (placement, condition_on)
                    # the negative prompt is really in the graph once the output layers are not zero
                    for adapter in model.adapters:
                        last = [m for m in adapter.modules() if isinstance(m, torch.nn.Linear)][-1]
                        last.weight.add_(0.05)
                    other = {**cond, **{k: v for k, v in with_negatives(base, PROMPTS, ["dark"] * 3).items()
                                        if k.startswith("negative_")}}
                    assert not torch.allclose(model(x, t, cond, w), model(x, t, other, w))
                    missing = {k: v for k, v in cond.items() if not k.startswith("negative_")}
                    with pytest.raises(ModelError, match="negative_text.*needs negative_"):
                        model(x, t, missing, w)
            finally:
                model.remove()


def test_negative_text_is_validated_like_the_other_prompt_sources():
    assert default_condition_on("text") == ["guidance", "timestep", "text"]
    assert default_condition_on("text", negative_prompts=True) == ["guidance", "timestep", "text", "negative_text"]
    assert default_condition_on("class", negative_prompts=True) == ["guidance", "timestep", "class"]
    section = dataclasses.asdict(AdapterConfig(condition_on=["guidance", "negative_text"], text_dim=16))
    assert _adapter_section_problem(section) is None
    section["text_dim"] = 0
    assert "names the prompt" in _adapter_section_problem(section)
    with pytest.raises(ModelError, match="need a text model"):
        ConditionEmbedding(AdapterConfig(condition_on=["guidance", "negative_text"]))
    config = load_config(TrainConfig, {"condition_on": ["guidance", "negative_text"]})
    assert config.condition_on == ["guidance", "negative_text"]
    load_config(TrainConfig, {"condition_on": list(CONDITION_SOURCES)})  # the config knows every source
    assert "negative_text" in dict((f.name, f.metadata["help"]) for f in dataclasses.fields(TrainConfig))[
        "condition_on"]


def test_text_mean_reads_the_prompt_tokens_beside_the_pooled_embedding():
    """Pooled models (SDXL, SD3) also see the mean of the prompt tokens by default: the vector changes
    with the tokens when the pooled embedding stays, and models without a pooled embedding refuse it."""
    assert default_condition_on("text", pooled=True) == ["guidance", "timestep", "text", "text_mean"]
    assert default_condition_on("text", negative_prompts=True, pooled=True) == [
        "guidance", "timestep", "text", "text_mean", "negative_text", "negative_text_mean"]
    assert default_condition_on("class", pooled=True) == ["guidance", "timestep", "class"]
    sources = ["guidance", "text", "text_mean", "negative_text", "negative_text_mean"]
    section = dataclasses.asdict(AdapterConfig(condition_on=sources, text_dim=16, pooled_dim=8))
    assert _adapter_section_problem(section) is None
    section["pooled_dim"] = 0
    assert "text_mean" in _adapter_section_problem(section)
    with pytest.raises(ModelError, match="text_mean.*has none"):
        ConditionEmbedding(AdapterConfig(condition_on=["guidance", "text_mean"], text_dim=16))
    torch.manual_seed(0)
    embedding = ConditionEmbedding(AdapterConfig(condition_on=sources, text_dim=16, pooled_dim=8, embed_dim=16))
    for layer in embedding.modules():  # random output layers: every source reaches the vector
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight)
    w, t = torch.tensor([3.0, 3.0]), torch.tensor([500, 500])
    cond = {"prompt_embeds": torch.randn(2, 5, 16), "pooled_prompt_embeds": torch.randn(2, 8),
            "negative_prompt_embeds": torch.randn(2, 5, 16), "negative_pooled_prompt_embeds": torch.randn(2, 8)}
    reference = embedding(w, t, cond).vector
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        changed = dict(cond, **{key: cond[key] + torch.randn(2, 5, 16)})  # same pooled embeddings
        assert not torch.allclose(embedding(w, t, changed).vector, reference), key
    with pytest.raises(ModelError, match="negative_text_mean.*negative_prompt_embeds"):
        embedding(w, t, {k: v for k, v in cond.items() if k != "negative_prompt_embeds"})


def train_config(store, out_dir, **overrides) -> TrainConfig:
    return load_config(TrainConfig, {"store": str(store), "out_dir": str(out_dir), "steps": 12, "batch_size": 8,
                                      "width": 8, "embed_dim": 16, "checkpoint_every": 0, "device": "cpu",
                                      "learning_rate": 0.01, "verify": "cheap", **overrides})


def test_negative_text_needs_a_store_with_negative_prompts(pipeline_dirs, prompt_files, tiny_store, tmp_path):
    from agd_pipeline.training import adapter_config_for

    plain = tmp_path / "plain"
    generate(generate_config(pipeline_dirs["sd"], plain, prompt_files, negatives=False), **QUIET)
    manifest = TrajectoryStore(plain).manifest
    assert "negative_text" not in adapter_config_for(train_config(plain, tmp_path / "a"), manifest).condition_on
    with pytest.raises(ConfigError, match="negative_text needs a store that records each trajectory's negative"):
        adapter_config_for(train_config(plain, tmp_path / "a", condition_on=["guidance", "negative_text"]), manifest)
    with pytest.raises(ConfigError, match=r"\['negative_text'\] do not apply to this class-conditional"):
        adapter_config_for(train_config(tiny_store, tmp_path / "b", condition_on=["guidance", "negative_text"]),
                           TrajectoryStore(tiny_store).manifest)


@pytest.fixture(scope="module")
def trained(stores, tmp_path_factory):
    """SDXL adapters trained on the store with negative prompts, default condition_on."""
    from agd_pipeline.training import train

    out = tmp_path_factory.mktemp("negative_adapters") / "adapters"
    train(train_config(stores["sdxl"], out), **QUIET)
    return out


def test_training_reads_the_negative_prompts(trained, bases, stores):
    from agd_pipeline.adapters import load_adapted_model
    from agd_pipeline.training import adapter_config_for

    config = json.loads((trained / "adapter_config.json").read_text())
    # SDXL has a pooled embedding: the prompts' token means come with it by default
    assert config["adapter"]["condition_on"] == ["guidance", "timestep", "text", "text_mean", "negative_text",
                                                 "negative_text_mean"]
    assert config["guidance"]["negative_prompts"] == NEGATIVES
    with pytest.warns(UserWarning, match="leaves out negative_text"):
        adapter_config_for(train_config(stores["sdxl"], trained.parent / "x", condition_on=["guidance", "text"]),
                           TrajectoryStore(stores["sdxl"]).manifest)
    base = bases["sdxl"]
    model = load_adapted_model(trained, base)
    try:
        x = torch.randn(2, *base.latent_shape, generator=torch.Generator().manual_seed(3))
        t, w = torch.tensor([700, 300]), torch.tensor([6.0, 9.0])
        with torch.no_grad():
            blurry = model(x, t, with_negatives(base, PROMPTS[:2], ["blurry"] * 2), w)
            low = model(x, t, with_negatives(base, PROMPTS[:2], ["low quality"] * 2), w)
            default = model(x, t, with_negatives(base, PROMPTS[:2], [""] * 2), w)
            plain = base.predict(x, t, with_negatives(base, PROMPTS[:2], [""] * 2))
        assert (blurry - plain).abs().max() > 1e-2, "training left the adapters a no-op"
        # only the negative prompt differs between these calls (training ran at all only because it passed
        # the store's negative arrays: without them the embedding refuses the call)
        assert (blurry - low).abs().max() > 1e-3 and (blurry - default).abs().max() > 1e-3
    finally:
        model.remove()


# -------------------------------------------------------------------------------- sampling


def test_sampling_passes_the_negative_prompt_to_the_adapters(trained, monkeypatch):
    from agd_pipeline import adapters as adapters_module
    from agd_pipeline.inference import sample_images

    seen = []
    forward = adapters_module.ConditionEmbedding.forward

    def spy(self, w, t, cond):
        seen.append({k: v.clone() for k, v in cond.items() if k.startswith("negative_")})
        return forward(self, w, t, cond)

    monkeypatch.setattr(adapters_module.ConditionEmbedding, "forward", spy)
    common = dict(prompts=["a red cat"], per_class=2, steps=2, device="cpu")
    results = {negative: sample_images(str(trained), 6.0, negative_prompt=negative, **common)
               for negative in ("blurry", "low quality", "")}
    assert {k: v.shape[0] for k, v in seen[0].items()} == {"negative_prompt_embeds": 2,
                                                          "negative_pooled_prompt_embeds": 2}
    assert results["blurry"]["method"] == "agd" and results["blurry"]["negative_prompt"] == "blurry"
    images = {k: r["images"] for k, r in results.items()}
    assert not torch.equal(images["blurry"], images["low quality"])
    assert not torch.equal(images["blurry"], images[""])
    # with --cfg the negative prompt is CFG's unconditional branch, as before
    cfg = {negative: sample_images(str(trained), 6.0, negative_prompt=negative, use_adapters=False, **common)
           for negative in ("blurry", "low quality")}
    assert cfg["blurry"]["method"] == "cfg"
    assert not torch.equal(cfg["blurry"]["images"], cfg["low quality"]["images"])
    with pytest.raises(ConfigError, match="negative_prompt must be a string"):
        sample_images(str(trained), 6.0, negative_prompt=["blurry"], **common)


def test_adapters_without_negative_text_warn_that_a_negative_prompt_does_nothing(stores, pipeline_dirs, prompt_files,
                                                                               tmp_path):
    from agd_pipeline.inference import sample_images
    from agd_pipeline.training import train

    plain = tmp_path / "plain"
    generate(generate_config(pipeline_dirs["sd"], plain, prompt_files, negatives=False), **QUIET)
    train(train_config(plain, tmp_path / "adapters", steps=2), **QUIET)
    common = dict(prompts=["a red cat"], per_class=1, steps=2, device="cpu")
    with pytest.warns(UserWarning, match="not distilled with negative prompts"):
        sample_images(str(tmp_path / "adapters"), 4.0, negative_prompt="blurry", **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_images(str(tmp_path / "adapters"), 4.0, **common)
        sample_images(str(tmp_path / "adapters"), 4.0, negative_prompt="blurry", use_adapters=False, **common)


@pytest.mark.slow
def test_sample_command_takes_a_negative_prompt(trained, tmp_path):
    from conftest import run_main

    result = run_main("stages.sample", "--adapters", trained, "-w", "5", "--prompt", "a red cat", "--per-class", "1",
                     "--steps", "2", "--negative-prompt", "blurry", "--out-dir", tmp_path / "out", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert record["negative_prompt"] == "blurry" and record["method"] == "agd"
    help_text = run_main("stages.sample", "--help").stdout
    assert "negative_text" in help_text
