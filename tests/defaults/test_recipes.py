"""The shipped base checkpoints (pretrained/) and their recipes (pipelines/bases/dvc.yaml).

`make repro` and `make repro-text` start at stage one from pretrained/, as a user starts from a
downloaded base. Each shipped folder records the settings it was trained with (resolved_config.json);
these tests check that those are the recipe's current settings (a changed recipe without rebuilt
checkpoints fails here), that the pipelines read the shipped folders, and (marker ``recipe``,
``pytest -m recipe``: minutes each) that re-running a recipe reproduces the shipped checkpoint's data
split exactly and its training metrics within run-to-run tolerance (bits differ across CPU types).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from conftest import REPO, run_cli

# shipped folder -> (params file, section, the recipe stage's output that `make bases` copies)
SHIPPED = {
    "toy-dit": ("params.yaml", "base", "data/base"),
    "text-shared": ("pipelines/text/shared.yaml", "text_data", "data/text/shared"),
    "text-sd": ("pipelines/text/sd.yaml", "text_base", "data/text/sd/base"),
    "text-sdxl": ("pipelines/text/sdxl.yaml", "text_base", "data/text/sdxl/base"),
    "text-sd3": ("pipelines/text/sd3.yaml", "text_base", "data/text/sd3/base"),
}
PATH_KEYS = {"out_dir", "shared"}  # where the recipe wrote and read: the copy lives elsewhere


def _recorded(name: str) -> dict:
    return json.loads((REPO / "pretrained" / name / "resolved_config.json").read_text())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_shipped_checkpoint_records_its_recipes_current_settings(name):
    params_file, section, out = SHIPPED[name]
    recipe = yaml.safe_load((REPO / params_file).read_text())[section]
    recorded = _recorded(name)[section]
    differing = {key: (recorded.get(key), value) for key, value in recipe.items()
                 if key not in PATH_KEYS and recorded.get(key) != value}
    assert not differing, (f"pretrained/{name} was trained with other {section} settings than {params_file} "
                           f"now holds (recorded, recipe): {differing}; rebuild it with `make bases`")
    assert recorded["out_dir"] == recipe["out_dir"] == out  # what `make bases` copies from


def test_the_pipelines_read_the_shipped_checkpoints_and_never_the_recipes_outputs():
    """Stage one and later read pretrained/; only pipelines/bases/dvc.yaml writes the recipe outputs."""
    recipe_outputs = [out for _, _, out in SHIPPED.values()]
    for pipeline in [REPO / "dvc.yaml", *sorted((REPO / "pipelines").glob("*/dvc.yaml"))]:
        if pipeline.parent.name == "bases":
            continue
        text = pipeline.read_text()
        used = [out for out in recipe_outputs if out in text]
        assert not used, f"{pipeline.relative_to(REPO)} reads the recipe outputs {used}; read pretrained/ instead"
    bases = yaml.safe_load((REPO / "pipelines/bases/dvc.yaml").read_text())["stages"]
    outs = [out for stage in bases.values() for out in stage.get("do", stage)["outs"]]
    assert outs == ["data/base", "data/text/shared", "data/text/${item}/base"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["generate"]["base_model"] == "pretrained/toy-dit"
    for family in ("sd", "sdxl", "sd3"):
        generate = yaml.safe_load((REPO / f"pipelines/text/{family}.yaml").read_text())["generate"]
        assert generate["base_model"] == f"pretrained/text-{family}"
        for key in ("prompts_file", "negative_prompts_file"):
            assert (REPO / generate[key]).is_file() and generate[key].startswith(f"pretrained/text-{family}/")


def _assert_reproduces(name: str, out, metrics: dict[str, float]) -> None:
    """The re-run's data split equals the shipped one exactly, and each training metric (from the
    recipe's own record) lies within ``metrics[key]`` (relative) of the shipped checkpoint's."""
    shipped = REPO / "pretrained" / name
    for split in sorted(p.name for p in shipped.glob("*.npz")):
        with np.load(shipped / split) as a, np.load(out / split) as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{split}:{key}")
    for key, tolerance in metrics.items():
        path, _, field = key.rpartition(":")
        want = json.loads((shipped / path).read_text())[field]
        got = json.loads((out / path).read_text())[field]
        assert got == pytest.approx(want, rel=tolerance), f"{name} {key}: re-run {got}, shipped {want}"


@pytest.mark.recipe
def test_the_class_recipe_reproduces_the_shipped_dit(tmp_path):
    out = tmp_path / "base"
    result = run_cli("stages.base", "--params", "params.yaml", "--out-dir", out, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_reproduces("toy-dit", out, {"agd_base.json:final_loss": 0.03, "agd_base.json:parameters": 0,
                                        "classifier/config.json:holdout_accuracy": 0.01})


@pytest.mark.recipe
@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_a_text_recipe_reproduces_the_shipped_base(tmp_path, family):
    """The family's base trained by its recipe on the shipped shared data (the recipe's own first step,
    text_data, is compared by the data split it writes: pretrained/text-shared's digits)."""
    params = yaml.safe_load((REPO / f"pipelines/text/{family}.yaml").read_text())
    params["text_base"].update(shared=str(REPO / "pretrained/text-shared"), out_dir=str(tmp_path / "base"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_cli("stages.text_base", "--params", tmp_path / "params.yaml", timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_reproduces(f"text-{family}", tmp_path / "base", {"agd_base.json:final_loss": 0.03,
                                                              "agd_base.json:parameters": 0})
