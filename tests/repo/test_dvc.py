"""The DVC pipeline as a hostile user meets it: what re-runs when a setting changes, what params.yaml
must hold, what DVC hashes, and whether README's results come from the committed metrics.

The pipeline checks run DVC itself on a copy of dvc.yaml and params.yaml in a temporary project,
with stand-in files for every dependency and output, committed without running any stage."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agd_pipeline.config import EvaluateConfig, GenerateConfig, TrainConfig
from defaults.config import BaseStageConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = (BaseStageConfig, GenerateConfig, TrainConfig, EvaluateConfig)
# Keys that change no result: DVC must not re-run a stage for them.
OPERATIONAL = {"generate.verify", "generate.restart_on_mismatch", "train.checkpoint_every", "train.verify",
               "train.restart_on_mismatch", "train.loader_workers", "train.gradient_checkpointing",
               "train.report_to", "train.validate_every", "train.validation_prompt", "train.validation_w"}
# Paths: an output's location is its outs entry, an input's its deps entry (both by ${...}).
PATHS = {"generate.out_dir": "outs", "train.out_dir": "outs",
         "evaluate.out_dir": "outs", "generate.base_model": "deps", "train.store": "deps",
         "evaluate.adapters": "deps"}
INTERPOLATION = re.compile(r"\$\{([a-z_]+\.[a-z_]+)\}")


def dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def params_yaml() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def listed_params(pipeline: dict) -> dict[str, set[str]]:
    """{stage: the params.yaml keys it lists}; with the root pipeline, the recipe of the shipped class
    base (pipelines/bases/dvc.yaml's ``class`` stage, params.yaml's [base]) as ``base``."""
    listed = {name: set(stage.get("params", [])) for name, stage in pipeline["stages"].items()}
    recipe = yaml.safe_load((REPO / "pipelines/bases/dvc.yaml").read_text())["stages"]["class"]
    listed["base"] = {key for entry in recipe["params"] for key in entry["params.yaml"]}
    return listed


def entries(stage: dict, kind: str) -> list[str]:
    """Paths of a stage's deps, or of its outs, metrics and plots, as written (uninterpolated)."""
    kinds = ["deps"] if kind == "deps" else ["outs", "metrics", "plots"]
    return [e if isinstance(e, str) else next(iter(e)) for k in kinds for e in stage.get(k, [])]


# ----------------------------------------------------------------------------- static checks


def test_dvc_tracks_exactly_the_config_keys_that_change_results():
    listed = listed_params(dvc_yaml())
    for cls in CONFIGS:
        fields = {f"{cls.section}.{f.name}" for f in dataclasses.fields(cls)}
        expected = fields - OPERATIONAL - set(PATHS) - {"base.out_dir"}  # the recipe's literal outs path
        assert listed[cls.section] == expected, (
            f"dvc.yaml's {cls.section} params: missing {sorted(expected - listed[cls.section])}, "
            f"not result keys {sorted(listed[cls.section] - expected)}")


def test_params_yaml_writes_out_every_tracked_key_and_no_restart():
    # DVC refuses to run a stage whose listed key is missing from params.yaml.
    params = params_yaml()
    for keys in listed_params(dvc_yaml()).values():
        for key in keys:
            section, name = key.split(".")
            assert name in (params.get(section) or {}), f"{key} is listed in dvc.yaml but not in params.yaml"
    for section in ("generate", "train"):
        assert "restart_on_mismatch" not in params[section], \
            "restart_on_mismatch belongs to dvc.yaml's command, not to params.yaml (hand runs read it)"


