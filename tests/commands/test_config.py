"""Configs: validation that names the key, command-line parsing, and the stage CLIs' exit codes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from agd_pipeline.cli import build_parser, config_from_args, write_resolved
from agd_pipeline.config import EvaluateConfig, GenerateConfig, TrainConfig, load_config
from defaults.config import BaseStageConfig
from agd_pipeline.errors import ConfigError, ModelError
from agd_pipeline.models import load_base_model

from conftest import run_cli, run_main

STAGES = ("base", "generate", "train", "evaluate")
CONFIGS = {"base": BaseStageConfig, "generate": GenerateConfig, "train": TrainConfig, "evaluate": EvaluateConfig}


def config_error(cls, section=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(cls, section if section is not None else {}, overrides)
    return str(err.value)


@pytest.mark.parametrize("cls,section,key", [
    (GenerateConfig, {"num_stepz": 3}, "generate.num_stepz"),
    (TrainConfig, {"learning_rat": 0.1}, "train.learning_rat"),
])
def test_unknown_key_is_named(cls, section, key):
    message = config_error(cls, section)
    assert message.startswith(key)
    assert "allowed keys" in message


@pytest.mark.bad_input
@pytest.mark.parametrize("cls,section,key", [
    (GenerateConfig, {"num_steps": "abc"}, "generate.num_steps"),
    (GenerateConfig, {"num_steps": 2.5}, "generate.num_steps"),
    (GenerateConfig, {"num_steps": True}, "generate.num_steps"),
    (GenerateConfig, {"guidance_max": "high"}, "generate.guidance_max"),
    (GenerateConfig, {"classes": 3}, "generate.classes"),
    (GenerateConfig, {"classes": ["one"]}, "generate.classes"),
    (GenerateConfig, {"record_branches": "maybe"}, "generate.record_branches"),
    (EvaluateConfig, {"guidance_scales": {"a": 1}}, "evaluate.guidance_scales"),
    (TrainConfig, {"out_dir": ["a", "b"]}, "train.out_dir"),
])
def test_wrong_type_is_named(cls, section, key):
    assert config_error(cls, section).startswith(key + ":")


@pytest.mark.bad_input
@pytest.mark.parametrize("cls,section,key,allowed", [
    (GenerateConfig, {"compressor": "lz4"}, "generate.compressor", "blosc-zstd"),
    (TrainConfig, {"adapter": "lora"}, "train.adapter", "cross_attention"),
    (TrainConfig, {"placement": "everywhere"}, "train.placement", "attention"),
    (TrainConfig, {"verify": "sometimes"}, "train.verify", "full"),
    (BaseStageConfig, {"beta_schedule": "cosine"}, "base.beta_schedule", "squaredcos_cap_v2"),
])
def test_bad_choice_names_key_and_allowed_values(cls, section, key, allowed):
    message = config_error(cls, section)
    assert message.startswith(key + ":") and allowed in message


def test_guidance_min_above_max():
    message = config_error(GenerateConfig, {"guidance_min": 5.0, "guidance_max": 2.0})
    assert "generate.guidance_min" in message and "generate.guidance_max" in message


@pytest.mark.bad_input
@pytest.mark.parametrize("cls,section,key", [
    (GenerateConfig, {"guidance_min": -1.0}, "generate.guidance_min"),
    (GenerateConfig, {"guidance_min": 0.0, "guidance_max": -0.5}, "generate.guidance_max"),
    (GenerateConfig, {"guidance_max": float("inf")}, "generate.guidance_max"),
    (EvaluateConfig, {"guidance_scales": [2.0, -1.0]}, "evaluate.guidance_scales"),
    (EvaluateConfig, {"guidance_scales": []}, "evaluate.guidance_scales"),
    (GenerateConfig, {"num_steps": 0}, "generate.num_steps"),
    (GenerateConfig, {"classes": [1, -2]}, "generate.classes"),
    (TrainConfig, {"condition_on": ["timestep"]}, "train.condition_on"),
    (TrainConfig, {"condition_on": ["guidance", "weather"]}, "train.condition_on"),
    (TrainConfig, {"learning_rate": 0.0}, "train.learning_rate"),
    (EvaluateConfig, {"samples_per_class": 0}, "evaluate.samples_per_class"),
    (BaseStageConfig, {"patch_size": 3}, "base.patch_size"),
    (BaseStageConfig, {"label_dropout": 0.0}, "base.label_dropout"),
])
def test_bad_values_are_named(cls, section, key):
    assert config_error(cls, section).startswith(key)


def _outside(bounds):
    """Values a range refuses: just past each end it has, or below a positive one."""
    values = []
    if bounds.low is not None:
        values.append(bounds.low if bounds.low_open else bounds.low - 1)
    if bounds.high is not None:
        values.append(bounds.high if bounds.high_open else bounds.high + 1)
    return [v for v in values if v not in bounds.also]


def _inside(bounds):
    return [v for v in (bounds.low, bounds.high) if v is not None and v in bounds] + list(bounds.also)


@pytest.mark.parametrize("cls", [GenerateConfig, TrainConfig, EvaluateConfig, BaseStageConfig],
                         ids=lambda cls: cls.section)
def test_every_declared_range_is_enforced_named_and_shown(cls):
    """Ranges are declared once, on the option: each bounded option refuses a value past each end
    (naming the key and the range), takes its ends, and --help shows the range."""
    import dataclasses
    import typing

    from agd_pipeline.cli import build_parser

    hints = typing.get_type_hints(cls)
    bounded = [f for f in dataclasses.fields(cls) if f.metadata.get("bounds") is not None]
    assert bounded, f"{cls.section}: no option declares its range"
    for field in bounded:
        bounds, kind = field.metadata["bounds"], hints[field.name]
        scalar = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
        wrap = (lambda v: [v]) if typing.get_origin(kind) is list else (lambda v: v)
        for value in _outside(bounds):
            message = config_error(cls, {field.name: wrap(scalar(value))})
            assert message.startswith(f"{cls.section}.{field.name}:") and bounds.problem() in message, message
        for value in _inside(bounds):
            section = {field.name: wrap(scalar(value))}
            if field.name == "guidance_max":
                section["guidance_min"] = 0.0
            try:
                load_config(cls, section)
            except ConfigError as err:  # another check may refuse the value; this range must not
                assert not str(err).startswith(f"{cls.section}.{field.name}: must"), str(err)
    help_text = " ".join(build_parser(cls, cls.section, "", params=None).format_help().split())
    assert help_text.count("(allowed: ") >= len(bounded)


def test_missing_params_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(GenerateConfig, missing)


def test_params_file_section_and_overrides(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"generate": {"num_steps": 7, "classes": [1, 2], "seed": 3},
                                      "train": {"steps": 5}}))
    config = load_config(GenerateConfig, params, {"seed": "9", "guidance_max": None})
    assert config.num_steps == 7 and config.classes == [1, 2]
    assert config.seed == 9  # the override wins
    assert config.guidance_max == GenerateConfig().guidance_max  # None means "not given"
    assert load_config(TrainConfig, params).steps == 5
    assert load_config(EvaluateConfig, params) == EvaluateConfig()  # absent section: built-ins


def test_command_line_strings_parse_to_field_types():
    evaluate = load_config(EvaluateConfig, {}, {"guidance_scales": "2, 7.5 9", "samples_per_class": "3"})
    assert evaluate.guidance_scales == [2.0, 7.5, 9.0]
    assert all(type(w) is float for w in evaluate.guidance_scales)
    assert evaluate.samples_per_class == 3 and type(evaluate.samples_per_class) is int
    train = load_config(TrainConfig, {}, {"condition_on": "guidance,timestep", "learning_rate": "1e-3",
                                          "width": "4"})
    assert train.condition_on == ["guidance", "timestep"]
    assert train.learning_rate == 1e-3 and type(train.learning_rate) is float
    generate = load_config(GenerateConfig, {}, {"record_branches": "true", "classes": "", "guidance_max": "4"})
    assert generate.record_branches is True and generate.classes == []
    assert generate.guidance_max == 4.0 and type(generate.guidance_max) is float
    assert load_config(GenerateConfig, {}, {"record_branches": "0"}).record_branches is False
    assert load_config(GenerateConfig, {}, {"classes": "3 1,2"}).classes == [3, 1, 2]


def test_parser_options_cover_every_field(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"generate": {"num_steps": 7, "seed": 3}}))
    parser = build_parser(GenerateConfig, "python -m stages.generate", "doc")
    args = parser.parse_args(["--params", str(params), "--seed", "5", "--guidance-max", "3",
                              "--record-branches", "yes"])
    config = config_from_args(GenerateConfig, args)
    assert (config.num_steps, config.seed, config.guidance_max, config.record_branches) == (7, 5, 3.0, True)
    with pytest.raises(ConfigError, match="nope.yaml"):
        config_from_args(GenerateConfig, parser.parse_args(["--params", str(tmp_path / "nope.yaml")]))


def test_write_resolved(tmp_path):
    config = load_config(TrainConfig, {"steps": 12})
    write_resolved(config, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "resolved_config.json").read_text())
    assert written == {"train": config.to_dict()} and written["train"]["steps"] == 12


# ------------------------------------------------------------------------------------- CLIs


def test_every_stage_has_help():
    modules = [f"stages.{s}" for s in (*STAGES, "inspect")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(modules, pool.map(lambda m: run_cli(m, "--help"), modules)))
    for module, result in results.items():
        assert result.returncode == 0, (module, result.stderr)
        assert "usage:" in result.stdout, module
    for stage in STAGES:
        text = results[f"stages.{stage}"].stdout
        for name in [f.name for f in dataclasses.fields(CONFIGS[stage])]:
            assert "--" + name.replace("_", "-") in text, (stage, name)
        assert "--no-progress" in text and "--params" in text
    assert "--verify" in results["stages.inspect"].stdout


@pytest.mark.bad_input
def test_bad_command_line_value_exits_2(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("generate: {}\n")
    with ThreadPoolExecutor(max_workers=2) as pool:
        bad_int, bad_choice = pool.map(lambda extra: run_cli("stages.generate", "--params", params,
                                                             "--out-dir", tmp_path / "out", *extra),
                                       [("--num-steps", "abc"), ("--compressor", "lz4")])
    assert bad_int.returncode == 2
    assert "error: generate.num_steps" in bad_int.stderr
    assert "Traceback" not in bad_int.stderr
    assert bad_choice.returncode == 2 and "generate.compressor" in bad_choice.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.bad_input
def test_bad_params_value_exits_2(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  adapter: lora\n")
    result = run_cli("stages.train", "--params", params)
    assert result.returncode == 2 and "train.adapter" in result.stderr
    missing = run_cli("stages.train", "--params", tmp_path / "nope.yaml")
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr


@pytest.mark.bad_input
def test_missing_base_model_is_a_clear_error(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("generate: {}\n")
    missing = tmp_path / "no_such_model"
    result = run_main("stages.generate", "--params", params, "--base-model", missing, "--out-dir",
                     tmp_path / "out", "--no-progress")
    assert result.returncode == 2, result.stderr
    assert str(missing) in result.stderr and "error:" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ModelError, match="no such folder"):
        load_base_model(str(missing))


def test_unsupported_model_folder_is_named(tmp_path):
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelError, match="FluxPipeline.*Supported families: .*DiT.*Stable Diffusion.*SDXL.*SD3"):
        load_base_model(str(folder))
    # a supported pipeline whose denoiser folder is missing
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelError, match="StableDiffusionPipeline.*unet/"):
        load_base_model(str(folder))


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_example_configs_for_real_models_validate(path):
    """Every key and value of the shipped per-model params files passes the stage's checks."""
    from agd_pipeline.config import GenerateConfig, TrainConfig

    generate = load_config(GenerateConfig, path)
    train = load_config(TrainConfig, path)
    assert generate.base_model and generate.out_dir == train.store
    # the paper's settings: text models one trajectory per prompt with w ~ U[1, 12], DiT 4 per class, U[1, 6]
    if generate.prompts_file:
        assert (generate.trajectories_per_prompt, generate.guidance_min, generate.guidance_max) == (1, 1.0, 12.0)
    else:
        assert (generate.trajectories_per_class, generate.guidance_min, generate.guidance_max) == (4, 1.0, 6.0)
