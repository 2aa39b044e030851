"""Hub conventions: bases loaded by revision and variant (recorded, so later stages load the same
weights), and adapter folders that describe themselves with a model card."""

from __future__ import annotations

import json

import pytest

import agd_pipeline.training as training
from agd_pipeline.errors import ModelError
from agd_pipeline.models import load_base_model
from agd_pipeline.store import TrajectoryStore

from conftest import generate_store, make_dit, make_scheduler, run_cli
from test_training import QUIET, train_config


@pytest.fixture(scope="module")
def fp16_variant_base(tmp_path_factory):
    """A base whose weights exist only as the fp16 variant (diffusion_pytorch_model.fp16.safetensors)."""
    from agd_pipeline.models import save_dit_folder

    folder = tmp_path_factory.mktemp("variant") / "base"
    net = make_dit(0)
    save_dit_folder(folder, net, make_scheduler())
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    net.save_pretrained(folder / "transformer", variant="fp16")
    return folder


def test_a_variant_is_loaded_recorded_and_reused_by_training(fp16_variant_base, tmp_path):
    with pytest.raises(ModelError, match="cannot load its transformer"):
        load_base_model(str(fp16_variant_base))  # the plain weights are not there
    base = load_base_model(str(fp16_variant_base), variant="fp16")
    assert base.describe()["variant"] == "fp16"
    store = tmp_path / "store"
    generate_store(fp16_variant_base, store, variant="fp16", classes=[1, 2], trajectories_per_class=1)
    assert TrajectoryStore(store).manifest.base_model["variant"] == "fp16"
    training.train(train_config(store, tmp_path / "adapters", steps=2), **QUIET)  # loads the recorded variant
    recorded = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())["base_model"]
    assert recorded["variant"] == "fp16"


def test_a_revision_reaches_every_load_and_the_record(tiny_base_dir, monkeypatch):
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    seen = []
    for cls in (DiTTransformer2DModel, DDIMScheduler):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("revision")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    base = load_base_model(str(tiny_base_dir), revision="v1.0")
    assert ("DiTTransformer2DModel", "v1.0") in seen and ("DDIMScheduler", "v1.0") in seen
    assert base.describe()["revision"] == "v1.0"


def test_plain_loads_record_no_revision_or_variant(tiny_base_dir):
    recorded = load_base_model(str(tiny_base_dir)).describe()
    assert "revision" not in recorded and "variant" not in recorded  # records of plain loads unchanged


def test_trained_adapters_carry_a_model_card(tiny_store, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "adapters"
    training.train(train_config(tiny_store, out, steps=2), **QUIET)
    card = ModelCard.load(out / "README.md")
    config = json.loads((out / "adapter_config.json").read_text())
    assert card.data.library_name == "agd-pipeline" and card.data.get("base_model") is None  # a local base
    assert config["base_model"]["id"] not in card.content and str(tmp_path) not in card.content
    for fact in ("bottleneck", "w in [1, 6]", "DDIMScheduler trajectories of 4 steps",
                 f"{config['parameters']['adapter']:,}", "AGDAdapters.from_pretrained(", "num_inference_steps=4"):
        assert fact in card.text, fact
    assert "## Evaluation" not in card.text
    interval = {"fid_cfg": {"point": 10.0, "low": 8.0, "high": 12.5},
                "fid_agd": {"point": 9.5, "low": 7.25, "high": 12.0}}
    metrics = {"samples_per_w": 20, "num_steps": 4, "per_w": {"w2": {
        "w": 2.0, "fid_cfg": 10.0, "fid_agd": 9.5, "fid_to_cfg_agd": 0.5, "speed_ratio_agd_over_cfg": 2.01}},
        "evidence": {"per_w": {"w2": interval}, "bootstrap": {"clusters": "sample", "replicates": 1000}}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    result = run_cli("stages.report", "--metrics", tmp_path / "metrics.json", "--model-card", out)
    assert result.returncode == 0, result.stderr
    card = ModelCard.load(out / "README.md")  # still a valid card, still ours
    assert card.data.library_name == "agd-pipeline"
    assert "| 2 | 10.00 [8.00, 12.50] | 9.50 [7.25, 12.00] | 0.50 | 2.01x |" in card.text
    assert "95 % intervals (paired bootstrap over samples, 1000 replicates)" in card.text