def test_params_yaml_values_are_valid_and_paths_follow_params():
    from agd_pipeline.config import load_config

    for cls in CONFIGS:
        load_config(cls, REPO / "params.yaml")  # every value valid, no unknown key
    pipeline = dvc_yaml()
    for key, kind in PATHS.items():
        used = {m for stage in pipeline["stages"].values() for e in entries(stage, kind)
                for m in INTERPOLATION.findall(e)}
        assert key in used, f"dvc.yaml's {kind} do not follow ${{{key}}}"
    for stage in pipeline["stages"].values():
        for path in entries(stage, "outs"):
            assert "${" in path, f"output {path} does not follow params.yaml"
    commands = {name: stage["cmd"] for name, stage in pipeline["stages"].items()}
    assert commands["generate"].endswith("--restart-on-mismatch true")
    assert commands["train"].endswith("--restart-on-mismatch true")


def test_readme_images_exist():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", readme)
    assert links
    missing = [link for link in links if not (REPO / link).is_file()]
    assert not missing, f"README links images that do not exist: {missing} (run `make repro`)"
    assert "docs/curves.png" not in readme and "docs/grid_" not in readme


def test_hand_run_outputs_are_git_ignored():
    ignored = subprocess.run(["git", "check-ignore", "samples/x.png", "dvc_plots/index.html",
                              "data/benchmarks/loader.json"], cwd=REPO, capture_output=True, text=True)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.stdout.split() == ["samples/x.png", "dvc_plots/index.html", "data/benchmarks/loader.json"]


