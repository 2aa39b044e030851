"""The benchmark helpers build real architectures and count/time the real modules (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agd_pipeline.adapters import AdaptedModel, AdapterConfig
from benchmarks.models import build_base, parameter_table, step_times
from agd_pipeline.models import count_parameters

from conftest import run_cli

REPO = Path(__file__).resolve().parents[2]


def test_meta_device_counts_equal_real_weights_counts():
    rows = {(r["kind"], r["placement"], r["width"]): r for r in parameter_table("toy-dit-8x8")}
    base = build_base("toy-dit-8x8")  # real (random) weights this time
    for kind in ("offset", "cross_attention", "bottleneck"):
        model = AdaptedModel(base, AdapterConfig(kind=kind, placement="attention+output", width=32,
                                                 num_classes=base.num_classes))
        row = rows[(kind, "attention+output", 32)]
        assert row["adapter_parameters"] == count_parameters(model)
        assert row["base_parameters"] == count_parameters(base.net) == 392_900
        model.remove()


def test_step_times_reports_every_batch():
    rows = step_times("toy-dit-8x8", batch_sizes=(1, 3), repeats=1)
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["cfg_seconds"] > 0 and r["agd_seconds"] > 0
        assert r["speedup_agd_over_cfg"] == r["cfg_seconds"] / r["agd_seconds"]


def test_step_times_take_given_adapter_settings():
    rows = step_times("toy-dit-8x8", batch_sizes=(1,), repeats=1,
                      adapter_settings=dict(kind="offset", placement="attention", width=8))
    assert rows[0]["adapter"] == "offset r8 at attention"


@pytest.mark.bad_input
def test_shipped_adapters_are_refused_for_an_architecture_no_config_trains():
    result = run_cli("stages.benchmark", "step-time", "--architectures", "toy-dit-8x8", "--shipped-adapters")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --shipped-adapters: no shipped config trains adapters for "
                                            "toy-dit-8x8; those that do: dit-xl-2-256")
    assert "|" not in result.stdout  # refused before any table is printed


def test_benchmark_command_writes_json(tmp_path):
    out = tmp_path / "p.json"
    result = run_cli("stages.benchmark", "parameters", "--architectures", "toy-dit-8x8", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "| toy-dit-8x8 | bottleneck | attention+output | 32 | 51,428 |" in result.stdout
    assert out.exists()
    bad = run_cli("stages.benchmark", "parameters", "--architectures", "sd-99")
    assert bad.returncode == 2 and "unknown architecture" in bad.stderr


def test_gap_closed_is_zero_for_fresh_adapters_and_positive_after_training(tiny_base_dir, tiny_store, tmp_path):
    import agd_pipeline.training as training
    from agd_pipeline.adapters import save_adapters
    from agd_pipeline.config import TrainConfig, load_config
    from agd_pipeline.evaluation import gap_closed
    from agd_pipeline.models import load_base_model

    base = load_base_model(str(tiny_base_dir))
    fresh = AdaptedModel(base, AdapterConfig(width=8, embed_dim=16, num_classes=base.num_classes))
    save_adapters(fresh, tmp_path / "fresh", extra={"sampler": {"num_steps": 4},
                                                    "guidance": {"min": 1.0, "max": 6.0}})
    result = gap_closed(tmp_path / "fresh", num_trajectories=10)
    # a zero-init adapter is the conditional model; the CFG branch's conditional output comes from
    # a batch of 2B and AGD's from B, which some CPUs' kernels round differently (seen with AVX-512:
    # -2.4e-7), so "zero" is to float32 rounding here (test_adapters checks bit-exactness per call)
    assert abs(result["overall"]) < 1e-5
    assert all(abs(v) < 1e-5 for v in result["per_w_bin"].values()) and result["per_w_bin"]

    config = load_config(TrainConfig, {"store": str(tiny_store), "out_dir": str(tmp_path / "trained"),
                                       "steps": 40, "batch_size": 32, "width": 8, "embed_dim": 16,
                                       "device": "cpu", "learning_rate": 0.01})
    training.train(config, progress=False, log=lambda *a, **k: None)
    assert gap_closed(tmp_path / "trained", num_trajectories=10)["overall"] > 0.0


def test_data_benchmarks_run_on_small_inputs(tiny_store, tmp_path):
    """The data-path benchmarks work end to end (their numbers are not judged here)."""
    import numpy as np

    from benchmarks import data_path as bench
    from agd_pipeline.store import TrajectoryStore

    rows = bench.storage_table(tiny_store, variants=[("zarr", "none", 0), ("webdataset", "deflate", 3)],
                               workdir=str(tmp_path))
    assert [r["format"] for r in rows] == ["zarr", "webdataset", "reference (dir per trajectory)"]
    assert rows[0]["bytes_per_trajectory_step"] > 2 * 64 * 2  # raw fp16 plus metadata
    # the reference layout holds the same numbers as the store, read per item
    bench.write_reference_layout(tmp_path / "reference", TrajectoryStore(tiny_store))
    item = bench.ReferenceDataset(tmp_path / "reference", 20, 4, (1, 8, 8))[4 * 9 + 2]
    arrays = TrajectoryStore(tiny_store).dask_arrays()
    np.testing.assert_array_equal(item["model_input"].numpy(), arrays["model_input"][9, 2].compute())
    np.testing.assert_array_equal(item["guided_output"].numpy(), arrays["guided_output"][9, 2].compute())
    assert float(item["guidance_scale"]) == float(arrays["guidance_scale"][9].compute())
    result = bench.recording_overhead(batch=10, steps=2, batches=1, repeats=1)
    assert result["seconds_with_recording"] > 0 and result["seconds_without_recording"] > 0


def test_paper_layout_holds_the_store_and_the_shipped_table_runs(tiny_store, tmp_path, monkeypatch):
    """The paper-layout loader reads the same numbers as the store; the shipped-layout table runs on
    a tiny layout of each kind (class and text conditions; its numbers are not judged here)."""
    import numpy as np
    import yaml

    from benchmarks import data_path as bench
    from agd_pipeline.store import TrajectoryStore

    store = TrajectoryStore(tiny_store)
    bench.write_paper_layout(tmp_path / "paper", store)
    item = bench.PaperDataset(tmp_path / "paper", store.num_trajectories, store.num_steps)[4 * 9 + 2]
    arrays = store.dask_arrays()
    np.testing.assert_array_equal(item["model_input"].numpy(), arrays["model_input"][9, 2].compute())
    np.testing.assert_array_equal(item["guided_output"].numpy(), arrays["guided_output"][9, 2].compute())
    assert float(item["timesteps"]) == float(arrays["timesteps"][9, 2].compute())
    assert int(item["class_label"]) == int(arrays["class_label"][9].compute())
    assert float(item["guidance_scale"]) == pytest.approx(float(arrays["guidance_scale"][9].compute()))
    # the reference implementation's layout: a folder per trajectory with its two files, two at the root
    files = [p for p in (tmp_path / "paper").rglob("*") if p.is_file()]
    assert len(files) == 2 * store.num_trajectories + 2
    assert {p.name for p in files} == {"trajectory.npy", "conditioning.pt", "timesteps.pt", "latent_shape.pt"}

    configs = {}
    for name, conditions in (("class", bench.CLASS_CONDITION), ("text", {
            "prompt_index": {"dtype": "int64", "shape": []},
            "prompt_embeds": {"dtype": "float16", "shape": [3, 8]}})):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"generate": {"num_steps": 3, "shard_size": 4, "chunk_bytes": 1024},
                                        "train": {"batch_size": 5}}))
        configs[str(path)] = ((1, 4, 4), conditions)
    monkeypatch.setattr(bench, "SHIPPED_LAYOUTS", configs)
    monkeypatch.setattr(bench, "PAPER_WORKERS", 0)
    rows = bench.shipped_loader_table(tuple(configs), trajectories=8, repeats=2, workdir=str(tmp_path))
    assert [r["config"] for r in rows] == list(configs)
    for r in rows:
        assert len(r["zarr_over_paper"]) == len(r["webdataset_over_paper"]) == 2
        assert all(v > 0 for v in r["zarr_samples_per_s"] + r["paper_samples_per_s"] + r["paper_first_batch_s"])
        assert r["paper_files_per_1000"] == 1000 * (2 * 8 + 2) / 8  # two a trajectory, two at the root
        assert r["webdataset_files_per_1000"] == 1000 * 5 / 8  # 2 tars, their sidecars and the manifest


def test_loader_memory_counts_workers_and_peaks(tmp_path, monkeypatch):
    import yaml

    from benchmarks import data_path as bench

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"generate": {"num_steps": 3, "shard_size": 4}, "train": {"batch_size": 5}}))
    monkeypatch.setattr(bench, "SHIPPED_LAYOUTS", {str(path): ((1, 4, 4), bench.CLASS_CONDITION)})
    rows = bench.loader_memory_table(str(path), workers=(0, 2), trajectories=8, epochs=2, workdir=str(tmp_path))
    assert [r["workers"] for r in rows] == [0, 2]
    assert [r["worker_processes"] for r in rows] == [0, 2]  # two epochs, the same two workers
    assert all(r["peak_bytes"] >= r["before_bytes"] > 0 for r in rows)
    assert rows[0]["peak_over_0_workers"] == 1.0 and rows[1]["peak_over_0_workers"] > 0


def test_thread_table_times_each_count_under_both_loads():
    from benchmarks.models import thread_table

    rows = thread_table(train_batch=8, sample_batch=4, repeats=1)
    assert {(r["load"], r["step"], r["threads"]) for r in rows} == {
        (load, step, n) for load in ("as is", "one busy process") for step in ("train", "cfg") for n in (1, 2)}
    assert all(r["median_seconds"] > 0 for r in rows)
    assert all(r["over_1_thread"] == 1.0 for r in rows if r["threads"] == 1)
    assert torch.get_num_threads() == 1  # put back


def test_adapter_costs_time_every_width_against_one_unguided_and_cfg_call():
    from benchmarks.models import adapter_costs

    rows = adapter_costs("toy-dit-8x8", widths=(4, 16), kind="bottleneck", placement="attention+output",
                         batch_sizes=(2,), repeats=2)
    assert [(r["batch"], r["width"]) for r in rows] == [(2, 4), (2, 16)]
    assert rows[0]["unguided_seconds"] == rows[1]["unguided_seconds"] > 0  # one paired reference per batch
    assert rows[0]["cfg_seconds"] == rows[1]["cfg_seconds"] > 0
    assert rows[0]["adapter_share_percent"] < rows[1]["adapter_share_percent"]
    for r in rows:
        assert r["speedup_agd_over_cfg"] == r["cfg_seconds"] / r["agd_seconds"]
        assert r["cfg_over_unguided"] == r["cfg_seconds"] / r["unguided_seconds"]


def test_adapter_costs_leave_the_base_unhooked(monkeypatch):
    import benchmarks.models as models

    built = []

    def keep(name):
        built.append(build_base(name))
        return built[-1]

    monkeypatch.setattr(models, "build_base", keep)
    models.adapter_costs("toy-dit-8x8", widths=(4, 8), kind="offset", placement="attention", batch_sizes=(1,),
                         repeats=1)
    assert len(built) == 1
    assert not any(m._forward_hooks for m in built[0].net.modules())  # every width's hooks were removed


@pytest.mark.bad_input
def test_adapter_cost_is_refused_for_an_architecture_no_config_trains():
    result = run_cli("stages.benchmark", "adapter-cost", "--architectures", "toy-dit-8x8")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: adapter-cost: no shipped config trains adapters for toy-dit-8x8")
    assert "|" not in result.stdout


def test_gap_closed_on_a_text_model_cycles_the_prompts_given(text_pipeline_dirs, tmp_path):
    """Text models: fresh CFG trajectories of the given prompts (with the adapters' view of the negative
    prompt); zero-init adapters close nothing, adapters trained on a store of those prompts close some."""
    import agd_pipeline.training as training
    from agd_pipeline.adapters import load_adapted_model, save_adapters
    from agd_pipeline.config import TrainConfig, load_config
    from agd_pipeline.evaluation import gap_closed
    from agd_pipeline.inference import negative_conditions
    from agd_pipeline.models import encode_prompts, load_base_model

    from conftest import generate_store

    folder = text_pipeline_dirs["sd"]
    prompts = ["a cat", "a dog", "a red bird", "a tree"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (tmp_path / "negatives.txt").write_text("ugly\n")
    generate_store(folder, tmp_path / "store", prompts_file=str(tmp_path / "prompts.txt"),
                   negative_prompts_file=str(tmp_path / "negatives.txt"), trajectories_per_prompt=8, num_steps=4,
                   shard_size=32, batch_size=16)
    config = load_config(TrainConfig, {"store": str(tmp_path / "store"), "out_dir": str(tmp_path / "trained"),
                                       "steps": 60, "batch_size": 32, "width": 8, "embed_dim": 16,
                                       "device": "cpu", "learning_rate": 0.01, "checkpoint_every": 0,
                                       "validate_every": -1})
    training.train(config, progress=False, log=lambda *a, **k: None)
    base = load_base_model(str(folder))
    table, uncond = encode_prompts(base, prompts, "")
    conditions = {**table, **negative_conditions(uncond, len(prompts))}
    trained = gap_closed(tmp_path / "trained", num_trajectories=12, conditions=conditions, uncond=uncond)
    assert trained["overall"] > 0.0 and trained["trajectories"] == 12

    adapted = load_adapted_model(tmp_path / "trained", base)
    fresh = AdaptedModel(base, adapted.config)  # the same kind, placement and conditions, zero-init
    config_file = json.loads((tmp_path / "trained" / "adapter_config.json").read_text())
    save_adapters(fresh, tmp_path / "fresh", extra={k: v for k, v in config_file.items()
                                                    if k in ("sampler", "guidance", "base_model")})
    result = gap_closed(tmp_path / "fresh", num_trajectories=12, conditions=conditions, uncond=uncond)
    assert abs(result["overall"]) < 1e-5, result
    # without the prompts a text model has nothing to cycle: refused with a message
    with pytest.raises(Exception, match="class-conditional"):
        gap_closed(tmp_path / "fresh", num_trajectories=4)


def test_benchmarks_build_the_adapters_the_shipped_configs_train():
    """The training and adapter-cost benchmarks read the adapters from configs/ (a hand-kept copy
    once left out SD's and SDXL's condition_on, timing 3 attention keys instead of the 79 prompt
    tokens that ship)."""
    import yaml

    from benchmarks.training import SHIPPED_ADAPTERS, SHIPPED_CONFIGS

    for name, config_file in SHIPPED_CONFIGS.items():
        train = yaml.safe_load((REPO / "configs" / config_file).read_text())["train"]
        adapters = SHIPPED_ADAPTERS[name]
        assert adapters["kind"] == train["adapter"] and adapters["width"] == train["width"]
        assert adapters["placement"] == train["placement"]
        assert adapters.get("condition_on") == train.get("condition_on"), name
    assert "text_tokens" in SHIPPED_ADAPTERS["sd-2.1-unet"]["condition_on"]
