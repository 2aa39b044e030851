"""The four stages as a user runs them: `python -m stages.<stage> --params P`, on CPU-sized settings."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from agd_pipeline.evaluation import rounded_summary
from conftest import EMBEDDED_JUDGE, run_cli

pytestmark = pytest.mark.slow


def check(result, stage):
    assert result.returncode == 0, f"{stage} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def test_pipeline_end_to_end(tmp_path):
    base, store, adapters, evaluation = (tmp_path / n for n in ("base", "trajectories", "adapters", "eval"))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "base": {"out_dir": str(base), "train_steps": 30, "classifier_steps": 20, "num_layers": 1,
                 "num_heads": 2, "head_dim": 8, "batch_size": 64},
        "generate": {"base_model": str(base), "out_dir": str(store), "trajectories_per_class": 2,
                     "num_steps": 4, "shard_size": 10, "batch_size": 10, "device": "cpu"},
        "train": {"store": str(store), "out_dir": str(adapters), "steps": 10, "batch_size": 32,
                  "checkpoint_every": 4, "device": "cpu"},
        "evaluate": {"adapters": str(adapters), "out_dir": str(evaluation), "samples_per_class": 2,
                     "guidance_scales": [2.0, 7.0], "batch_size": 20, "device": "cpu", "judge": EMBEDDED_JUDGE},
    }))

    check(run_cli("stages.base", "--params", params, "--no-progress"), "base")
    assert (base / "model_index.json").exists() and (base / "transformer").is_dir()
    assert (base / "classifier" / "model.safetensors").exists() and (base / "holdout.npz").exists()

    check(run_cli("stages.generate", "--params", params, "--no-progress"), "generate")
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["num_trajectories"] == 20
    assert [s["status"] for s in manifest["shards"]] == ["complete", "complete"]
    assert manifest["sampler"]["num_steps"] == 4
    # the manifest records the settings; nothing else in the (DVC-tracked) store restates them
    assert not (store / "resolved_config.json").exists()

    again = check(run_cli("stages.generate", "--params", params, "--no-progress"), "generate (again)")
    assert "nothing to do" in again.stdout
    assert json.loads((store / "manifest.json").read_text()) == manifest

    inspected = check(run_cli("stages.inspect", store, "--verify", "--json", tmp_path / "summary.json"),
                      "inspect")
    assert "verified" in inspected.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trajectories"] == 20 and summary["steps"] == 4 and summary["latent_shape"] == [1, 8, 8]

    check(run_cli("stages.train", "--params", params, "--no-progress"), "train")
    assert (adapters / "adapters.safetensors").exists()
    adapter_config = json.loads((adapters / "adapter_config.json").read_text())
    assert adapter_config["base_model"]["weights_fingerprint"] == manifest["base_model"]["weights_fingerprint"]
    with open(adapters / "loss.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 11))
    # the last step's checkpoint stays, marked finished: a larger --steps continues from it
    assert json.loads((adapters / "checkpoint" / "state.json").read_text())["finished"] is True

    check(run_cli("stages.evaluate", "--params", params, "--no-progress"), "evaluate")
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert {"num_steps", "samples_per_w", "training_range", "summary_in_training_range", "per_w"} <= set(metrics)
    assert metrics["num_steps"] == 4 and metrics["samples_per_w"] == 20
    assert sorted(metrics["per_w"]) == ["w2", "w7"]
    for tag, row in metrics["per_w"].items():
        assert row["nfe_per_image_cfg"] == 2 * row["nfe_per_image_agd"] == 8
        for key in ("fid_cfg", "fid_agd", "accuracy_cfg", "accuracy_agd", "rmse_to_cfg_agd"):
            assert row[key] is not None, (tag, key)
        assert (evaluation / "grids" / f"{tag}.png").stat().st_size > 0
    assert metrics["per_w"]["w2"]["in_training_range"] and not metrics["per_w"]["w7"]["in_training_range"]
    for name in ("fid_vs_w.csv", "accuracy_vs_w.csv", "fidelity_vs_w.csv", "curves.png"):
        assert (evaluation / name).exists(), name
    # summary.json (DVC's metrics): the in-range summary in a few numbers, and the gap closed
    # (floats to 6 significant digits: no 0.5000000000000004 in `dvc exp show`)
    summary = json.loads((evaluation / "summary.json").read_text())
    assert {k: summary[k] for k in metrics["summary_in_training_range"]} == rounded_summary(
        metrics["summary_in_training_range"])
    assert all(v == float(f"{v:.6g}") for v in summary.values() if isinstance(v, float))
    assert summary["mean_accuracy_agd"] == pytest.approx(metrics["per_w"]["w2"]["accuracy_agd"], rel=1e-5)
    assert summary["accuracy_unguided"] == pytest.approx(metrics["per_w"]["w7"]["accuracy_unguided"], rel=1e-5)
    assert isinstance(summary["gap_closed"], float) and summary["gap_closed"] <= 1.0
    # what the adapters cost and were trained on (the size and data-scaling experiments' axes)
    assert summary["adapter_parameters"] == adapter_config["parameters"]["adapter"]
    assert summary["adapter_share"] == pytest.approx(adapter_config["parameters"]["share"], rel=1e-5)
    assert summary["training_pairs"] == manifest["num_trajectories"] * 4 and summary["num_steps"] == 4
    store_bytes = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert summary["store_megabytes"] == pytest.approx(store_bytes / 2**20, rel=1e-5)
    # a few flat numbers (each judged claim: its point and the bound it is judged on)
    assert len(summary) < 30 and not any(isinstance(v, (dict, list)) for v in summary.values())