@pytest.mark.parametrize("block", ["", "text-sd", "text-sdxl", "text-sd3"])
def test_readme_results_block_is_the_render_of_the_committed_metrics(block):
    extra = ["--block", block, "--metrics", f"data/text/{block[5:]}/eval/metrics.json"] if block else []
    # --check recomputes every interval from the per-sample files (about 15 s on a quiet 2-core machine)
    result = subprocess.run([sys.executable, "-m", "stages.report", "--check", *extra], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("default", ["class", "sd3"])
def test_readme_variants_block_is_the_render_of_the_committed_runs(default):
    """The seeds and paper-share tables, and each of their runs' intervals, follow from the tracked files."""
    result = subprocess.run([sys.executable, "-m", "stages.report", "--variants", default, "--check"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)  # four runs' intervals: about 50 s quiet
    assert result.returncode == 0, result.stderr


def test_report_writes_a_named_block_with_the_negative_prompt_check(tmp_path):
    (tmp_path / "eval").mkdir()
    metrics = tmp_path / "eval" / "metrics.json"
    negative = {"w": 4.0, "prompt": "a handwritten digit", "samples_per_digit": 30,
                "negative_digit_rate": {"unguided": 0.1, "cfg": 0.02, "agd": 0.04}, "avoidance_cfg": 0.08,
                "avoidance_agd": 0.06, "avoidance_ratio_agd_over_cfg": 0.75}
    metrics.write_text(json.dumps({**METRICS, "conditioning": "text", "negative_prompt_check": negative}))
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- results:start -->old<!-- results:end -->\n"
                      "<!-- results:text-sd:start -->\n<!-- results:text-sd:end -->\nb\n")
    result = report("--metrics", metrics, "--readme", readme, "--block", "text-sd", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = readme.read_text()
    assert "<!-- results:start -->old<!-- results:end -->" in text  # the other block untouched
    block = text[text.index("<!-- results:text-sd:start -->"):text.index("<!-- results:text-sd:end -->")]
    assert "prompt accuracy of 0.900" in block and "10.0 % of unguided samples" in block
    assert "0.75 times as well as CFG" in block and "eval/grids/negative_prompt.png" in block
    assert report("--metrics", metrics, "--readme", readme, "--block", "text-sd", "--check",
                  cwd=tmp_path).returncode == 0
    missing = report("--metrics", metrics, "--readme", readme, "--block", "text-sdxl", cwd=tmp_path)
    assert missing.returncode == 2 and "<!-- results:text-sdxl:start -->" in missing.stderr


# ------------------------------------------------------------------------ stages.report


METRICS = {
    "num_steps": 4, "samples_per_w": 20, "batch_size": 20, "training_range": [1.0, 6.0],
    "unguided_images_per_second": 100.0,
    "summary_in_training_range": {"speed_ratio_agd_over_cfg": 2.0, "min_speed_ratio_single_w": 1.9,
                                  "max_accuracy_drop_points": 0.5, "max_fid_ratio_agd_over_cfg": 0.9,
                                  "max_fidelity_ratio": 0.05, "targets_met": True},
    "per_w": {f"w{w:g}": {
        "w": w, "in_training_range": w <= 6, "fid_unguided": 10.0, "fid_cfg": 20.0 + w, "fid_agd": 19.0 + w,
        "accuracy_unguided": 0.9, "accuracy_cfg": 0.99, "accuracy_agd": 0.985, "fid_to_cfg_unguided": 10.0 * w,
        "fid_to_cfg_agd": 0.5 * w, "rmse_to_cfg_unguided": 0.3, "rmse_to_cfg_agd": 0.1,
        "nfe_per_image_cfg": 8, "nfe_per_image_agd": 4, "images_per_second_cfg": 50.0,
        "images_per_second_agd": 100.0, "speed_ratio_agd_over_cfg": 2.0} for w in (2.0, 4.0, 8.0)},
}


def report(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stages.report", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_report_rewrites_the_block_and_check_catches_drift(tmp_path):
    (tmp_path / "eval").mkdir()
    metrics = tmp_path / "eval" / "metrics.json"
    metrics.write_text(json.dumps(METRICS))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\noutro\n")
    stale = report("--metrics", metrics, "--check", cwd=tmp_path)
    assert stale.returncode == 1 and "out of date" in stale.stderr and len(stale.stderr.splitlines()) == 1
    assert report("--metrics", metrics, cwd=tmp_path).returncode == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results:start -->") and text.endswith("<!-- results:end -->\noutro\n")
    assert "| 8 * | 10.00 | 28.00 | 27.00 |" in text and "](eval/grids/w4.png)" in text
    assert "](eval/curves.png)" in text and "old" not in text
    assert report("--metrics", metrics, "--check", cwd=tmp_path).returncode == 0
    changed = json.loads(json.dumps(METRICS))
    changed["per_w"]["w8"]["fid_agd"] = 99.0  # a later run, README not re-rendered
    metrics.write_text(json.dumps(changed))
    assert report("--metrics", metrics, "--check", cwd=tmp_path).returncode == 1


@pytest.mark.bad_input
@pytest.mark.parametrize("readme_text, metrics_text, message", [
    ("no markers\n", json.dumps(METRICS), "no markdown file holds"),
    ("<!-- results:start -->\n<!-- results:end -->\n", "{not json", "not valid JSON"),
    ("<!-- results:start -->\n<!-- results:end -->\n", "{}", "not a metrics file"),
])
def test_report_refuses_bad_input_in_one_line(tmp_path, readme_text, metrics_text, message):
    (tmp_path / "README.md").write_text(readme_text)
    (tmp_path / "metrics.json").write_text(metrics_text)
    result = report("--metrics", tmp_path / "metrics.json", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    missing = report("--metrics", tmp_path / "nope.json", cwd=tmp_path)
    assert missing.returncode == 2 and "cannot read" in missing.stderr


# ------------------------------------------------------------------ DVC on a copy of the pipeline


def dvc(project: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_NO_UPDATE_CHECK": "1"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


def status(project: Path) -> dict:
    return json.loads(dvc(project, "status", "--json").stdout or "{}")


def interpolate(text: str, params: dict) -> str:
    return INTERPOLATION.sub(lambda m: str(params[m[1].split(".")[0]][m[1].split(".")[1]]), text)


def stand_ins(project: Path, params: dict) -> None:
    """An empty stand-in for every dep and out: files where the name has a suffix, else folders."""
    for stage in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].values():
        for path in entries(stage, "deps") + entries(stage, "outs"):
            target = project / interpolate(path, params)
            if target.exists():
                continue
            if target.suffix:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(f"stand-in for {path}\n")
            else:
                target.mkdir(parents=True)
                (target / "part").write_text(f"stand-in for {path}\n")


def write_params(project: Path, params: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """A DVC project with this repository's dvc.yaml, params.yaml and .dvcignore, every stage
    recorded in dvc.lock by `dvc commit` (nothing run)."""
    project = tmp_path_factory.mktemp("dvc-project")
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, project / name)
    dvc(project, "init", "--no-scm", "--quiet")
    stand_ins(project, params_yaml())
    dvc(project, "commit", "--force", "--quiet")
    assert (project / "dvc.lock").exists()
    assert status(project) == {}
    return project


@pytest.fixture
def project(committed):
    yield committed
    write_params(committed, params_yaml())  # back to the committed settings
    assert status(committed) == {}


@pytest.mark.parametrize("key, value", [
    ("generate.verify", "full"), ("generate.restart_on_mismatch", True), ("train.checkpoint_every", 7),
    ("train.verify", "cheap"), ("train.loader_workers", 3), ("train.restart_on_mismatch", True),
    ("train.validation_w", [2.0]), ("train.validation_prompt", ["a cat"]),
])
def test_operational_keys_rerun_nothing(project, key, value):
    params = params_yaml()
    section, name = key.split(".")
    assert params[section].get(name) != value
    params[section][name] = value
    write_params(project, params)
    assert status(project) == {}


@pytest.mark.parametrize("key, value, stage", [
    ("train.steps", 7, "train"), ("generate.num_steps", 7, "generate"),
    ("evaluate.guidance_scales", [2.0], "evaluate"), ("train.condition_on", ["guidance"], "train"),
])
def test_result_keys_mark_their_stage(project, key, value, stage):
    params = params_yaml()
    section, name = key.split(".")
    params[section][name] = value
    write_params(project, params)
    changed = status(project)
    assert list(changed) == [stage]
    assert {"changed deps": {"params.yaml": {key: "modified"}}} in changed[stage]
    if stage == "train":  # never generate (evaluate follows once train's output has changed,
        dry = dvc(project, "repro", "--dry").stdout  # which a dry run cannot know)
        assert re.findall(r"Running stage '([a-z]+)'", dry) == ["train"], dry


def test_moving_an_output_reruns_its_stage(project):
    params = params_yaml()
    params["generate"]["out_dir"] = "data/trajectories-moved"
    write_params(project, params)
    changed = status(project)
    assert list(changed) == ["generate"]
    assert {"changed outs": {"data/trajectories-moved": "deleted"}} in changed["generate"]


def test_lock_files_inside_outputs_are_not_hashed(project):
    # The writer lock the library keeps in an output folder must not change the folder's hash.
    params = params_yaml()
    locks = [project / params[section][key] / ".agd.lock" for section, key in
             (("generate", "out_dir"), ("train", "out_dir"))]
    for lock in locks:
        lock.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    try:
        assert status(project) == {}
        (project / ".dvcignore").rename(project / "dvcignore.off")  # the control: without it, DVC sees them
        try:
            assert set(status(project)) >= {"generate", "train"}
        finally:
            (project / "dvcignore.off").rename(project / ".dvcignore")
    finally:
        for lock in locks:
            lock.unlink()


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_real_model_configs_run_under_dvc_as_the_readme_says(tmp_path, config):
    # README: set the config's values in params.yaml, with generate.base_model a local download.
    # Copying the config over params.yaml would not parse: it has no base section.
    project = tmp_path
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, project / name)
    dvc(project, "init", "--no-scm", "--quiet")
    params = params_yaml()
    for section, values in (yaml.safe_load(config.read_text()) or {}).items():
        params[section].update(values)
    params["generate"]["base_model"] = "models/checkpoint"
    write_params(project, params)
    stand_ins(project, params)
    dry = dvc(project, "repro", "--dry", "train").stdout
    assert re.findall(r"Running stage '([a-z]+)'", dry) == ["generate", "train"], dry
