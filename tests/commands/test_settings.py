"""No silent settings (issue 30): every stage names the values that are not the built-in ones and where
each comes from, --help shows the values that will apply, and a base of another family given by flag
is refused while the output folder is still the params file's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, run_main
from agd_pipeline import settings
from agd_pipeline.cli import build_parser, one_line_errors, resolve_config
from agd_pipeline.config import EvaluateConfig, GenerateConfig, TrainConfig
from defaults.config import FinetuneConfig
from agd_pipeline.errors import ConfigError


def flat(text: str) -> str:
    """Help text with argparse's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture
def repo_layout(tmp_path) -> Path:
    """A folder laid out like a fresh clone's root: the repository's own params.yaml and shipped base
    checkpoints (pretrained/, read only here, so linked), no data yet."""
    root = tmp_path / "clone"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "pretrained").symlink_to(REPO / "pretrained", target_is_directory=True)
    (root / "p.txt").write_text("a photo of a cat\na red digit\n")
    return root


@pytest.fixture
def my_sd(repo_layout) -> Path:
    from tiny_pipelines import make_sd_pipeline

    return make_sd_pipeline(repo_layout / "my-sd")


def resolved(cls, tmp_path, params_text: str | None, *argv: str):
    """resolve_config of a command line run in ``tmp_path``, the current folder (tests chdir there
    first: paths in params files are relative to it). ``params_text``: params.yaml to write, if any."""
    assert Path.cwd() == tmp_path
    if params_text is not None:
        (tmp_path / "params.yaml").write_text(params_text)
    parser = one_line_errors(build_parser(cls, "prog", "", params="params.yaml"))
    return resolve_config(cls, parser.parse_args(list(argv)))


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """tmp_path as the current folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------------------- the issue itself


@pytest.mark.bad_input
def test_an_sd_base_by_flag_is_refused_into_the_class_defaults_store_and_proceeds_with_out_dir(repo_layout, my_sd):
    """The issue's reproduction from the repository root: refused in one line, nothing written; with
    --out-dir the same command runs and names every setting's source; train on that store is refused
    into params.yaml's adapters folder the same way."""
    refused = run_main("stages.generate", "--base-model", "my-sd", "--prompts-file", "p.txt", cwd=repo_layout)
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    line = refused.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith(
        "error: generate.out_dir data/trajectories (from params.yaml [generate]) belongs to the params file's "
        "class-conditional DiT pipeline (its generate.base_model pretrained/toy-dit)"), line
    assert "--base-model my-sd is of the Stable Diffusion 1.x/2.x family" in line and "pass --out-dir" in line, line
    assert not (repo_layout / "data").exists(), "a refused run wrote something"
    assert "settings" not in refused.stdout

    ran = run_main("stages.generate", "--base-model", "my-sd", "--prompts-file", "p.txt", "--out-dir", "sd/store",
                   "--num-steps", "2", "--device", "cpu", "--no-progress", cwd=repo_layout)
    assert ran.returncode == 0, ran.stderr
    assert (repo_layout / "sd/store/manifest.json").is_file() and not (repo_layout / "data").exists()
    block = ran.stdout.split("\n\n")[0].splitlines()
    assert block[0].startswith("generate settings (params: params.yaml [generate]"), block
    lines = set(block[1:])
    for expected in ("  base_model = my-sd  (--base-model)", "  out_dir = sd/store  (--out-dir)",
                     "  prompts_file = p.txt  (--prompts-file)", "  num_steps = 2  (--num-steps)",
                     "  compressor = blosc-zstd  (params.yaml [generate])"):
        assert expected in lines, (expected, block)
    # params.yaml writes out built-in values too (trajectories_per_class: 200): not listed
    assert not any(line.strip().startswith(("trajectories_per_class", "guidance_max")) for line in block), block
    assert ran.stdout.count("generate settings") == 1

    train = run_main("stages.train", "--store", "sd/store", "--no-progress", cwd=repo_layout)
    assert train.returncode == 2 and len(train.stderr.splitlines()) == 1, train.stderr
    assert train.stderr.startswith("error: train.out_dir data/adapters (from params.yaml [train]) belongs to the "
                                   "params file's class-conditional DiT"), train.stderr
    assert "--store sd/store holds trajectories of the Stable Diffusion 1.x/2.x family" in train.stderr
    assert not (repo_layout / "data").exists()


@pytest.mark.bad_input
def test_evaluate_refuses_adapters_of_another_family_into_the_params_eval_folder(repo_layout):
    adapters = repo_layout / "sd-adapters"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text(json.dumps({"base_model": {"family": "sdxl"}}))
    result = run_main("stages.evaluate", "--adapters", "sd-adapters", cwd=repo_layout)
    assert result.returncode == 2 and "evaluate.out_dir data/eval (from params.yaml [evaluate])" in result.stderr
    assert "--adapters sd-adapters holds adapters of the SDXL family" in result.stderr, result.stderr
    assert not (repo_layout / "data").exists()


# ------------------------------------------------------------------------------ the family guard


def model_folder(root: Path, pipeline: str | None, unet: dict | None = None) -> Path:
    """A folder with only the JSON a family is told by (no weights: the guard loads none)."""
    root.mkdir(parents=True)
    if pipeline:
        (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    if unet is not None:
        (root / "unet").mkdir()
        (root / "unet" / "config.json").write_text(json.dumps(unet))
    return root


def test_base_family_reads_json_only_and_tells_sd_from_sdxl(tmp_path):
    assert settings.base_family(str(model_folder(tmp_path / "dit", "DiTPipeline"))) == "dit"
    assert settings.base_family(str(model_folder(tmp_path / "sd", "StableDiffusionPipeline",
                                                 {"_class_name": "UNet2DConditionModel"}))) == "sd"
    xl_unet = {"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time"}
    assert settings.base_family(str(model_folder(tmp_path / "xl", "StableDiffusionXLPipeline", xl_unet))) == "sdxl"
    assert settings.base_family(str(model_folder(tmp_path / "bare-xl", None, xl_unet))) == "sdxl"
    assert settings.base_family(str(model_folder(tmp_path / "other", "KandinskyPipeline"))) is None
    assert settings.base_family(str(tmp_path / "missing")) is None
    assert settings.base_family("nobody/not-in-the-cache") is None  # offline, never fetched


def test_the_guard_passes_a_base_of_the_same_family_and_one_given_with_out_dir(here, tmp_path):
    model_folder(tmp_path / "data/base", "DiTPipeline")
    model_folder(tmp_path / "my-dit", "DiTPipeline")
    model_folder(tmp_path / "my-sd", "StableDiffusionPipeline")
    params = "base: {out_dir: data/base}\ngenerate: {base_model: data/base, out_dir: data/trajectories}\n"
    same = resolved(GenerateConfig, tmp_path, params, "--base-model", "my-dit")
    assert settings.check_family(same.config, same.sources, same.params, same.label) is None
    moved = resolved(GenerateConfig, tmp_path, None, "--base-model", "my-sd", "--out-dir", "sd/store")
    assert settings.check_family(moved.config, moved.sources, moved.params, moved.label) is None
    other = resolved(GenerateConfig, tmp_path, None, "--base-model", "my-sd")
    with pytest.raises(ConfigError, match=r"\(its generate.base_model data/base\), but --base-model my-sd is of th"):
        settings.check_family(other.config, other.sources, other.params, other.label)
    # the params file's own base is of a text family: a DiT by flag is the one refused
    text = resolved(GenerateConfig, tmp_path, "generate: {base_model: my-sd, out_dir: data/sd}\n",
                    "--base-model", "my-dit")
    with pytest.raises(ConfigError, match="belongs to the params file's Stable Diffusion 1.x/2.x pipeline"):
        settings.check_family(text.config, text.sources, text.params, text.label)


def test_no_params_file_means_no_guard(here, tmp_path):
    model_folder(tmp_path / "my-sd", "StableDiffusionPipeline")
    config = resolved(GenerateConfig, tmp_path, None, "--base-model", "my-sd")
    assert config.params is None and config.sources["out_dir"] == settings.BUILT_IN
    assert settings.check_family(config.config, config.sources, config.params, config.label) is None


def test_a_hub_id_that_cannot_be_inspected_warns_instead_of_refusing(here, tmp_path):
    # the base the [base] recipe writes, not there yet: its family is the recipe's
    params = "base: {out_dir: data/base}\ngenerate: {base_model: data/base, out_dir: data/trajectories}\n"
    config = resolved(GenerateConfig, tmp_path, params, "--base-model", "someorg/some-model")
    warning = settings.check_family(config.config, config.sources, config.params, config.label)
    assert warning and "cannot tell the family of --base-model someorg/some-model offline" in warning
    assert "pass --out-dir" in warning


def test_train_params_family_follows_the_store_to_the_generate_section_that_writes_it(here, tmp_path):
    (tmp_path / "dit-store").mkdir()
    (tmp_path / "dit-store" / "manifest.json").write_text(json.dumps({"base_model": {"family": "dit"}}))
    (tmp_path / "sd-store").mkdir()
    (tmp_path / "sd-store" / "manifest.json").write_text(json.dumps({"base_model": {"family": "sd"}}))
    params = ("base: {out_dir: data/base}\ngenerate: {base_model: data/base, out_dir: data/trajectories}\n"
              "train: {store: data/trajectories, out_dir: data/adapters}\n")
    same = resolved(TrainConfig, tmp_path, params, "--store", "dit-store")
    assert settings.check_family(same.config, same.sources, same.params, same.label) is None
    other = resolved(TrainConfig, tmp_path, None, "--store", "sd-store")
    with pytest.raises(ConfigError, match=r"train.out_dir data/adapters .*\[base\] stage.*--store sd-store holds"):
        settings.check_family(other.config, other.sources, other.params, other.label)


@pytest.mark.bad_input
def test_finetune_refuses_a_base_of_another_family_into_the_derivatives_folder(here, tmp_path):
    """The derivatives pipeline's finetune writes the DiT derivative into data/derived/full/base: an SD3 text
    default given by flag would replace it (another model's DVC output) unless --out-dir moves it."""
    model_folder(tmp_path / "data/base", "DiTPipeline")
    model_folder(tmp_path / "my-dit", "DiTPipeline")
    model_folder(tmp_path / "my-sd", "StableDiffusionPipeline")
    params = "finetune: {base_model: data/base, out_dir: data/derived/full/base}\n"
    same = resolved(FinetuneConfig, tmp_path, params, "--base-model", "my-dit")
    assert settings.check_family(same.config, same.sources, same.params, same.label) is None
    moved = resolved(FinetuneConfig, tmp_path, None, "--base-model", "my-sd", "--out-dir", "sd/derived")
    assert settings.check_family(moved.config, moved.sources, moved.params, moved.label) is None
    other = resolved(FinetuneConfig, tmp_path, None, "--base-model", "my-sd")
    with pytest.raises(ConfigError, match=r"finetune.out_dir data/derived/full/base \(from params.yaml \[finetune\]\) "
                       r"belongs to .*\(its finetune.base_model data/base\), but --base-model my-sd is of the"):
        settings.check_family(other.config, other.sources, other.params, other.label)


@pytest.mark.bad_input
def test_the_finetune_command_refuses_before_writing_anything(repo_layout, my_sd):
    """`finetune --base-model` of a text family from the repository root: params.yaml has no [finetune]
    section, so the built-in out_dir is used, which its [base] stage's DiT pipeline derives into."""
    refused = run_main("stages.finetune", "--base-model", "my-sd", "--no-progress", cwd=repo_layout)
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    line = refused.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith(
        "error: finetune.out_dir data/derived/full/base (built-in, with params.yaml [finetune]) belongs to the "
        "params file's class-conditional DiT pipeline"), line
    assert "--base-model my-sd is of the Stable Diffusion 1.x/2.x family" in line, line
    assert not (repo_layout / "data").exists(), "a refused run wrote something"


# ------------------------------------------------------------------------------ provenance


def test_sources_name_the_flag_the_params_section_or_the_built_in_value(here, tmp_path):
    params = "generate:\n  out_dir: my/store\n  num_steps: 32\n  seed: 3\n"
    config = resolved(GenerateConfig, tmp_path, params, "--seed", "5", "--base-model", "b")
    sources = config.sources
    assert (sources["seed"], sources["base_model"]) == ("--seed", "--base-model")
    assert (sources["out_dir"], sources["num_steps"]) == ("params.yaml [generate]", "params.yaml [generate]")
    assert sources["guidance_max"] == settings.BUILT_IN and config.config.seed == 5
    block = settings.settings_block(config.config, sources, config.note).splitlines()
    assert block[0].startswith("generate settings (params: params.yaml [generate]")
    assert block[1:] == ["  base_model = b  (--base-model)", "  out_dir = my/store  (params.yaml [generate])",
                         "  seed = 5  (--seed)"], block  # num_steps 32 is the built-in value: not listed


def test_without_params_yaml_the_block_says_so(here, tmp_path):
    config = resolved(EvaluateConfig, tmp_path, None, "--seed", "7")
    block = settings.settings_block(config.config, config.sources, config.note).splitlines()
    assert "no params.yaml in this folder" in block[0]
    # what it reads and writes is always named, the other built-in values are not
    assert block[1:] == ["  adapters = data/adapters  (built-in)", "  out_dir = data/eval  (built-in)",
                         "  seed = 7  (--seed)"], block


def test_only_the_main_process_prints_the_settings(here, tmp_path, monkeypatch, capsys):
    config = resolved(TrainConfig, tmp_path, None, "--steps", "3")
    monkeypatch.setenv("RANK", "1")
    settings.announce(config.config, config.sources, config.note)
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    settings.announce(config.config, config.sources, config.note)
    assert "  steps = 3  (--steps)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ --help


def test_help_shows_the_values_that_apply_and_where_they_come_from(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  out_dir: elsewhere/adapters\n  steps: 7\n"
                                          "  validation_prompt: ['100%']\n")
    here = flat(run_main("stages.train", "--help", cwd=tmp_path).stdout)
    assert "(applies: elsewhere/adapters from params.yaml [train]; built-in: data/adapters)" in here, here
    assert "(applies: 7 from params.yaml [train]; built-in: 1500)" in here
    assert "(applies: [100%] from params.yaml [train]; built-in: [])" in here
    assert "(applies: data/trajectories, built-in)" in here  # train.store: not in this params file
    (tmp_path / "other.yaml").write_text("train:\n  steps: 9\n")
    other = flat(run_main("stages.train", "--params", "other.yaml", "--help", cwd=tmp_path).stdout)
    assert "(applies: 9 from other.yaml [train]; built-in: 1500)" in other
    empty = tmp_path / "empty"
    empty.mkdir()
    outside = flat(run_main("stages.train", "--help", cwd=empty).stdout)
    assert "(applies: data/adapters, built-in)" in outside and "No params.yaml in this folder" in outside
    repo = flat(run_main("stages.generate", "--help").stdout)
    assert "(applies: blosc-zstd from params.yaml [generate]; built-in: auto)" in repo


@pytest.mark.bad_input
def test_a_params_option_without_a_value_is_one_line_error(tmp_path):
    """--help reads the file --params names before the full parse; a malformed --params stays the full
    parse's one-line error, not the early read's usage block."""
    result = run_main("stages.train", "--params", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: argument --params: expected one argument")


def test_a_projects_own_recipe_joins_the_family_guard(here, tmp_path, monkeypatch):
    """The guard knows no section by name: a project's own stage that builds a base (as the repository's
    defaults register theirs, agd_pipeline.config.register_config) says its family through its config."""
    from dataclasses import dataclass
    from typing import ClassVar

    from agd_pipeline import config as config_module
    from agd_pipeline.config import StageConfig, option

    @dataclass
    class MyRecipe(StageConfig):
        section: ClassVar[str] = "my_recipe"
        writes: ClassVar[str] = "base"
        out_dir: str = option("data/mine", "where the recipe writes its base")

        @classmethod
        def family_written(cls, values: dict) -> str | None:
            return "sd"

    monkeypatch.setitem(config_module.CONFIG_CLASSES, MyRecipe.section, MyRecipe)
    model_folder(tmp_path / "my-dit", "DiTPipeline")
    params = "my_recipe: {out_dir: data/mine}\ngenerate: {base_model: data/mine, out_dir: data/store}\n"
    other = resolved(GenerateConfig, tmp_path, params, "--base-model", "my-dit")
    with pytest.raises(ConfigError, match=r"its base data/mine is what its \[my_recipe\] stage writes"):
        settings.check_family(other.config, other.sources, other.params, other.label)
